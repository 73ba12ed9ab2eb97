//! One stage's pending shards as a Slurm job array: submit, follow, resubmit, cancel.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use super::commands::SlurmCommands;
use super::error::SlurmError;
use super::interrupt::{Following, interrupted};
use super::settings::SlurmSettings;
use super::state::{
    FinalState, SACCT_FORMAT, SQUEUE_FORMAT, TaskState, parse_sacct, parse_sbatch, parse_scontrol,
    parse_squeue,
};
use crate::file_error::FileError;

/// One word of a task's command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgPart {
    /// Passed as is (single-quoted in the batch script).
    Lit(String),
    /// The task's index, `$SLURM_ARRAY_TASK_ID`.
    TaskIndex,
}

/// What to submit: every task runs `command` with its index.
#[derive(Clone, Debug)]
pub struct ArrayJob<'a> {
    /// The job's name in `squeue` (`vlmpipe:STAGE`).
    pub name: &'a str,
    pub command: &'a [ArgPart],
    /// The task indices to run (a stage's shards without an entry).
    pub indices: &'a [usize],
    /// Where the tasks' logs go (`JOB_TASK.out`); must be on the shared filesystem.
    pub log_dir: &'a Path,
}

/// What happened to a task (reported as it happens).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskEvent {
    /// Submitted, waiting for a node (Slurm's reason, e.g. `Resources`).
    Pending(String),
    Running,
    /// Its work is done (the caller's `is_done` said so).
    Done,
    /// Ended without its work; submitted again (attempt `attempt` of `of`).
    Retrying {
        reason: String,
        attempt: u32,
        of: u32,
    },
    /// Ended without its work, for good.
    Failed(String),
}

/// How a [`run_array`] ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArrayOutcome {
    /// Every job id submitted (the first, then resubmissions).
    pub jobs: Vec<String>,
    pub done: Vec<usize>,
    /// Tasks that ended without their work, with the reason.
    pub failed: Vec<(usize, String)>,
    /// `cancelled` turned true: every job submitted was `scancel`ed.
    pub cancelled: bool,
}

/// A task being followed.
struct Task {
    job: String,
    /// Submissions so far (1 = the first).
    attempts: u32,
    last: Option<TaskEvent>,
}

/// How long to wait for `scancel`ed tasks to leave the queue before returning.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// `squeue` failures in a row tolerated (a busy controller times out now and then).
const SQUEUE_RETRIES: u32 = 10;
/// The first interval between two `squeue`s (it doubles up to the poll interval).
const FIRST_POLL: Duration = Duration::from_millis(100);
/// How often the tasks' work is looked at (a file check each) between two `squeue`s.
const WORK_TICK: Duration = Duration::from_millis(50);

