//! Task states as Slurm prints them, and the parsers of `squeue`, `sacct` and `scontrol` lines.

use std::fmt;

use super::error::SlurmError;

/// The state of one array task (Slurm's `JOB_STATE_*` names, `%T` in `squeue`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskState {
    Pending,
    Running,
    /// Still in the queue: configuring, completing, suspended, requeued, resizing, stopped…
    Active(String),
    Completed,
    Failed,
    Cancelled,
    Preempted,
    NodeFail,
    BootFail,
    Timeout,
    OutOfMemory,
    Deadline,
    /// A final state this version does not know.
    Other(String),
}

impl TaskState {
    /// Parses a state as `squeue %T`, `sacct State` or `scontrol JobState` print it
    /// (`sacct` adds "by UID" to a cancellation).
    pub fn parse(text: &str) -> TaskState {
        let word = text.split_whitespace().next().unwrap_or("");
        match word.to_ascii_uppercase().as_str() {
            "PENDING" | "PD" => TaskState::Pending,
            "RUNNING" | "R" => TaskState::Running,
            "COMPLETED" | "CD" => TaskState::Completed,
            "FAILED" | "F" => TaskState::Failed,
            "CANCELLED" | "CA" => TaskState::Cancelled,
            "PREEMPTED" | "PR" => TaskState::Preempted,
            "NODE_FAIL" | "NF" => TaskState::NodeFail,
            "BOOT_FAIL" | "BF" => TaskState::BootFail,
            "TIMEOUT" | "TO" => TaskState::Timeout,
            "OUT_OF_MEMORY" | "OOM" => TaskState::OutOfMemory,
            "DEADLINE" | "DL" => TaskState::Deadline,
            "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED" | "REQUEUE_FED"
            | "REQUEUE_HOLD" | "RESIZING" | "STOPPED" | "SIGNALING" | "STAGE_OUT"
            | "RESV_DEL_HOLD" | "SPECIAL_EXIT" | "CF" | "CG" | "S" | "RQ" | "RS" | "ST" => {
                TaskState::Active(word.to_string())
            }
            _ => TaskState::Other(word.to_string()),
        }
    }

    /// Whether the task is still Slurm's to run (in the queue, not finished).
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            TaskState::Pending | TaskState::Running | TaskState::Active(_)
        )
    }

    /// Whether a task that ended in this state without its entry is worth another try: a crash,
    /// a preemption or a lost node may not recur; a cancellation by someone, or running out of
    /// time or memory, would end the same way.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            TaskState::Failed
                | TaskState::Preempted
                | TaskState::NodeFail
                | TaskState::BootFail
                | TaskState::Completed
                | TaskState::Other(_)
        )
    }

    /// What to do about a task that ended this way, when there is something to say.
    pub fn hint(&self) -> &'static str {
        match self {
            TaskState::Cancelled => {
                " (cancelled outside vlmpipe, so not resubmitted; rerun to compute it)"
            }
            TaskState::Timeout => " (give it more time: `--sbatch-arg=--time=HH:MM:SS`)",
            TaskState::OutOfMemory => " (give it more memory: `--sbatch-arg=--mem=…`)",
            TaskState::Deadline => " (its `--deadline` passed)",
            _ => "",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            TaskState::Pending => "PENDING",
            TaskState::Running => "RUNNING",
            TaskState::Active(s) | TaskState::Other(s) => s,
            TaskState::Completed => "COMPLETED",
            TaskState::Failed => "FAILED",
            TaskState::Cancelled => "CANCELLED",
            TaskState::Preempted => "PREEMPTED",
            TaskState::NodeFail => "NODE_FAIL",
            TaskState::BootFail => "BOOT_FAIL",
            TaskState::Timeout => "TIMEOUT",
            TaskState::OutOfMemory => "OUT_OF_MEMORY",
            TaskState::Deadline => "DEADLINE",
        };
        f.write_str(name)
    }
}

