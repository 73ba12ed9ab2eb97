//! `vlmpipe worker` (hidden): one shard of one stage (`--shard K --of N`), or a whole stage (no
//! `--shard`: a fine-tune sent out as one job), into the cache, for a cluster task; or
//! `--probe PATH`, the check that the cache's filesystem is visible from the worker's machine.
//!
//! Exit status: 0 when the shard's entry is in the cache (computed now or found), or the probe
//! was read and answered; 1 otherwise, with the reason on stderr; 2 for a usage error (clap).

use std::time::Duration;

use anyhow::Context;

use super::Outcome;
use super::args::WorkerArgs;
use super::cache_cmd::cache_root;
use super::check_cmd::load_and_report;
use super::run_cmd::lower_context;
use crate::cache::CacheStore;
use crate::exec::{ShardIndex, ShardOutcome, WorkerRequest, probe, run_worker};
use crate::stages::lower::lower;

pub(crate) fn worker(args: &WorkerArgs) -> anyhow::Result<Outcome> {
    if let Some(path) = &args.probe {
        let host = probe(path)?;
        eprintln!("probe `{}` seen on {host}", path.display());
        return Ok(Outcome::Success);
    }
    // clap's group makes FILE present when there is no probe.
    let Some(file) = &args.file else {
        anyhow::bail!("a pipeline file or `--probe PATH` is required");
    };
    let Some(stage) = &args.stage else {
        anyhow::bail!("`worker FILE` needs `--stage NAME` (and `--shard K --of N` for a shard)");
    };
    let shard = match (args.shard, args.of) {
        (Some(index), Some(count)) => Some(ShardIndex { index, count }),
        (None, None) => None,
        _ => anyhow::bail!("`--shard K` and `--of N` go together"),
    };
    let Some(plan) = load_and_report(file, &args.params) else {
        return Ok(Outcome::Problems);
    };
    let root = cache_root(&args.cache, Some(file));
    let root = std::path::absolute(&root).unwrap_or(root);
    let store = CacheStore::open(&root)
        .with_context(|| format!("cannot open the cache `{}`", root.display()))?;
    let mut ctx = lower_context(&plan, file, None, true);
    ctx.device = super::open_device(&args.device)?;
    let graph = lower(&plan, &ctx)?;
    // First in the task's log: where it ran, and the GPUs the engine gave it (Slurm sets
    // CUDA_VISIBLE_DEVICES to the task's GPUs), which is what one looks for when a job misbehaves.
    let host = crate::exec::host_name();
    let gpus = std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| format!(", GPUs {v}"))
        .unwrap_or_default();
    let what = match shard {
        Some(shard) => format!("`{stage}` shard {shard}"),
        None => format!("`{stage}`"),
    };
    eprintln!("{what}: worker on {host}{gpus}");
    let request = WorkerRequest {
        stage: stage.clone(),
        shard,
        lock_wait: Duration::from_secs_f64(args.lock_wait.max(0.0)),
        quiet: true,
    };
    let outcome = run_worker(&graph, &store, &request)?;
    let said = match outcome {
        ShardOutcome::Found => "found in the cache",
        ShardOutcome::Computed => "computed",
    };
    eprintln!("{what}: {said}");
    Ok(Outcome::Success)
}