/// Submits `job`'s tasks as one array and follows them until each is done or failed for good,
/// or `cancelled` turns true or Ctrl-C is pressed (then `scancel`s everything submitted and waits
/// until it left the queue). `is_done(index)` is the truth about a task's work (a shard's cache
/// entry), looked at every 50 ms, so a task is done once its work is there, even while Slurm still
/// lists it; without it, a task is done when it left the queue COMPLETED. `report` hears every
/// change of a task's state.
pub fn run_array(
    commands: &SlurmCommands,
    settings: &SlurmSettings,
    job: &ArrayJob<'_>,
    is_done: Option<&dyn Fn(usize) -> bool>,
    report: &mut dyn FnMut(usize, &TaskEvent),
    cancelled: &dyn Fn() -> bool,
) -> Result<ArrayOutcome, SlurmError> {
    let mut outcome = ArrayOutcome::default();
    if job.indices.is_empty() {
        return Ok(outcome);
    }
    // Ctrl-C from here on cancels the tasks instead of leaving them running.
    let _following = Following::enter();
    let cancelled = || cancelled() || interrupted();
    let script = batch_script(job.command);
    let max_attempts = settings.max_retries() + 1;
    let first = submit(commands, settings, job, job.indices, &script)?;
    outcome.jobs.push(first.clone());
    let mut tasks: BTreeMap<usize, Task> = job
        .indices
        .iter()
        .map(|&i| {
            (
                i,
                Task {
                    job: first.clone(),
                    attempts: 1,
                    last: None,
                },
            )
        })
        .collect();
    let mut squeue_failures = 0;
    let poll = settings.poll_interval();
    // `squeue` at once, then at doubling intervals up to `poll`: a short task is seen running
    // (and a failed one resubmitted) quickly, a long one costs the controller little.
    let mut squeue_every = FIRST_POLL.min(poll);
    let mut next_squeue = Instant::now();
    loop {
        if cancelled() {
            cancel_all(commands, &outcome.jobs);
            outcome.cancelled = true;
            return Ok(outcome);
        }
        // The work is the truth, and looking at it is a file check: a task is done as soon as
        // its work is there, not when Slurm has reaped the task and the next `squeue` shows it.
        if let Some(is_done) = is_done {
            let finished: Vec<usize> = tasks.keys().copied().filter(|&i| is_done(i)).collect();
            for index in finished {
                tasks.remove(&index);
                report(index, &TaskEvent::Done);
                outcome.done.push(index);
            }
            if tasks.is_empty() {
                outcome.done.sort_unstable();
                outcome.failed.sort();
                return Ok(outcome);
            }
        }
        let now = Instant::now();
        if now < next_squeue {
            let wait = next_squeue - now;
            thread::sleep(if is_done.is_some() {
                wait.min(WORK_TICK)
            } else {
                wait
            });
            continue;
        }
        next_squeue = now + squeue_every;
        squeue_every = (squeue_every * 2).min(poll);
        let queue = match squeue(commands, &outcome.jobs) {
            Ok(queue) => {
                squeue_failures = 0;
                queue
            }
            Err(_) if squeue_failures < SQUEUE_RETRIES => {
                squeue_failures += 1;
                next_squeue = Instant::now() + poll;
                continue;
            }
            Err(e) => {
                // The tasks keep running without a driver; say so rather than leave them.
                cancel_all(commands, &outcome.jobs);
                return Err(e);
            }
        };
        let mut resubmit = Vec::new();
        let mut ended = Vec::new();
        for (&index, task) in tasks.iter_mut() {
            let line = queue
                .iter()
                .find(|l| l.job == task.job && l.task == Some(index));
            let event = match line {
                Some(l) if l.state.is_active() => {
                    if l.state == TaskState::Pending {
                        TaskEvent::Pending(l.reason.clone())
                    } else {
                        TaskEvent::Running
                    }
                }
                // Gone from the queue, or there in a final state: judge by its work.
                seen => {
                    let ended_as = || {
                        final_state(commands, &task.job, index).or_else(|| {
                            seen.map(|l| FinalState {
                                state: l.state.clone(),
                                exit_code: String::new(),
                                reason: l.reason.clone(),
                            })
                        })
                    };
                    let (done, last) = match is_done {
                        Some(is_done) => (is_done(index), None),
                        None => {
                            let last = ended_as();
                            let done = last
                                .as_ref()
                                .is_some_and(|s| s.state == TaskState::Completed);
                            (done, last)
                        }
                    };
                    if done {
                        TaskEvent::Done
                    } else {
                        let last = last.or_else(ended_as);
                        let reason = failure_reason(job.log_dir, &task.job, index, last.as_ref());
                        let retry = last.as_ref().is_none_or(|s| s.state.is_retryable());
                        if retry && task.attempts < max_attempts {
                            task.attempts += 1;
                            resubmit.push(index);
                            TaskEvent::Retrying {
                                reason,
                                attempt: task.attempts,
                                of: max_attempts,
                            }
                        } else {
                            TaskEvent::Failed(reason)
                        }
                    }
                }
            };
            if task.last.as_ref() != Some(&event) {
                report(index, &event);
                task.last = Some(event.clone());
            }
            match event {
                TaskEvent::Done => {
                    outcome.done.push(index);
                    ended.push(index);
                }
                TaskEvent::Failed(reason) => {
                    outcome.failed.push((index, reason));
                    ended.push(index);
                }
                _ => {}
            }
        }
        for index in ended {
            tasks.remove(&index);
        }
        if !resubmit.is_empty() {
            let id = match submit(commands, settings, job, &resubmit, &script) {
                Ok(id) => id,
                Err(e) => {
                    cancel_all(commands, &outcome.jobs);
                    return Err(e);
                }
            };
            outcome.jobs.push(id.clone());
            for index in resubmit {
                if let Some(task) = tasks.get_mut(&index) {
                    task.job = id.clone();
                    task.last = None;
                }
            }
            squeue_every = FIRST_POLL.min(poll);
            next_squeue = Instant::now() + squeue_every;
        }
        if tasks.is_empty() {
            outcome.done.sort_unstable();
            outcome.failed.sort();
            return Ok(outcome);
        }
    }
}

