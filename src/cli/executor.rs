//! `--executor`: where the shards of `vlmpipe run` are computed, from flags over a profile file.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use super::args::RunArgs;
use crate::exec::ShardLauncher;
use crate::plan::ExecutorSettings;
use crate::slurm::{Executor, Profile, SlurmLauncher, SlurmSettings, WorkerCommand};

/// The launcher `args` ask for (`None`: the executor's own, in this process). For Slurm this
/// runs the checks of [`SlurmLauncher::connect`] first, so bad settings fail in seconds.
/// Flags win over the pipeline file's `executor slurm { ... }`, which wins over the profile.
pub(crate) fn launcher(
    args: &RunArgs,
    cache: &Path,
    pipeline: Option<&ExecutorSettings>,
) -> anyhow::Result<Option<Arc<dyn ShardLauncher>>> {
    let flags = &args.cluster;
    let profile = Profile::find(flags.profile.as_deref(), &args.file)?;
    let (profile_executor, profile_settings) = match profile {
        Some((_, p)) => (p.executor, p.slurm),
        None => (None, Default::default()),
    };
    let pipeline_executor = pipeline.and_then(|p| p.active).map(|active| {
        if active {
            Executor::Slurm
        } else {
            Executor::Local
        }
    });
    let executor = flags
        .executor
        .or(pipeline_executor)
        .or(profile_executor)
        .unwrap_or_default();
    if args.dry_run || executor == Executor::Local {
        return Ok(None);
    }
    let settings = profile_settings
        .overlaid_with(pipeline.map(slurm_settings).unwrap_or_default())
        .overlaid_with(flags.slurm_settings());
    let exe =
        std::env::current_exe().context("cannot find the vlmpipe binary to run on the workers")?;
    let file = std::path::absolute(&args.file).unwrap_or_else(|_| args.file.clone());
    let mut worker_args = Vec::new();
    for (name, value) in &args.params.set {
        worker_args.push(format!("--set={name}={value}"));
    }
    for path in &args.params.allow_read {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        worker_args.push(format!("--allow-read={}", path.display()));
    }
    worker_args.push(format!("--device={}", args.device.device));
    worker_args.push(format!("--lock-wait={}", args.lock_wait));
    let worker = WorkerCommand {
        exe,
        file,
        args: worker_args,
    };
    let launcher = SlurmLauncher::connect(settings, worker, cache)?;
    Ok(Some(Arc::new(launcher)))
}

/// The Slurm settings of a pipeline file's `executor slurm { ... }`.
fn slurm_settings(block: &ExecutorSettings) -> SlurmSettings {
    SlurmSettings {
        partition: block.partition.clone(),
        gpus_per_task: block.gpus_per_task,
        cpus_per_task: block.cpus_per_task,
        max_parallel: block.max_parallel,
        sbatch_args: block.sbatch_args.clone(),
        max_retries: block.max_retries,
        probe_timeout: block.probe_timeout,
        poll_interval: block.poll_interval,
    }
}
