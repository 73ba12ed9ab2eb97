//! Running a graph: every selected stage's fingerprint first, then cache lookups and stage runs
//! in dependency order, exports synced for every stage resolved (ran or cached), the summary.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::exports;
use super::history::{History, StageIdentity};
use super::parallel::{self, Limits, Step};
use super::shards::{
    LocalLauncher, ShardContext, ShardCounts, ShardLauncher, entry_metadata, run_shards,
    run_whole_elsewhere,
};
use super::stage::{MissingCause, MissingInput, StageError, StageOutcome};
use super::summary::Elsewhere;
use super::{Progress, RunSummary, Stage, StageContext, StageReport, StageStatus};
use crate::cache::{
    CacheEntry, CacheError, CacheLock, CacheStore, Fingerprint, Lookup, MissReason, Verify,
};

/// One node of the graph the executor runs.
pub(crate) struct ExecNode {
    /// Unique stage name (anonymous data expressions get generated names).
    pub name: String,
    /// Indices of input nodes; every index is smaller than this node's own index.
    pub inputs: Vec<usize>,
    /// The configured stage.
    pub stage: Box<dyn Stage>,
}

/// A graph of stages in topological order (inputs before the stages that read them).
pub(crate) struct ExecGraph {
    /// Pipeline name: keys the run history used to explain reruns.
    pub pipeline: String,
    /// The nodes, topologically ordered.
    pub nodes: Vec<ExecNode>,
}

/// Options of `vlmpipe run`.
#[derive(Clone, Default)]
pub(crate) struct RunOptions {
    /// Stages to recompute even when cached.
    pub force: Vec<String>,
    /// When non-empty, run only these stages and their inputs.
    pub only: Vec<String>,
    /// Say what would run and why, run nothing.
    pub dry_run: bool,
    /// How long to wait for another run holding the cache lock.
    pub lock_wait: Duration,
    /// No progress bars.
    pub quiet: bool,
    /// Once set (by another thread), stages not yet started are skipped: `watch` sets it when a
    /// newer save makes this run moot. Checked between stages; a running stage finishes.
    pub cancel: Option<Arc<AtomicBool>>,
    /// `--shards N`: the shard count of every shardable stage (over its own `shards =`); a
    /// count of 1 runs it unsharded.
    pub shards: Option<usize>,
    /// Where shards are computed; `None` is the in-process [`LocalLauncher`].
    pub launcher: Option<Arc<dyn ShardLauncher>>,
    /// `--jobs N`: at most N stages compute at once, model stages included; `None` is one per
    /// CPU core with one model stage at a time.
    pub jobs: Option<usize>,
}

/// Errors that stop a run before any stage runs (a failing stage is not one of these).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExecError {
    /// `--force`/`--only` named a stage the pipeline does not have.
    #[error("unknown stage `{name}` in `--{flag}`{hint}")]
    UnknownStage {
        flag: &'static str,
        name: String,
        hint: String,
    },
    /// A node lists an input that does not come before it (a bug in plan lowering).
    #[error("stage `{stage}` reads input #{input}, which is not an earlier stage")]
    BadGraph { stage: String, input: usize },
    /// The cache could not be opened, locked or written.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Why a stage's identity could not be computed.
#[derive(Clone, Debug)]
pub(super) enum Blocked {
    /// An input has no fingerprint (it is blocked itself); the stage may still run partially.
    Input(String),
    /// The stage's own external state is unreadable (a model or dataset that is not there).
    External(String),
}

/// Where a stage stands during the run.
#[derive(Clone, Debug)]
enum State {
    /// Its entry is available to the stages that read it (boxed: a manifest is large).
    Entry(Box<CacheEntry>),
    /// `--dry-run`: it would run, so its entry would be available.
    WouldRun,
    /// It has no entry in this run, and the root cause (the failure that made it missing, named
    /// by the stage that failed), which a partial stage shows for each input it lacks.
    Missing(MissingCause),
}