/// The batch script: runs the command for `$SLURM_ARRAY_TASK_ID` (sent on `sbatch`'s stdin, so
/// no script file is left behind).
pub(crate) fn batch_script(command: &[ArgPart]) -> String {
    let words: Vec<String> = command
        .iter()
        .map(|part| match part {
            ArgPart::Lit(text) => shell_quote(text),
            ArgPart::TaskIndex => "\"$SLURM_ARRAY_TASK_ID\"".to_string(),
        })
        .collect();
    format!(
        "#!/bin/sh\n# Written by vlmpipe: one task of a job array.\nexec {}\n",
        words.join(" ")
    )
}

/// `'text'` with every `'` written as `'\''`.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The `sbatch` arguments for `indices` of `job` (the script comes on stdin).
pub(crate) fn sbatch_args(
    settings: &SlurmSettings,
    job: &ArrayJob<'_>,
    indices: &[usize],
) -> Vec<String> {
    let list: Vec<String> = indices.iter().map(usize::to_string).collect();
    let mut array = format!("--array={}", list.join(","));
    if let Some(k) = settings.max_parallel {
        array.push_str(&format!("%{k}"));
    }
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name={}", job.name),
        array,
        format!("--output={}", log_path(job.log_dir, "%A", "%a").display()),
        // One process per task; `sbatch` also refuses `--gpus-per-task` without a task count.
        "--ntasks=1".to_string(),
    ];
    if let Some(p) = &settings.partition {
        args.push(format!("--partition={p}"));
    }
    if let Some(n) = settings.cpus_per_task {
        args.push(format!("--cpus-per-task={n}"));
    }
    if let Some(n) = settings.gpus_per_task {
        args.push(format!("--gpus-per-task={n}"));
    }
    // Last, so a user's argument overrides what vlmpipe chose.
    args.extend(settings.sbatch_args.iter().cloned());
    args
}

fn log_path(dir: &Path, job: &str, task: &str) -> PathBuf {
    dir.join(format!("{job}_{task}.out"))
}

fn submit(
    commands: &SlurmCommands,
    settings: &SlurmSettings,
    job: &ArrayJob<'_>,
    indices: &[usize],
    script: &str,
) -> Result<String, SlurmError> {
    std::fs::create_dir_all(job.log_dir).map_err(FileError::create(job.log_dir))?;
    parse_sbatch(&commands.sbatch(sbatch_args(settings, job, indices), script)?)
}

fn squeue(
    commands: &SlurmCommands,
    jobs: &[String],
) -> Result<Vec<super::state::QueueLine>, SlurmError> {
    let out = commands.squeue([
        "--noheader".to_string(),
        "--array".to_string(),
        format!("--jobs={}", jobs.join(",")),
        format!("--format={SQUEUE_FORMAT}"),
    ]);
    match out {
        Ok(out) => parse_squeue(&out),
        // Every job already purged from the controller: an empty queue, not an error.
        Err(SlurmError::Command { stderr, .. }) if stderr.contains("Invalid job id") => {
            Ok(Vec::new())
        }
        Err(e) => Err(e),
    }
}

/// How task `index` of `job` ended: `sacct` where accounting is on, else `scontrol`.
fn final_state(commands: &SlurmCommands, job: &str, index: usize) -> Option<FinalState> {
    let id = format!("{job}_{index}");
    commands
        .sacct([
            "--parsable2".to_string(),
            "--noheader".to_string(),
            format!("--format={SACCT_FORMAT}"),
            format!("--jobs={id}"),
        ])
        .and_then(|out| parse_sacct(&out, &id))
        .or_else(|| {
            commands
                .scontrol(["show", "job", "-o", &id])
                .and_then(|out| parse_scontrol(&out))
        })
}

