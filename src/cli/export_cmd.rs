//! `vlmpipe export FILE STAGE --merged DIR`: a fine-tune (or a model with `adapter:`) as a
//! standalone Hub-layout checkpoint; `--gguf DIR` (with `FILE STAGE` or `--model MODEL`): the
//! llama.cpp pair `<name>-<QUANT>.gguf` + `mmproj-<name>-<QUANT>.gguf` (see [`crate::gguf`]).
//!
//! The destination is checked first (a folder with files vlmpipe did not write is refused before
//! minutes of training), then the stage is brought up to date with `run --only STAGE` (instant
//! when cached), so the exported weights always match the pipeline as written; then the adapter
//! is folded into the base weights in f32 and the folder is written in the layout transformers
//! and `local(...)` load, in `--dtype`, with a report of what that dtype's rounding changed.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};

use super::Outcome;
use super::args::{ExportArgs, RunArgs};
use super::cache_cmd::cache_root;
use super::check_cmd::load_and_report;
use super::run_cmd;
use crate::cache::{CacheStore, Fingerprint, Lookup, Verify};
use crate::gguf::{self, GgufOptions};
use crate::plan::{NodeKind, NodeParams};
use crate::stages::model::{ModelLocation, ModelResolver};
use crate::train::PeftAdapter;
use crate::train::merge::{
    ExportOrigin, MergeOptions, RoundingReport, check_destination, dtype_name, merge_checkpoint,
};

