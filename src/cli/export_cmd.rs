//! `vlmpipe export FILE STAGE --merged DIR`: a fine-tune as a standalone Hub-layout checkpoint.
//!
//! The stage is brought up to date first with `run --only STAGE` (instant when cached), so the
//! exported weights always match the pipeline as written; then the adapter is folded into the
//! base weights and the folder is written in the layout transformers and `local(...)` load.

use std::io::Write;

use anyhow::{Context, bail};

use super::Outcome;
use super::args::{ExportArgs, RunArgs};
use super::cache_cmd::cache_root;
use super::check_cmd::load_and_report;
use super::run_cmd;
use crate::cache::{CacheStore, Fingerprint, Lookup, Verify};
use crate::plan::NodeKind;
use crate::stages::model_node::open_model_entry;
use crate::train::PeftAdapter;
use crate::train::merge::merge_checkpoint;

pub(crate) fn export(args: &ExportArgs) -> anyhow::Result<Outcome> {
    let Some(plan) = load_and_report(&args.file, &args.params) else {
        return Ok(Outcome::Problems);
    };
    let Some(node) = plan.find(&args.stage) else {
        bail!(
            "the pipeline has no stage `{}`; its fine-tunes are: {}",
            args.stage,
            finetune_names(&plan)
        );
    };
    if node.kind() != NodeKind::Finetune {
        bail!(
            "`{}` is a `{}` stage; `export --merged` takes a finetune stage (the pipeline's: {})",
            args.stage,
            node.kind().as_str(),
            finetune_names(&plan)
        );
    }
    let run_args = RunArgs {
        file: args.file.clone(),
        params: args.params.clone(),
        cache: args.cache.clone(),
        force: Vec::new(),
        only: vec![args.stage.clone()],
        dry_run: false,
        summary_json: None,
        quiet: args.quiet,
        evals_dir: args.evals_dir.clone(),
        lock_wait: 600.0,
        device: args.device.clone(),
    };
    let summary = run_cmd::execute(&plan, &run_args)?;
    let report = summary.stage(&args.stage);
    let Some(report) = report.filter(|_| summary.success) else {
        // The table says which stage failed and why.
        let mut err = std::io::stderr().lock();
        err.write_all(summary.render_table().as_bytes())?;
        return Ok(Outcome::Problems);
    };

    let root = cache_root(&args.cache, Some(&args.file));
    let store = CacheStore::open(&root)
        .with_context(|| format!("cannot open the cache `{}`", root.display()))?;
    let fingerprint = Fingerprint::parse(&report.fingerprint)?;
    let entry = {
        let lock = store.lock(std::time::Duration::from_secs(600))?;
        match store.lookup(&lock, &fingerprint, Verify::Fast)? {
            Lookup::Hit(entry) => *entry,
            Lookup::Miss(reason) => bail!(
                "the cache entry of `{}` vanished after the run ({reason:?})",
                args.stage
            ),
        }
    };
    let location = open_model_entry(&entry)?;
    let Some(adapter_dir) = location.adapter_dir else {
        bail!("stage `{}` produced no adapter", args.stage);
    };
    let adapter = PeftAdapter::load(&adapter_dir, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot load the adapter `{}`", adapter_dir.display()))?;
    merge_checkpoint(&location.checkpoint_dir, &adapter, &args.merged).with_context(|| {
        format!(
            "cannot merge `{}` into `{}`",
            args.stage,
            args.merged.display()
        )
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", args.merged.display())?;
    Ok(Outcome::Success)
}

/// The finetune stages of `plan`, for messages.
fn finetune_names(plan: &crate::plan::Plan) -> String {
    let names: Vec<String> = plan
        .nodes
        .iter()
        .filter(|n| n.kind() == NodeKind::Finetune)
        .map(|n| format!("`{}`", n.name))
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}
