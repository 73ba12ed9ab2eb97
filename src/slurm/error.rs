//! [`SlurmError`]: what can stop the Slurm engine, each with the fix.

use std::path::PathBuf;

use crate::file_error::FileError;

/// An error of the Slurm engine (the tasks' own failures are [`super::TaskEvent::Failed`]).
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    /// A Slurm client command is missing.
    #[error(
        "`{command}` is not on PATH: `--executor slurm` needs Slurm's client commands (sbatch, squeue, scancel, sinfo); run vlmpipe on a login node of the cluster, add Slurm's `bin` folder to PATH, or leave out `--executor slurm` to run here"
    )]
    NotInstalled { command: &'static str },
    /// A Slurm command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// A Slurm command ran but found no controller to talk to (no cluster configured or running).
    #[error(
        "`{command}` cannot reach a Slurm controller ({detail}); start the cluster's slurmctld or point SLURM_CONF at its slurm.conf (on a cluster's login node both are already so), or leave out `--executor slurm` to run here"
    )]
    NoController { command: String, detail: String },
    /// A Slurm command printed what it should not.
    #[error("cannot read the output of `{command}`: {what} in {line:?}")]
    Parse {
        command: String,
        what: &'static str,
        line: String,
    },
    /// `--partition` names no partition of this cluster.
    #[error(
        "partition `{partition}` does not exist on this cluster (`sinfo` lists: {known}); give one of those to `--partition` (or `partition` in the profile), or leave it out for the cluster's default"
    )]
    NoPartition { partition: String, known: String },
    /// The probe job could not read what the driver wrote into the cache.
    #[error(
        "the cache `{}` is not visible to the Slurm workers: probe job {job} ended {state} without reading the probe file the driver wrote there{detail}; put the cache on the cluster's shared filesystem, the one every node mounts (`--cache-dir /shared/…` or VLMPIPE_CACHE)",
        cache.display()
    )]
    CacheInvisible {
        cache: PathBuf,
        job: String,
        state: String,
        detail: String,
    },
    /// The probe job did not finish in time.
    #[error(
        "probe job {job} did not finish within {seconds} s (last state: {state}); the partition may have no free node: retry later, or raise `probe-timeout` in the profile"
    )]
    ProbeTimeout {
        job: String,
        seconds: u64,
        state: String,
    },
    /// The profile file is not valid.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Profile {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error(transparent)]
    File(#[from] FileError),
}
