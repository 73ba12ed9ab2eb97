//! `vlmpipe export FILE STAGE --merged DIR`: a fine-tune (or a model with `adapter:`) as a
//! standalone Hub-layout checkpoint.
//!
//! The destination is checked first (a folder with files vlmpipe did not write is refused before
//! minutes of training), then the stage is brought up to date with `run --only STAGE` (instant
//! when cached), so the exported weights always match the pipeline as written; then the adapter
//! is folded into the base weights in f32 and the folder is written in the layout transformers
//! and `local(...)` load, in `--dtype`, with a report of what that dtype's rounding changed.

use std::io::Write;

use anyhow::{Context, bail};

use super::Outcome;
use super::args::{ExportArgs, RunArgs};
use super::cache_cmd::cache_root;
use super::check_cmd::load_and_report;
use super::run_cmd;
use crate::cache::{CacheStore, Fingerprint, Lookup, Verify};
use crate::plan::{NodeKind, NodeParams};
use crate::stages::model::ModelResolver;
use crate::train::PeftAdapter;
use crate::train::merge::{
    ExportOrigin, MergeOptions, RoundingReport, check_destination, dtype_name, merge_checkpoint,
};

pub(crate) fn export(args: &ExportArgs) -> anyhow::Result<Outcome> {
    let Some(plan) = load_and_report(&args.file, &args.params) else {
        return Ok(Outcome::Problems);
    };
    let Some(node) = plan.find(&args.stage) else {
        bail!(
            "the pipeline has no stage `{}`; the stages it can export are: {}",
            args.stage,
            exportable_names(&plan)
        );
    };
    if !is_exportable(node) {
        bail!(
            "`{}` is a `{}` stage without an adapter; `export --merged` takes a finetune stage or \
             a model with `adapter:` (the pipeline's: {})",
            args.stage,
            node.kind().as_str(),
            exportable_names(&plan)
        );
    }
    let options = MergeOptions {
        dtype: args.dtype.to_candle(),
        force: args.force,
        origin: ExportOrigin {
            pipeline: plan.settings.name.clone(),
            stage: args.stage.clone(),
        },
    };
    check_destination(&args.merged, &options.origin, options.force)?;
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
    let location = ModelResolver::for_pipeline_file(&args.file).open(&entry)?;
    let Some(adapter_dir) = location.adapter_dir else {
        bail!("stage `{}` produced no adapter", args.stage);
    };
    let adapter = PeftAdapter::load(&adapter_dir, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot load the adapter `{}`", adapter_dir.display()))?;
    let report = merge_checkpoint(&location.checkpoint_dir, &adapter, &args.merged, &options)
        .with_context(|| {
            format!(
                "cannot merge `{}` into `{}`",
                args.stage,
                args.merged.display()
            )
        })?;
    if !args.quiet {
        eprintln!(
            "merged {} LoRA modules of `{}` in f32, saved as {}",
            report.merged_lora_modules,
            args.stage,
            dtype_name(options.dtype)
        );
        eprintln!("{}", rounding_line(&report.rounding));
    }
    if report.rounding.is_large() {
        eprintln!("warning: {}", rounding_warning(&report.rounding));
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", args.merged.display())?;
    Ok(Outcome::Success)
}

/// A fine-tune, or a model with an `adapter:` (merging a PEFT adapter trained elsewhere).
fn is_exportable(node: &crate::plan::Node) -> bool {
    match &node.params {
        NodeParams::Model(model) => model.adapter.is_some(),
        _ => node.kind() == NodeKind::Finetune,
    }
}

/// The stages of `plan` that `export --merged` takes, for messages.
fn exportable_names(plan: &crate::plan::Plan) -> String {
    let names: Vec<String> = plan
        .nodes
        .iter()
        .filter(|n| is_exportable(n))
        .map(|n| format!("`{}`", n.name))
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// What the saved dtype did to the update, in one line.
fn rounding_line(r: &RoundingReport) -> String {
    let mut line = format!(
        "{}: {} of {} nonzero update elements rounded away ({:.1}%); largest rounding error {:.3e} \
         (largest update {:.3e})",
        dtype_name(r.dtype),
        r.lost_elements,
        r.update_elements,
        100.0 * r.lost_fraction(),
        r.max_merged_error,
        r.max_update
    );
    if r.max_other_error > 0.0 {
        line.push_str(&format!(
            "; the other weights moved by up to {:.3e}",
            r.max_other_error
        ));
    }
    line
}

fn rounding_warning(r: &RoundingReport) -> String {
    format!(
        "saving in {} lost {:.1}% of the fine-tune's update, so the exported model can answer \
         differently from the one vlmpipe evaluated; `--dtype f32` keeps all of it",
        dtype_name(r.dtype),
        100.0 * r.lost_fraction()
    )
}
