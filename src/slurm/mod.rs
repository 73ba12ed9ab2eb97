//! Slurm as the engine for sharded stages: the shards of a ready stage go to the cluster as one
//! job array, each task running `vlmpipe worker` on its shard against the shared cache, and the
//! driver follows them until every shard's entry is there. (The executor's shard seam and the
//! worker command come from issue 16's sharding work; until they land, this module is the
//! Slurm side alone, tested with plain shell tasks in `tests/it/slurm.rs`.)
//!
//! The pieces, in the order a run meets them:
//! - [`SlurmSettings`] (`settings`): partition, GPUs and CPUs per task, `%K` throttle, extra
//!   `sbatch` arguments, retries; from flags over a profile file (`vlmpipe.toml`), so the
//!   pipeline file itself names no cluster.
//! - `preflight`: before the long work, `sbatch` on PATH, the partition known to `sinfo`, and a
//!   probe job that reads a file the driver wrote into the cache (the cache must be on a
//!   filesystem the workers see).
//! - `array`: `sbatch --array=…%K --parsable` with the batch script on stdin, then `squeue`
//!   (`--noheader`, fixed `--format`) at doubling intervals up to the poll interval; a task is
//!   done when its cache entry (the truth) is there, looked at every 50 ms, even while Slurm still
//!   lists it; one that left the queue without it is judged by `sacct --parsable2` (or
//!   `scontrol show job` where accounting is off) and its log's last error line. Failed, preempted and node-failed
//!   tasks are resubmitted a bounded number of times, saying why; a task someone `scancel`ed, or
//!   one that ran out of time or memory, is not (it would fail the same way).
//! - `interrupt`: Ctrl-C while tasks are out `scancel`s every job submitted; a worker killed
//!   midway leaves no entry (entries are renamed into place complete), so the cache stays
//!   consistent and a rerun submits only the missing shards.
//!
//! Nothing here schedules: Slurm does. The driver only submits, watches and cancels.

mod array;
mod commands;
mod error;
mod interrupt;
mod launcher;
mod preflight;
mod settings;
mod state;

pub use array::{ArgPart, ArrayJob, ArrayOutcome, TaskEvent, run_array};
pub use commands::SlurmCommands;
pub use error::SlurmError;
pub use interrupt::interrupted;
pub use launcher::{SlurmLauncher, WorkerCommand};
pub use preflight::{check_partition, forget_probe, probe_cache, run_probe_job};
pub use settings::{Executor, Profile, SlurmSettings};
pub use state::TaskState;
