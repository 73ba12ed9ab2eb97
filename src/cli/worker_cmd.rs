//! `vlmpipe worker` (hidden): one shard of one stage into the cache, for a cluster task; or
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
    let (Some(stage), Some(index), Some(count)) = (&args.stage, args.shard, args.of) else {
        anyhow::bail!("`worker FILE` needs `--stage NAME --shard K --of N`");
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
    let request = WorkerRequest {
        stage: stage.clone(),
        shard: ShardIndex { index, count },
        lock_wait: Duration::from_secs_f64(args.lock_wait.max(0.0)),
        quiet: true,
    };
    let outcome = run_worker(&graph, &store, &request)?;
    let said = match outcome {
        ShardOutcome::Found => "found in the cache",
        ShardOutcome::Computed => "computed",
    };
    eprintln!("`{stage}` shard {index}/{count}: {said}");
    Ok(Outcome::Success)
}