/// Runs `graph` against `store`.
///
/// Every selected stage's identity is computed first: identities never depend on outputs, and
/// computing them resolves every model and dataset the run needs, so one that is missing is
/// reported in seconds instead of after the stages before it ran. Stages whose inputs are
/// finished then run, up to `--jobs` at once ([`super::parallel`]).
pub(crate) fn run(
    graph: &ExecGraph,
    store: &CacheStore,
    options: &RunOptions,
) -> Result<RunSummary, ExecError> {
    let started = Instant::now();
    validate(graph, options)?;
    let selected = selection(graph, &options.only);
    let progress = Progress::new(options.quiet);

    let identities = identities(graph, &selected);
    announce_blocked(graph, &identities, options.dry_run);

    let lock =
        store.lock_shared_notify(options.lock_wait, &mut |message| eprintln!("{message}"))?;
    let verify_fully = if options.dry_run {
        vec![false; graph.nodes.len()]
    } else {
        read_by_stages_that_run(graph, store, options, &identities)
    };
    let run = Run {
        graph,
        store,
        options,
        lock: &lock,
        progress: &progress,
        identities: &identities,
        verify_fully: &verify_fully,
    };
    let mut state = RunState {
        states: vec![State::Missing(MissingCause::NotSelected); graph.nodes.len()],
        reports: vec![None; graph.nodes.len()],
        history: History::load(store.root(), &graph.pipeline),
    };
    let inputs: Vec<Vec<usize>> = graph.nodes.iter().map(|n| n.inputs.clone()).collect();
    // A launcher that sends model stages elsewhere leaves this machine's device free: they are
    // then bounded by `--jobs` alone, so independent fine-tunes and evals go out together.
    let elsewhere = options
        .launcher
        .as_ref()
        .is_some_and(|l| l.runs_whole_stages());
    let uses_device = |i: usize| !elsewhere && graph.nodes[i].stage.uses_device();
    parallel::schedule(
        &mut state,
        &inputs,
        Limits::new(options.jobs),
        &uses_device,
        &mut |state, index| run.prepare(state, index),
        &|index, job| run.execute(index, job),
        &mut |state, index, done| {
            let Decided {
                mut report,
                state: node_state,
                record,
                started,
            } = done;
            report.seconds = started.elapsed().as_secs_f64();
            if let Some(identity) = record {
                state.history.record(&graph.nodes[index].name, identity);
            }
            state.states[index] = node_state;
            state.reports[index] = Some(report);
        },
    )?;

    if !options.dry_run {
        state.history.save(store.root(), &graph.pipeline);
    }
    let reports: Vec<StageReport> = state.reports.into_iter().flatten().collect();
    let success = !reports.iter().any(|r| r.status == StageStatus::Failed);
    Ok(RunSummary {
        stages: reports,
        seconds: started.elapsed().as_secs_f64(),
        success,
        dry_run: options.dry_run,
    })
}

/// What the stages of one run share (read-only).
struct Run<'a> {
    graph: &'a ExecGraph,
    store: &'a CacheStore,
    options: &'a RunOptions,
    lock: &'a CacheLock,
    progress: &'a Progress,
    identities: &'a [Option<Result<StageIdentity, Blocked>>],
    verify_fully: &'a [bool],
}

/// What the run knows so far (touched only on the scheduling thread).
struct RunState {
    states: Vec<State>,
    reports: Vec<Option<StageReport>>,
    history: History,
}

/// A stage's result: its summary line, its state for the stages that read it, and the identity
/// to record in the history (a complete stage that has an entry).
struct Decided {
    report: StageReport,
    state: State,
    record: Option<StageIdentity>,
    started: Instant,
}

/// A stage that must compute, decided on the scheduling thread.
struct Job {
    report: StageReport,
    partial: Option<Box<dyn Stage>>,
    missing: Vec<MissingInput>,
    identity: StageIdentity,
    fp: Fingerprint,
    forced: bool,
    verify: Verify,
    entries: Vec<CacheEntry>,
    why: String,
}