/// "task 3 (job 17_3) FAILED, exit 1:0: error: …" from its final state and its log's last error.
fn failure_reason(log_dir: &Path, job: &str, index: usize, last: Option<&FinalState>) -> String {
    let mut text = format!("task {index} (job {job}_{index})");
    match last {
        Some(s) => {
            text.push_str(&format!(" {}", s.state));
            if !s.exit_code.is_empty() && s.exit_code != "0:0" {
                text.push_str(&format!(", exit {}", s.exit_code));
            }
            if !s.reason.is_empty() && s.reason != "None" && s.reason != "NonZeroExitCode" {
                text.push_str(&format!(", {}", s.reason));
            }
        }
        None => {
            text.push_str(" left the queue without its result (Slurm no longer knows how it ended)")
        }
    }
    let log = log_path(log_dir, job, &index.to_string());
    if let Some(line) = last_error_line(&log) {
        text.push_str(&format!(": {line}"));
    }
    if let Some(s) = last {
        text.push_str(s.state.hint());
    }
    text.push_str(&format!(" [log: {}]", log.display()));
    text
}

/// The last `error:` line of a task's log, else its last line.
fn last_error_line(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .iter()
        .rev()
        .find(|l| l.starts_with("error:") || l.contains("error:"))
        .or(lines.last())
        .map(|l| l.chars().take(400).collect())
}

/// `scancel`s every job submitted, then waits (bounded) until none is in the queue, so no
/// worker is left writing when the driver returns.
fn cancel_all(commands: &SlurmCommands, jobs: &[String]) {
    if jobs.is_empty() {
        return;
    }
    let _ = commands.scancel(jobs);
    let start = std::time::Instant::now();
    while start.elapsed() < CANCEL_WAIT {
        match squeue(commands, jobs) {
            Ok(queue) if queue.is_empty() => return,
            Err(_) => return,
            Ok(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_script_quotes_words_and_takes_the_task_id_from_slurm() {
        let command = [
            ArgPart::Lit("/opt/vlm pipe/vlmpipe".into()),
            ArgPart::Lit("worker".into()),
            ArgPart::Lit("it's.vp".into()),
            ArgPart::Lit("--shard".into()),
            ArgPart::TaskIndex,
        ];
        let script = batch_script(&command);
        assert!(script.starts_with("#!/bin/sh\n"), "{script}");
        assert!(
            script.ends_with(
                "exec '/opt/vlm pipe/vlmpipe' 'worker' 'it'\\''s.vp' '--shard' \"$SLURM_ARRAY_TASK_ID\"\n"
            ),
            "{script}"
        );
    }

    #[test]
    fn sbatch_args_carry_the_settings_with_user_arguments_last() {
        let settings = SlurmSettings {
            partition: Some("gpu".into()),
            gpus_per_task: Some(1),
            cpus_per_task: Some(8),
            max_parallel: Some(2),
            sbatch_args: vec!["--time=01:00:00".into()],
            ..SlurmSettings::default()
        };
        let job = ArrayJob {
            name: "vlmpipe:eval",
            command: &[],
            indices: &[0, 1, 3],
            log_dir: Path::new("/shared/cache/slurm"),
        };
        assert_eq!(
            sbatch_args(&settings, &job, &[1, 3]),
            [
                "--parsable",
                "--job-name=vlmpipe:eval",
                "--array=1,3%2",
                "--output=/shared/cache/slurm/%A_%a.out",
                "--ntasks=1",
                "--partition=gpu",
                "--cpus-per-task=8",
                "--gpus-per-task=1",
                "--time=01:00:00",
            ]
        );
    }

    #[test]
    fn failure_reason_names_the_task_state_exit_and_the_logs_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("9_2.out"),
            "loading\nerror: the inputs of `eval` are not in the cache\n\n",
        )
        .unwrap();
        let last = FinalState {
            state: TaskState::Failed,
            exit_code: "1:0".into(),
            reason: "NonZeroExitCode".into(),
        };
        let text = failure_reason(dir.path(), "9", 2, Some(&last));
        assert!(
            text.starts_with(
                "task 2 (job 9_2) FAILED, exit 1:0: error: the inputs of `eval` are not in the cache"
            ),
            "{text}"
        );
        let cancelled = FinalState {
            state: TaskState::Cancelled,
            exit_code: "0:15".into(),
            reason: "None".into(),
        };
        let text = failure_reason(dir.path(), "9", 5, Some(&cancelled));
        assert!(
            text.contains("CANCELLED") && text.contains("not resubmitted"),
            "{text}"
        );
    }
}