pub(crate) fn export(args: &ExportArgs) -> anyhow::Result<Outcome> {
    if let Some(gguf_dir) = &args.gguf {
        return export_gguf(args, gguf_dir);
    }
    let Some(merged_dir) = &args.merged else {
        bail!(
            "`export` writes `--merged DIR` (a Hub-layout checkpoint) or `--gguf DIR` (llama.cpp files)"
        );
    };
    let (file, stage) = pipeline_stage(args)?;
    let Some(plan) = load_and_report(file, &args.params) else {
        return Ok(Outcome::Problems);
    };
    let Some(node) = plan.find(stage) else {
        bail!(
            "the pipeline has no stage `{stage}`; the stages it can export are: {}",
            exportable_names(&plan)
        );
    };
    if !is_exportable(node) {
        bail!(
            "`{stage}` is a `{}` stage without an adapter; `export --merged` takes a finetune stage or \
             a model with `adapter:` (the pipeline's: {})",
            node.kind().as_str(),
            exportable_names(&plan)
        );
    }
    let options = MergeOptions {
        dtype: args.dtype.to_candle(),
        force: args.force,
        origin: ExportOrigin {
            pipeline: plan.settings.name.clone(),
            stage: stage.to_owned(),
        },
    };
    check_destination(merged_dir, &options.origin, options.force)?;
    let location = match run_stage(args, &plan, file, stage)? {
        Ok(location) => location,
        Err(outcome) => return Ok(outcome),
    };
    let Some(adapter_dir) = location.adapter_dir else {
        bail!("stage `{stage}` produced no adapter");
    };
    let adapter = PeftAdapter::load(&adapter_dir, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot load the adapter `{}`", adapter_dir.display()))?;
    let report = merge_checkpoint(&location.checkpoint_dir, &adapter, merged_dir, &options)
        .with_context(|| format!("cannot merge `{stage}` into `{}`", merged_dir.display()))?;
    if !args.quiet {
        eprintln!(
            "merged {} LoRA modules of `{stage}` in f32, saved as {}",
            report.merged_lora_modules,
            dtype_name(options.dtype)
        );
        eprintln!("{}", rounding_line(&report.rounding));
    }
    if report.rounding.is_large() {
        eprintln!("warning: {}", rounding_warning(&report.rounding));
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", merged_dir.display())?;
    Ok(Outcome::Success)
}

/// The pipeline file and stage, which every export but `--gguf DIR --model MODEL` names.
fn pipeline_stage(args: &ExportArgs) -> anyhow::Result<(&Path, &str)> {
    match (&args.file, &args.stage) {
        (Some(file), Some(stage)) => Ok((file, stage)),
        _ => bail!(
            "`export` takes a pipeline file and a stage (`vlmpipe export FILE STAGE ...`), or \
             `--model MODEL` with `--gguf DIR`"
        ),
    }
}

/// Brings `stage` up to date (`run --only STAGE`, instant when cached) and opens its output;
/// `Err(outcome)` when the run failed (its table is printed).
fn run_stage(
    args: &ExportArgs,
    plan: &crate::plan::Plan,
    file: &Path,
    stage: &str,
) -> anyhow::Result<Result<ModelLocation, Outcome>> {
    let run_args = RunArgs {
        file: file.to_path_buf(),
        params: args.params.clone(),
        cache: args.cache.clone(),
        force: Vec::new(),
        only: vec![stage.to_owned()],
        dry_run: false,
        summary_json: None,
        quiet: args.quiet,
        evals_dir: args.evals_dir.clone(),
        lock_wait: 600.0,
        shards: None,
        jobs: None,
        device: args.device.clone(),
        cluster: Default::default(),
    };
    let summary = run_cmd::execute(plan, &run_args)?;
    let report = summary.stage(stage);
    let Some(report) = report.filter(|_| summary.success) else {
        // The table says which stage failed and why.
        let mut err = std::io::stderr().lock();
        err.write_all(summary.render_table().as_bytes())?;
        return Ok(Err(Outcome::Problems));
    };

    let root = cache_root(&args.cache, Some(file));
    let store = CacheStore::open(&root)
        .with_context(|| format!("cannot open the cache `{}`", root.display()))?;
    let fingerprint = Fingerprint::parse(&report.fingerprint)?;
    let entry = {
        let lock = store.lock_shared_notify(std::time::Duration::from_secs(600), &mut |m| {
            eprintln!("{m}")
        })?;
        match store.lookup(&lock, &fingerprint, Verify::Fast)? {
            Lookup::Hit(entry) => *entry,
            Lookup::Miss(reason) => {
                bail!("the cache entry of `{stage}` vanished after the run ({reason:?})")
            }
        }
    };
    Ok(Ok(ModelResolver::for_pipeline_file(file).open(&entry)?))
}

/// `export --gguf DIR`: a model folder (`--model`), or a pipeline's model or fine-tune stage
/// with its adapter merged in f32 first, as llama.cpp's GGUF pair.
fn export_gguf(args: &ExportArgs, gguf_dir: &Path) -> anyhow::Result<Outcome> {
    let mmproj_quant = args
        .mmproj_quant
        .unwrap_or(args.quant.default_mmproj())
        .for_mmproj()
        .map_err(|e| anyhow::anyhow!("--mmproj-quant: {e}"))?;
    // Everything a user can get wrong is checked before the stage runs or a weight is read.
    let (checkpoint, name, plan) = match &args.model {
        Some(model) => {
            let reference = crate::model::resolve::ModelRef::parse(model)?;
            // A local folder of another architecture is named as such, before its files are
            // checked for what an LFM2-VL folder holds.
            let local = Path::new(model);
            if local.join("config.json").is_file() {
                gguf::check_architecture(local)?;
            }
            let dir = reference.resolve(&crate::hub::Hub::from_env())?;
            gguf::check_architecture(&dir)?;
            let name = args.name.clone().unwrap_or_else(|| model_name(model));
            (Some(dir), name, None)
        }
        None => {
            let (file, stage) = pipeline_stage(args)?;
            let Some(plan) = load_and_report(file, &args.params) else {
                return Ok(Outcome::Problems);
            };
            let Some(node) = plan.find(stage) else {
                bail!(
                    "the pipeline has no stage `{stage}`; `export --gguf` takes a model or \
                     finetune stage"
                );
            };
            if !matches!(node.kind(), NodeKind::Model | NodeKind::Finetune) {
                bail!(
                    "`{stage}` is a `{}` stage; `export --gguf` takes a model or finetune stage",
                    node.kind().as_str()
                );
            }
            (
                None,
                args.name.clone().unwrap_or_else(|| stage.to_owned()),
                Some(plan),
            )
        }
    };
    let options = GgufOptions {
        name,
        quant: args.quant,
        mmproj_quant,
        force: args.force,
    };
    let (text_file, mmproj_file) = gguf::file_names(&options.name, options.quant, mmproj_quant);
    if !args.force {
        for file in [&text_file, &mmproj_file] {
            let path = gguf_dir.join(file);
            if path.exists() {
                return Err(gguf::GgufError::Exists { path }.into());
            }
        }
    }

    // A merged fine-tune lives in a temporary folder until its GGUF files are written.
    let mut _merged_tmp = None;
    let checkpoint = match (checkpoint, plan) {
        (Some(dir), _) => dir,
        (None, Some(plan)) => {
            let (file, stage) = pipeline_stage(args)?;
            let location = match run_stage(args, &plan, file, stage)? {
                Ok(location) => location,
                Err(outcome) => return Ok(outcome),
            };
            gguf::check_architecture(&location.checkpoint_dir)?;
            match location.adapter_dir {
                None => location.checkpoint_dir,
                Some(adapter_dir) => {
                    let adapter = PeftAdapter::load(&adapter_dir, &candle_core::Device::Cpu)
                        .with_context(|| {
                            format!("cannot load the adapter `{}`", adapter_dir.display())
                        })?;
                    let tmp = tempfile::Builder::new()
                        .prefix(".vlmpipe-gguf-merge-")
                        .tempdir()?;
                    let merged = tmp.path().join("merged");
                    let merge = MergeOptions {
                        dtype: candle_core::DType::F32,
                        force: false,
                        origin: ExportOrigin {
                            pipeline: plan.settings.name.clone(),
                            stage: stage.to_owned(),
                        },
                    };
                    let report =
                        merge_checkpoint(&location.checkpoint_dir, &adapter, &merged, &merge)
                            .with_context(|| format!("cannot merge the adapter of `{stage}`"))?;
                    if !args.quiet {
                        eprintln!(
                            "merged {} LoRA modules of `{stage}` in f32",
                            report.merged_lora_modules
                        );
                    }
                    _merged_tmp = Some(tmp);
                    merged
                }
            }
        }
        (None, None) => unreachable!("a pipeline stage or --model was given"),
    };

    let written = gguf::export(&checkpoint, gguf_dir, &options)
        .with_context(|| format!("cannot export `{}` as GGUF", checkpoint.display()))?;
    let mut out = std::io::stdout().lock();
    for file in [&written.text, &written.mmproj] {
        for f in &file.fallbacks {
            eprintln!(
                "note: `{}` has rows of {} values, not whole {:?} blocks; stored as {:?} (as \
                 llama.cpp's converter does)",
                f.tensor, f.row, f.wanted, f.used
            );
        }
        if !args.quiet {
            eprintln!(
                "wrote {} ({} tensors, {:.1} MB)",
                file.path.display(),
                file.tensors,
                file.bytes as f64 / 1e6
            );
        }
        writeln!(out, "{}", file.path.display())?;
    }
    Ok(Outcome::Success)
}

/// The name a model reference exports under: its last path or repo component.
fn model_name(model: &str) -> String {
    let text = model
        .trim()
        .trim_start_matches("hf(")
        .split([',', ')', '@'])
        .next()
        .unwrap_or(model)
        .trim()
        .trim_matches('"')
        .trim_end_matches('/');
    text.rsplit('/').next().unwrap_or(text).to_owned()
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