impl Run<'_> {
    /// Decides stage `index` once its inputs are finished: skipped, failed to resolve, cached
    /// (exports synced), would run (dry run), or a [`Job`] to compute.
    fn prepare(&self, state: &RunState, index: usize) -> Result<Step<Decided, Job>, ExecError> {
        let (graph, store, options) = (self.graph, self.store, self.options);
        let node = &graph.nodes[index];
        let started = Instant::now();
        let mut report = StageReport {
            name: node.name.clone(),
            kind: node.stage.kind().to_owned(),
            status: StageStatus::Skipped,
            fingerprint: String::new(),
            seconds: 0.0,
            outputs: Vec::new(),
            reason: None,
            warnings: Vec::new(),
            shards: None,
            elsewhere: None,
        };
        let done = |report: StageReport, state: State| {
            Ok(Step::Done(Decided {
                report,
                state,
                record: None,
                started,
            }))
        };

        // Before its identity: a stage `--only` leaves out may not even look at its inputs (a
        // Hub model not yet cached would be downloaded just to be fingerprinted).
        let Some(identity) = &self.identities[index] else {
            let cause = MissingCause::NotSelected;
            report.reason = Some(cause.to_string());
            return done(report, State::Missing(cause));
        };
        if let Err(Blocked::External(reason)) = identity {
            report.status = StageStatus::Failed;
            report.reason = Some(reason.clone());
            let cause = MissingCause::Failed {
                stage: node.name.clone(),
                reason: reason.clone(),
            };
            return done(report, State::Missing(cause));
        }
        if options
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
        {
            let cause = MissingCause::Cancelled;
            report.reason = Some(cause.to_string());
            return done(report, State::Missing(cause));
        }

        let missing: Vec<MissingInput> = node
            .inputs
            .iter()
            .enumerate()
            .filter_map(|(slot, &i)| match &state.states[i] {
                State::Missing(reason) => Some(MissingInput {
                    slot,
                    name: graph.nodes[i].name.clone(),
                    reason: reason.clone(),
                }),
                _ => None,
            })
            .collect();
        // A stage missing inputs runs only when it can do without them (a report over the evals
        // that exist), as a partial stage with its own fingerprint; otherwise it is skipped.
        let partial = if missing.is_empty() {
            None
        } else {
            match node.stage.without_inputs(&missing) {
                Some(stage) if missing.len() < node.inputs.len() => Some(stage),
                _ => {
                    let first = &missing[0];
                    report.reason = Some(format!("input `{}` did not complete", first.name));
                    return done(report, State::Missing(first.reason.clone()));
                }
            }
        };
        let stage: &dyn Stage = partial.as_deref().unwrap_or(node.stage.as_ref());
        let inputs: Vec<usize> = node
            .inputs
            .iter()
            .enumerate()
            .filter(|(slot, _)| !missing.iter().any(|m| m.slot == *slot))
            .map(|(_, &i)| i)
            .collect();
        let identity = match (&partial, identity) {
            (None, Ok(identity)) => identity.clone(),
            _ => {
                let fingerprints = known_fingerprints(self.identities);
                match identity_of(graph, stage, &inputs, &fingerprints) {
                    Ok(identity) => identity,
                    Err(Blocked::Input(reason) | Blocked::External(reason)) => {
                        report.status = StageStatus::Failed;
                        let cause = MissingCause::Failed {
                            stage: node.name.clone(),
                            reason: reason.clone(),
                        };
                        report.reason = Some(reason);
                        return done(report, State::Missing(cause));
                    }
                }
            }
        };
        let fp = Fingerprint::parse(&identity.fingerprint).map_err(|_| ExecError::BadGraph {
            stage: node.name.clone(),
            input: index,
        })?;
        report.fingerprint = identity.fingerprint.clone();

        let forced = options.force.iter().any(|f| f == &node.name);
        let verify = if self.verify_fully[index] {
            Verify::Full
        } else {
            Verify::Fast
        };
        let lookup = if forced {
            Lookup::Miss(MissReason::Absent)
        } else {
            store.lookup(self.lock, &fp, verify)?
        };
        let miss = match lookup {
            Lookup::Hit(hit) => {
                report.status = StageStatus::Cached;
                let decided =
                    self.conclude(index, report, *hit, stage, &partial, &missing, identity);
                return Ok(Step::Done(Decided { started, ..decided }));
            }
            Lookup::Miss(miss) => miss,
        };
        let mut why = if forced {
            "forced".to_owned()
        } else {
            match miss {
                MissReason::Absent => state.history.explain(&node.name, &identity),
                MissReason::Corrupt(problem) => format!("cache entry corrupt ({problem})"),
            }
        };
        if partial.is_some() {
            why = format!("{why}; without {}", names(&missing));
        }
        report.reason = Some(why.clone());
        if options.dry_run {
            report.status = StageStatus::WouldRun;
            return done(report, State::WouldRun);
        }
        let entries: Vec<CacheEntry> = inputs
            .iter()
            .filter_map(|&i| match &state.states[i] {
                State::Entry(entry) => Some(entry.as_ref().clone()),
                _ => None,
            })
            .collect();
        Ok(Step::Run(Job {
            report,
            partial,
            missing,
            identity,
            fp,
            forced,
            verify,
            entries,
            why,
        }))
    }

    /// Computes a stage (on a worker thread): waits for another run computing the same entry
    /// and reuses it, or runs the stage (in shards when it has them) into a new entry.
    fn execute(&self, index: usize, job: Job) -> Result<Decided, ExecError> {
        let (store, options, lock, progress) = (self.store, self.options, self.lock, self.progress);
        let node = &self.graph.nodes[index];
        let Job {
            mut report,
            partial,
            missing,
            identity,
            fp,
            forced,
            verify,
            entries,
            why,
        } = job;
        // Timed from here: a stage waiting for a free job slot is not computing.
        let started = Instant::now();
        // Queued behind `--jobs` before a cancel: it has not started, so it does not.
        if options
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
        {
            let cause = MissingCause::Cancelled;
            report.reason = Some(cause.to_string());
            return Ok(Decided {
                report,
                state: State::Missing(cause),
                record: None,
                started,
            });
        }
        let stage: &dyn Stage = partial.as_deref().unwrap_or(node.stage.as_ref());
        // Another run may compute the same entry: wait for it, then reuse it.
        let held = store.lock_entry(lock, &fp, &node.name, options.lock_wait, &mut |m| {
            progress.println(m)
        })?;
        let meanwhile = if forced {
            None
        } else {
            match store.lookup(lock, &fp, verify)? {
                Lookup::Hit(hit) => Some(*hit),
                Lookup::Miss(_) => None,
            }
        };
        if let Some(hit) = meanwhile {
            report.status = StageStatus::Cached;
            report.reason = Some("computed meanwhile by another run".to_owned());
            let decided = self.conclude(index, report, hit, stage, &partial, &missing, identity);
            return Ok(Decided { started, ..decided });
        }
        if forced {
            // `--force` starts over: a fine-tune does not resume from its checkpoints (best
            // effort; the folder is vlmpipe's own).
            let _ = std::fs::remove_dir_all(store.root().join("work").join(fp.as_str()));
        }
        progress.println(&format!("running `{}` ({why})", node.name));
        let shard_count = match (stage.sharded(), &partial) {
            (Some(_), None) => options.shards.or(stage.shards()).filter(|&n| n > 1),
            _ => None,
        };
        let run_whole = |compute: &dyn Fn(&mut StageContext<'_>) -> StageResult| {
            run_stage(
                store, lock, &node.name, stage, &fp, &entries, progress, compute,
            )
        };
        let cancelled = || {
            options
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::SeqCst))
        };
        // A stage that loads a model goes to the cluster as one job when the launcher sends
        // stages elsewhere (a fine-tune with its GPUs); a partial one stays here (a worker
        // would compute the whole stage).
        let elsewhere = match (&options.launcher, shard_count, &partial) {
            (Some(launcher), None, None) if stage.uses_device() && launcher.runs_whole_stages() => {
                Some(launcher.as_ref())
            }
            _ => None,
        };
        let ran = match (stage.sharded(), shard_count, elsewhere) {
            (_, _, Some(launcher)) => {
                if forced {
                    // Removed, not only skipped: the worker finds an existing entry and stops.
                    store.remove(lock, &fp)?;
                }
                // The worker takes this entry's lock to compute it; a second run asking for
                // the same stage meanwhile submits too, and its worker finds the entry.
                drop(held);
                let mut jobs = Vec::new();
                let ran = run_whole_elsewhere(
                    store,
                    lock,
                    &node.name,
                    stage.kind(),
                    &fp,
                    progress,
                    launcher,
                    &cancelled,
                    &mut jobs,
                )?;
                report.elsewhere = Some(Elsewhere {
                    launcher: launcher.name().to_owned(),
                    jobs,
                });
                ran
            }
            (Some(sharded), Some(count), None) => {
                let cx = ShardContext {
                    store,
                    lock,
                    name: &node.name,
                    stage,
                    fingerprint: &fp,
                    inputs: &entries,
                    progress,
                    lock_wait: options.lock_wait,
                    forced,
                };
                let launcher: &dyn ShardLauncher = match &options.launcher {
                    Some(launcher) => launcher.as_ref(),
                    None => &LocalLauncher,
                };
                let mut counts = ShardCounts::default();
                let shards = run_shards(&cx, count, launcher, &cancelled, &mut counts)?;
                report.shards = Some(counts);
                match shards {
                    Ok(shards) => run_whole(&|ctx| sharded.merge(ctx, &shards))?,
                    Err(error) => Err(error),
                }
            }
            _ => run_whole(&|ctx| stage.run(ctx))?,
        };
        match ran {
            Ok(entry) => {
                report.status = StageStatus::Ran;
                let decided =
                    self.conclude(index, report, entry, stage, &partial, &missing, identity);
                Ok(Decided { started, ..decided })
            }
            Err(error) => {
                let message = error_chain(error.as_error());
                report.status = StageStatus::Failed;
                report.reason = Some(message.clone());
                let cause = MissingCause::Failed {
                    stage: node.name.clone(),
                    reason: message,
                };
                Ok(Decided {
                    report,
                    state: State::Missing(cause),
                    record: None,
                    started,
                })
            }
        }
    }

    /// A stage that has an entry (ran or cached): its outputs listed, its exports synced, and
    /// the state the stages reading it see.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &self,
        index: usize,
        mut report: StageReport,
        entry: CacheEntry,
        stage: &dyn Stage,
        partial: &Option<Box<dyn Stage>>,
        missing: &[MissingInput],
        identity: StageIdentity,
    ) -> Decided {
        let node = &self.graph.nodes[index];
        fill_outputs(&mut report, &entry);
        for export in stage.exports() {
            if self.options.dry_run {
                // Listed only when they already equal the entry: a dry run writes nothing.
                if exports::is_current(&entry, &export) {
                    report.outputs.push(export.target);
                }
                continue;
            }
            match exports::sync(&entry, &export) {
                Ok(target) => report.outputs.push(target),
                Err(error) => {
                    report.status = StageStatus::Failed;
                    report.reason = Some(error.to_string());
                }
            }
        }
        if partial.is_some() {
            // Its output lacks inputs: nothing downstream may take it for the whole one.
            let cause = MissingCause::Partial {
                stage: node.name.clone(),
                without: missing.iter().map(|m| m.name.clone()).collect(),
            };
            Decided {
                report,
                state: State::Missing(cause),
                record: None,
                started: Instant::now(),
            }
        } else {
            Decided {
                report,
                state: State::Entry(Box::new(entry)),
                record: Some(identity),
                started: Instant::now(),
            }
        }
    }
}

