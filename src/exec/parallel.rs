//! Running independent stages at the same time (`--jobs N`).
//!
//! The executor decides each stage on the calling thread once all its inputs are finished
//! (identity, cache lookup: quick), and hands the stages that must compute to scoped threads,
//! at most `jobs` at once and at most `device_jobs` of those that load a model. Results are
//! applied on the calling thread, so the run's state is never shared; the summary is in graph
//! order whatever order the stages finish in.

use std::collections::VecDeque;
use std::sync::mpsc;

use super::ExecError;

/// What deciding a stage gave: its result already (cached, skipped, dry run), or work to do.
pub(super) enum Step<D, J> {
    Done(D),
    Run(J),
}

/// How many stages may compute at once.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// Any stages.
    pub jobs: usize,
    /// Stages that load a model (see [`super::Stage::uses_device`]).
    pub device_jobs: usize,
}

impl Limits {
    /// `--jobs N` as given (any N stages, model stages included), or the default: one stage per
    /// CPU core, one model stage at a time (a model stage already uses every core, and a device
    /// holds one model comfortably).
    pub(super) fn new(jobs: Option<usize>) -> Self {
        match jobs {
            Some(n) => Self {
                jobs: n.max(1),
                device_jobs: n.max(1),
            },
            None => Self {
                jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
                device_jobs: 1,
            },
        }
    }
}

/// Readies node `i` on the scheduling thread: run it (with its job), or it is already settled.
type Prepare<'a, S, D, J> = dyn FnMut(&mut S, usize) -> Result<Step<D, J>, ExecError> + 'a;

/// Runs every node of a graph whose node `i` reads `inputs[i]` (earlier nodes).
///
/// `prepare(state, i)` is called once per node, on this thread, when every input of `i` is
/// finished; `execute(i, job)` runs on a worker thread; `finish(state, i, result)` is called on
/// this thread with every result, in the order they come. An error stops new work; running work
/// is waited for, then the first error is returned.
pub(super) fn schedule<S, D, J>(
    state: &mut S,
    inputs: &[Vec<usize>],
    limits: Limits,
    uses_device: &(dyn Fn(usize) -> bool + Sync),
    prepare: &mut Prepare<'_, S, D, J>,
    execute: &(dyn Fn(usize, J) -> Result<D, ExecError> + Sync),
    finish: &mut dyn FnMut(&mut S, usize, D),
) -> Result<(), ExecError>
where
    D: Send,
    J: Send,
{
    let n = inputs.len();
    let mut prepared = vec![false; n];
    let mut finished = vec![false; n];
    let mut queue: VecDeque<(usize, J)> = VecDeque::new();
    let mut running = 0usize;
    let mut running_device = 0usize;
    let mut failure: Option<ExecError> = None;
    let (tx, rx) = mpsc::channel::<(usize, Result<D, ExecError>)>();

    std::thread::scope(|scope| {
        loop {
            // Decide every node whose inputs are all finished, in graph order; a node finished
            // at once (cached, skipped) may make later ones ready, hence the inner loop.
            let mut progressed = true;
            while progressed && failure.is_none() {
                progressed = false;
                for i in 0..n {
                    if prepared[i] || !inputs[i].iter().all(|&j| finished[j]) {
                        continue;
                    }
                    prepared[i] = true;
                    match prepare(state, i) {
                        Ok(Step::Done(result)) => {
                            finish(state, i, result);
                            finished[i] = true;
                            progressed = true;
                        }
                        Ok(Step::Run(job)) => queue.push_back((i, job)),
                        Err(error) => {
                            failure = Some(error);
                            break;
                        }
                    }
                }
            }
            // Start what the limits allow, earliest in the graph first.
            while failure.is_none() && running < limits.jobs {
                let fits = |i: usize| !uses_device(i) || running_device < limits.device_jobs;
                let Some(position) = queue.iter().position(|(i, _)| fits(*i)) else {
                    break;
                };
                let Some((i, job)) = queue.remove(position) else {
                    break;
                };
                running += 1;
                if uses_device(i) {
                    running_device += 1;
                }
                let tx = tx.clone();
                scope.spawn(move || {
                    // The receiver lives until every worker is joined.
                    let _ = tx.send((i, execute(i, job)));
                });
            }
            if running == 0 {
                break;
            }
            let Ok((i, result)) = rx.recv() else {
                break;
            };
            running -= 1;
            if uses_device(i) {
                running_device -= 1;
            }
            match result {
                Ok(result) => {
                    finish(state, i, result);
                    finished[i] = true;
                }
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
    });
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
