//! `vlmpipe run`: check, lower, execute against the cache, print the summary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::Outcome;
use super::args::RunArgs;
use super::cache_cmd::cache_root;
use super::check_cmd::load_and_report;
use crate::cache::CacheStore;
use crate::exec::{self, RunOptions, RunSummary, StageReport, StageStatus};
use crate::hub::{Hub, HubConfig};
use crate::plan::Plan;
use crate::stages::eval::{METRICS_FILE, Metrics, REPORT_FILE, read_metrics_json};
use crate::stages::lower::{LowerContext, lower};
use crate::stages::report::headline_table;

pub(crate) fn run(args: &RunArgs) -> anyhow::Result<Outcome> {
    let Some(plan) = load_and_report(&args.file, &args.params) else {
        return Ok(Outcome::Problems);
    };
    let summary = execute(&plan, args)?;
    report(&summary, args)
}

/// Lowers and runs `plan` with `args`' cache and options.
pub(crate) fn execute(plan: &Plan, args: &RunArgs) -> anyhow::Result<RunSummary> {
    execute_cancellable(plan, args, None)
}

/// [`execute`], skipping the stages not yet started once `cancel` is set (`watch`).
pub(crate) fn execute_cancellable(
    plan: &Plan,
    args: &RunArgs,
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) -> anyhow::Result<RunSummary> {
    // Absolute, so the summary's output paths mean the same from any working directory.
    let root = cache_root(&args.cache, Some(&args.file));
    let root = std::path::absolute(&root).unwrap_or(root);
    let store = CacheStore::open(&root)
        .with_context(|| format!("cannot open the cache `{}`", root.display()))?;
    // A dry run loads no model, so it needs no device (and must not fail for want of one).
    let device = if args.dry_run {
        candle_core::Device::Cpu
    } else {
        super::open_device(&args.device)?
    };
    let mut ctx = lower_context(plan, &args.file, args.evals_dir.clone(), args.quiet);
    ctx.device = device;
    let graph = lower(plan, &ctx)?;
    let options = RunOptions {
        force: args.force.clone(),
        only: args.only.clone(),
        dry_run: args.dry_run,
        lock_wait: Duration::from_secs_f64(args.lock_wait.max(0.0)),
        quiet: args.quiet,
        cancel,
        shards: args.shards.map(|n| n as usize),
        launcher: super::executor::launcher(args, &root, plan.settings.executor.as_ref())?,
        jobs: args.jobs.map(|n| n as usize),
    };
    Ok(exec::run(&graph, &store, &options)?)
}

/// What lowering needs to know about this machine for `plan`, read from `file`'s location (on
/// the CPU; callers that run models set `device`).
pub(crate) fn lower_context<'a>(
    plan: &'a Plan,
    file: &Path,
    evals_dir: Option<PathBuf>,
    quiet: bool,
) -> LowerContext<'a> {
    let pipeline_dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let evals_dir =
        evals_dir.unwrap_or_else(|| pipeline_dir.join("evals").join(&plan.settings.name));
    let mut hub_config = HubConfig::from_env();
    hub_config.progress = !quiet;
    LowerContext {
        plan,
        pipeline_dir,
        evals_dir,
        hub: Hub::new(hub_config),
        threads: 0,
        device: candle_core::Device::Cpu,
    }
}

/// Prints the summary table (stdout), writes `--summary-json`, and maps failures to exit 1.
pub(crate) fn report(summary: &RunSummary, args: &RunArgs) -> anyhow::Result<Outcome> {
    {
        let mut out = std::io::stdout().lock();
        out.write_all(summary.render_table().as_bytes())?;
        if !summary.dry_run {
            out.write_all(results(summary).as_bytes())?;
        }
        out.flush()?;
    }
    if let Some(path) = &args.summary_json {
        let text = serde_json::to_string_pretty(summary)?;
        write_atomically(path, text.as_bytes())
            .with_context(|| format!("cannot write the summary `{}`", path.display()))?;
    }
    Ok(if summary.success {
        Outcome::Success
    } else {
        Outcome::Problems
    })
}

/// What a person looks for after a run: each eval's headline metrics and where the HTML reports
/// are (the exports under `evals/`, which the executor keeps equal to the entries).
pub(crate) fn results(summary: &RunSummary) -> String {
    let done = |s: &&StageReport| matches!(s.status, StageStatus::Ran | StageStatus::Cached);
    let file = |stage: &StageReport, name: &str| {
        // Entry files come first in `outputs`, exports last: prefer the export.
        stage
            .outputs
            .iter()
            .rev()
            .find(|p| p.file_name().is_some_and(|f| f == name))
            .cloned()
    };
    let metrics: Vec<(String, Metrics)> = summary
        .stages
        .iter()
        .filter(done)
        .filter(|s| s.kind == "eval")
        .filter_map(|s| {
            let metrics = read_metrics_json(&file(s, METRICS_FILE)?).ok()?;
            Some((s.name.clone(), metrics))
        })
        .collect();
    let mut out = String::new();
    if !metrics.is_empty() {
        let rows: Vec<(&str, &Metrics)> = metrics.iter().map(|(n, m)| (n.as_str(), m)).collect();
        out.push('\n');
        out.push_str(&headline_table(&rows));
    }
    let pages: Vec<(&str, PathBuf)> = summary
        .stages
        .iter()
        .filter(done)
        .filter_map(|s| Some((s.name.as_str(), file(s, REPORT_FILE)?)))
        .collect();
    if !pages.is_empty() {
        out.push_str("\nreports:\n");
        let width = pages.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        for (name, path) in pages {
            out.push_str(&format!("  {name:<width$}  {}\n", path.display()));
        }
    }
    // The files an `export` stage wrote, each once (its copy beside the evals when there is one).
    let mut shipped: Vec<(&str, PathBuf)> = Vec::new();
    for stage in summary
        .stages
        .iter()
        .filter(done)
        .filter(|s| s.kind == "export")
    {
        let mut names: Vec<&std::ffi::OsStr> = Vec::new();
        for path in &stage.outputs {
            if let Some(name) = path
                .file_name()
                .filter(|n| Path::new(n).extension() == Some("gguf".as_ref()))
                && !names.contains(&name)
            {
                names.push(name);
                if let Some(path) = file(stage, &name.to_string_lossy()) {
                    shipped.push((stage.name.as_str(), path));
                }
            }
        }
    }
    if !shipped.is_empty() {
        out.push_str("\nexports:\n");
        let width = shipped.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
        for (name, path) in shipped {
            out.push_str(&format!("  {name:<width$}  {}\n", path.display()));
        }
    }
    out
}

/// Writes via a sibling temp file and a rename, so a reader never sees half a summary.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