/// The `squeue` format the parser reads: job id (`JOB_TASK` for an array task; `%a` prints
/// `(null)` for tasks not yet split off), state, reason.
pub(crate) const SQUEUE_FORMAT: &str = "%i|%T|%r";

/// One line of `squeue --noheader --array --format=%A|%a|%T|%r`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct QueueLine {
    pub job: String,
    /// `None` for a job that is not an array.
    pub task: Option<usize>,
    pub state: TaskState,
    /// Why it waits (`Resources`, `Priority`, `JobArrayTaskLimit`…); `None` prints as "None".
    pub reason: String,
}

pub(crate) fn parse_squeue(output: &str) -> Result<Vec<QueueLine>, SlurmError> {
    let bad = |what, line: &str| SlurmError::Parse {
        command: "squeue".into(),
        what,
        line: line.to_string(),
    };
    let mut lines = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split('|').collect();
        let [id, state, reason] = fields[..] else {
            return Err(bad("expected 3 `|`-separated fields", line));
        };
        let (job, tasks) = match id.split_once('_') {
            None => (id, vec![None]),
            Some((job, tasks)) => {
                let tasks = parse_task_ids(tasks)
                    .ok_or_else(|| bad("a task id that is not a number or a range", line))?;
                (job, tasks.into_iter().map(Some).collect())
            }
        };
        for task in tasks {
            lines.push(QueueLine {
                job: job.to_string(),
                task,
                state: TaskState::parse(state),
                reason: reason.to_string(),
            });
        }
    }
    Ok(lines)
}

/// `3`, or a not yet split pending record `[0-2,5%2]`, as task indices.
fn parse_task_ids(text: &str) -> Option<Vec<usize>> {
    let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) else {
        return Some(vec![text.parse().ok()?]);
    };
    let inner = inner.split('%').next()?;
    let mut ids = Vec::new();
    for part in inner.split(',') {
        match part.split_once('-') {
            Some((a, b)) => ids.extend(a.parse::<usize>().ok()?..=b.parse::<usize>().ok()?),
            None => ids.push(part.parse().ok()?),
        }
    }
    Some(ids)
}

/// How a task ended, from `sacct` or `scontrol`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FinalState {
    pub state: TaskState,
    /// `code:signal`, as Slurm prints it.
    pub exit_code: String,
    pub reason: String,
}

/// The `sacct` fields the parser reads, in order.
pub(crate) const SACCT_FORMAT: &str = "JobID,State,ExitCode,Reason";

/// The allocation line of `sacct --parsable2 --noheader --format=JobID,State,ExitCode,Reason -j
/// JOB_TASK` (steps such as `JOB_TASK.batch` are passed over).
pub(crate) fn parse_sacct(output: &str, job_task: &str) -> Option<FinalState> {
    output.lines().find_map(|line| {
        let fields: Vec<&str> = line.trim().split('|').collect();
        match fields[..] {
            [id, state, exit, reason, ..] if id == job_task => Some(FinalState {
                state: TaskState::parse(state),
                exit_code: exit.to_string(),
                reason: reason.to_string(),
            }),
            _ => None,
        }
    })
}

/// `scontrol show job -o JOB_TASK`: one line of `Key=Value` pairs (values hold no spaces for
/// the keys read here).
pub(crate) fn parse_scontrol(output: &str) -> Option<FinalState> {
    let line = output.lines().find(|l| l.contains("JobState="))?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    };
    Some(FinalState {
        state: TaskState::parse(&field("JobState")?),
        exit_code: field("ExitCode").unwrap_or_default(),
        reason: field("Reason").unwrap_or_default(),
    })
}