/// What a stage's computation returns.
type StageResult = Result<StageOutcome, StageError>;

/// `` `a`, `b` `` for the names of missing inputs.
fn names(missing: &[MissingInput]) -> String {
    missing
        .iter()
        .map(|m| format!("`{}`", m.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every selected stage's identity, in graph order (`None` for stages `--only` leaves out).
pub(super) fn identities(
    graph: &ExecGraph,
    selected: &[bool],
) -> Vec<Option<Result<StageIdentity, Blocked>>> {
    let mut out = Vec::with_capacity(graph.nodes.len());
    let mut fingerprints: Vec<Option<Fingerprint>> = Vec::with_capacity(graph.nodes.len());
    for (index, node) in graph.nodes.iter().enumerate() {
        let identity = selected[index]
            .then(|| identity_of(graph, node.stage.as_ref(), &node.inputs, &fingerprints));
        fingerprints.push(match &identity {
            Some(Ok(identity)) => Fingerprint::parse(&identity.fingerprint).ok(),
            _ => None,
        });
        out.push(identity);
    }
    out
}

/// The fingerprint of every node whose identity is known (`None` where blocked or unselected).
fn known_fingerprints(
    identities: &[Option<Result<StageIdentity, Blocked>>],
) -> Vec<Option<Fingerprint>> {
    identities
        .iter()
        .map(|identity| match identity {
            Some(Ok(identity)) => Fingerprint::parse(&identity.fingerprint).ok(),
            _ => None,
        })
        .collect()
}

/// Says, before anything runs, every stage whose model or dataset cannot be resolved.
fn announce_blocked(
    graph: &ExecGraph,
    identities: &[Option<Result<StageIdentity, Blocked>>],
    dry_run: bool,
) {
    let blocked: Vec<(&str, &str)> = graph
        .nodes
        .iter()
        .zip(identities)
        .filter_map(|(node, identity)| match identity {
            Some(Err(Blocked::External(reason))) => Some((node.name.as_str(), reason.as_str())),
            _ => None,
        })
        .collect();
    if blocked.is_empty() {
        return;
    }
    let mut text = format!(
        "error: {} stage{} cannot run (found before running anything):\n",
        blocked.len(),
        if blocked.len() == 1 { "" } else { "s" }
    );
    for (name, reason) in &blocked {
        text.push_str(&format!("  `{name}`: {reason}\n"));
    }
    text.push_str(if dry_run {
        "stages that need them would be skipped (a report renders the evals that exist)"
    } else {
        "running the stages that do not need them; a report renders the evals that exist"
    });
    eprintln!("{}", crate::dsl::render::escape_control(&text));
}

/// Which entries to verify fully: those read by a stage that will run. Hashing an input once per
/// run is small next to the stage that reads it (a model over its images), and it stops a
/// silently corrupted big file (same size and mtime) from feeding a new entry; a run where
/// everything is cached hashes nothing extra.
fn read_by_stages_that_run(
    graph: &ExecGraph,
    store: &CacheStore,
    options: &RunOptions,
    identities: &[Option<Result<StageIdentity, Blocked>>],
) -> Vec<bool> {
    let mut full = vec![false; graph.nodes.len()];
    for (node, identity) in graph.nodes.iter().zip(identities) {
        let Some(Ok(identity)) = identity else {
            continue;
        };
        let will_run = options.force.contains(&node.name)
            || Fingerprint::parse(&identity.fingerprint).is_ok_and(|fp| !store.has_entry(&fp));
        if will_run {
            for &i in &node.inputs {
                full[i] = true;
            }
        }
    }
    full
}

/// Runs one stage (`compute`: the stage's `run`, or the merge of its shards) into a fresh entry.
/// The outer error is a cache failure (stops the run); the inner one is the stage's own failure
/// (marks it failed, the run goes on).
#[allow(clippy::too_many_arguments)]
fn run_stage(
    store: &CacheStore,
    lock: &CacheLock,
    name: &str,
    stage: &dyn Stage,
    fp: &Fingerprint,
    inputs: &[CacheEntry],
    progress: &Progress,
    compute: &dyn Fn(&mut StageContext<'_>) -> StageResult,
) -> Result<Result<CacheEntry, StageError>, ExecError> {
    let mut writer = store.begin(lock, fp, name, stage.kind())?;
    writer.set_inputs(inputs.iter().map(|e| e.fingerprint().clone()).collect());
    let out_dir = writer.dir().to_path_buf();
    let work_dir = store.root().join("work").join(fp.as_str());
    let mut ctx = StageContext {
        name,
        inputs,
        out_dir: &out_dir,
        progress,
        work_dir: &work_dir,
    };
    let outcome = match compute(&mut ctx) {
        Ok(outcome) => outcome,
        // Dropping the writer deletes the temp folder: a failed stage leaves no entry.
        Err(error) => return Ok(Err(error)),
    };
    let entry = writer.commit(entry_metadata(&outcome))?;
    // The scratch state is only for resuming; a committed entry supersedes it.
    if work_dir.exists() {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    Ok(Ok(entry))
}

/// The identity (and fingerprint) of `stage` reading `inputs`, or why it cannot be computed.
fn identity_of(
    graph: &ExecGraph,
    stage: &dyn Stage,
    input_nodes: &[usize],
    fingerprints: &[Option<Fingerprint>],
) -> Result<StageIdentity, Blocked> {
    let mut input_fps = Vec::with_capacity(input_nodes.len());
    let mut inputs = BTreeMap::new();
    for &i in input_nodes {
        match fingerprints.get(i).and_then(Option::as_ref) {
            Some(fp) => {
                input_fps.push(fp.clone());
                inputs.insert(graph.nodes[i].name.clone(), fp.as_str().to_owned());
            }
            None => {
                return Err(Blocked::Input(format!(
                    "input `{}` is not available",
                    graph.nodes[i].name
                )));
            }
        }
    }
    let external = stage.external_state().map_err(|e| {
        Blocked::External(format!(
            "cannot read its inputs: {}",
            error_chain(e.as_error())
        ))
    })?;
    let params = stage.params();
    // External state is hashed as part of the parameters so one canonical text covers both.
    let hashed = json!({ "params": params, "external": external });
    let fp = crate::cache::fingerprint(stage.kind(), &hashed, &input_fps, stage.code_version());
    Ok(StageIdentity {
        fingerprint: fp.as_str().to_owned(),
        kind: stage.kind().to_owned(),
        code_version: stage.code_version(),
        params,
        external,
        inputs,
    })
}

fn fill_outputs(report: &mut StageReport, entry: &CacheEntry) {
    report.outputs = entry
        .manifest()
        .files
        .iter()
        .map(|f| entry.path(&f.name))
        .collect();
    let metadata = &entry.manifest().metadata;
    if let Some(warnings) = metadata.get("warnings").and_then(Value::as_array) {
        report.warnings = warnings
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
    }
}

pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

fn validate(graph: &ExecGraph, options: &RunOptions) -> Result<(), ExecError> {
    for (index, node) in graph.nodes.iter().enumerate() {
        if let Some(&bad) = node.inputs.iter().find(|&&i| i >= index) {
            return Err(ExecError::BadGraph {
                stage: node.name.clone(),
                input: bad,
            });
        }
    }
    let names: Vec<&str> = graph.nodes.iter().map(|n| n.name.as_str()).collect();
    for (flag, list) in [("force", &options.force), ("only", &options.only)] {
        for name in list {
            if !names.contains(&name.as_str()) {
                let hint = names
                    .iter()
                    .map(|n| (strsim::jaro_winkler(n, name), *n))
                    .filter(|(score, _)| *score > 0.8)
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, n)| format!(" (did you mean `{n}`?)"))
                    .unwrap_or_default();
                return Err(ExecError::UnknownStage {
                    flag,
                    name: name.clone(),
                    hint,
                });
            }
        }
    }
    Ok(())
}

/// Which nodes run: all, or the `--only` stages and everything they read (transitively).
pub(super) fn selection(graph: &ExecGraph, only: &[String]) -> Vec<bool> {
    if only.is_empty() {
        return vec![true; graph.nodes.len()];
    }
    let mut selected = vec![false; graph.nodes.len()];
    let mut stack: Vec<usize> = graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| only.contains(&n.name))
        .map(|(i, _)| i)
        .collect();
    let mut seen = BTreeSet::new();
    while let Some(i) = stack.pop() {
        if seen.insert(i) {
            selected[i] = true;
            stack.extend(graph.nodes[i].inputs.iter().copied());
        }
    }
    selected
}