/// The job id `sbatch --parsable` printed (`ID` or `ID;CLUSTER`).
pub(crate) fn parse_sbatch(output: &str) -> Result<String, SlurmError> {
    let line = output.lines().map(str::trim).find(|l| !l.is_empty());
    let id = line.and_then(|l| l.split(';').next()).unwrap_or("");
    if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
        Ok(id.to_string())
    } else {
        Err(SlurmError::Parse {
            command: "sbatch --parsable".into(),
            what: "expected a job id",
            line: output.trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_name_job_task_state_and_reason() {
        let out = "17_0|RUNNING|None\n17_3|PENDING|JobArrayTaskLimit\n\n20|COMPLETING|None\n21_[1-2,4%2]|PENDING|Priority\n";
        let lines = parse_squeue(out).unwrap();
        assert_eq!(lines.len(), 6);
        let pending: Vec<_> = lines[3..]
            .iter()
            .map(|l| (l.job.as_str(), l.task))
            .collect();
        assert_eq!(pending, [("21", Some(1)), ("21", Some(2)), ("21", Some(4))]);
        assert_eq!(lines[0].job, "17");
        assert_eq!(lines[0].task, Some(0));
        assert_eq!(lines[0].state, TaskState::Running);
        assert_eq!(lines[1].task, Some(3));
        assert_eq!(lines[1].state, TaskState::Pending);
        assert_eq!(lines[1].reason, "JobArrayTaskLimit");
        assert_eq!(lines[2].task, None);
        assert!(lines[2].state.is_active());
    }

    #[test]
    fn squeue_lines_of_another_shape_are_an_error_naming_the_line() {
        let err = parse_squeue("17 0 RUNNING").unwrap_err().to_string();
        assert!(
            err.contains("squeue") && err.contains("17 0 RUNNING"),
            "{err}"
        );
        let err = parse_squeue("17_x|RUNNING|None").unwrap_err().to_string();
        assert!(err.contains("not a number"), "{err}");
    }

    #[test]
    fn sacct_reads_the_allocation_line_of_the_task_not_its_steps() {
        let out =
            "42_3|CANCELLED by 0|0:15|None\n42_3.batch|CANCELLED|0:15|\n42_4|COMPLETED|0:0|None\n";
        let state = parse_sacct(out, "42_3").unwrap();
        assert_eq!(state.state, TaskState::Cancelled);
        assert_eq!(state.exit_code, "0:15");
        assert_eq!(
            parse_sacct(out, "42_4").unwrap().state,
            TaskState::Completed
        );
        assert_eq!(parse_sacct(out, "42_5"), None);
    }

    #[test]
    fn scontrol_one_liner_gives_state_exit_code_and_reason() {
        let out = "JobId=5 ArrayJobId=4 ArrayTaskId=1 JobName=vlmpipe JobState=FAILED Reason=NonZeroExitCode Dependency=(null) ExitCode=1:0 RunTime=00:00:01";
        let state = parse_scontrol(out).unwrap();
        assert_eq!(state.state, TaskState::Failed);
        assert_eq!(state.exit_code, "1:0");
        assert_eq!(state.reason, "NonZeroExitCode");
        assert_eq!(
            parse_scontrol("slurm_load_jobs error: Invalid job id specified"),
            None
        );
    }

    #[test]
    fn sbatch_parsable_id_with_or_without_cluster() {
        assert_eq!(parse_sbatch("123\n").unwrap(), "123");
        assert_eq!(parse_sbatch("123;cluster\n").unwrap(), "123");
        assert!(parse_sbatch("sbatch: error: Batch job submission failed").is_err());
    }

    #[test]
    fn retry_policy_resubmits_crashes_and_preemptions_only() {
        for s in ["FAILED", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL"] {
            assert!(TaskState::parse(s).is_retryable(), "{s}");
        }
        for s in ["CANCELLED by 0", "TIMEOUT", "OUT_OF_MEMORY", "DEADLINE"] {
            let state = TaskState::parse(s);
            assert!(!state.is_retryable(), "{s}");
            assert!(!state.hint().is_empty(), "{s}");
        }
        assert!(TaskState::parse("PENDING").is_active());
        assert!(TaskState::parse("REQUEUED").is_active());
        assert!(!TaskState::parse("COMPLETED").is_active());
    }
}
