//! `vlmpipe render FILE STAGE --row N`: the exact prompt an eval or fine-tune sends for a row.
//!
//! Runs what the prompt needs through the executor (so it is cached like any run): the stage's
//! data chain, its prompt and its model. Then it renders the prompt templates for the row, wraps
//! them in the conversation every stage uses (system turn, image, user text), applies the
//! model's chat template and expands the image placeholder into the image's token sequence with
//! the model's processor, exactly as the model's input is built. Fine-tunes are rendered up to
//! the generation prompt (the answer the model learns follows it).

use std::time::Duration;

use anyhow::{Context, bail};

use super::Outcome;
use super::args::{DeviceArg, RenderArgs, RunArgs};
use super::cache_cmd::cache_root;
use super::check_cmd::load_and_report;
use super::run_cmd;
use crate::cache::{CacheEntry, CacheStore, Fingerprint, Lookup, Verify};
use crate::exec::RunSummary;
use crate::model::device::DeviceChoice;
use crate::model::processor::{Processor, decode_image};
use crate::plan::params::{DataRef, NodeRef};
use crate::plan::{NodeParams, Plan};
use crate::stages::data::{IMAGES_FILE, ImageStore, read_rows};
use crate::stages::declared::read_prompt;
use crate::stages::lower::{data_file, root_dataset};
use crate::stages::model::ModelResolver;
use crate::stages::prompt::{RowContext, render_prompt};

/// What a prompt-sending stage reads.
struct PromptSources {
    data: DataRef,
    prompt: NodeRef,
    labels: Option<Vec<String>>,
    model: NodeRef,
}

pub(crate) fn render(args: &RenderArgs) -> anyhow::Result<Outcome> {
    let Some(plan) = load_and_report(&args.file, &args.params) else {
        return Ok(Outcome::Problems);
    };
    let id = plan.lookup_stage(&args.stage).map_err(anyhow::Error::msg)?;
    let node = plan
        .node(id)
        .context("the stage disappeared from the plan")?;
    let sources = match &node.params {
        NodeParams::Eval(p) => PromptSources {
            data: p.data.clone(),
            prompt: p.prompt.clone(),
            labels: Some(p.labels.values.clone()),
            model: p.model.clone(),
        },
        NodeParams::Finetune(p) => PromptSources {
            data: p.data.clone(),
            prompt: p.prompt.clone(),
            labels: p.labels.as_ref().map(|l| l.values.clone()),
            model: p.base.clone(),
        },
        _ => bail!(
            "`{}` is a {} stage; `render` shows the prompt of an `eval` or `finetune` stage",
            node.name,
            node.kind()
        ),
    };
    // The chat template and processor belong to the base model under any chain of fine-tunes.
    let model = base_model(&plan, &sources.model)?;
    let root = root_dataset(&sources.data, &plan);
    let root_name = plan
        .node(root)
        .map(|n| n.name.clone())
        .context("the data chain has no dataset")?;
    let needed = vec![
        sources.data.node.name.clone(),
        sources.prompt.name.clone(),
        model.name.clone(),
        root_name.clone(),
    ];

    let run_args = RunArgs {
        file: args.file.clone(),
        params: args.params.clone(),
        cache: args.cache.clone(),
        force: Vec::new(),
        only: needed,
        dry_run: false,
        summary_json: None,
        quiet: true,
        evals_dir: None,
        lock_wait: 600.0,
        shards: None,
        jobs: None,
        // Rendering needs the model's files, never its weights on a device.
        device: DeviceArg {
            device: DeviceChoice::Cpu,
        },
        cluster: Default::default(),
    };
    let summary = run_cmd::execute(&plan, &run_args)?;
    if !summary.success {
        eprint!("{}", summary.render_table());
        return Ok(Outcome::Problems);
    }
    let store = CacheStore::open(cache_root(&args.cache, Some(&args.file)))?;
    let lock = store.lock_shared_notify(Duration::from_secs(600), &mut |m| eprintln!("{m}"))?;
    let entry = |name: &str| entry_of(&store, &lock, &summary, name);

    let rows = read_rows(&entry(&sources.data.node.name)?.path(&data_file(&sources.data, &plan)))?;
    let Some(row) = rows.rows.get(args.row) else {
        bail!(
            "row {} is out of range: `{}` has {} rows",
            args.row,
            sources.data.display_name(),
            rows.rows.len()
        );
    };
    let labels = sources.labels.unwrap_or_else(|| rows.classes.clone());
    let prompt_file = read_prompt(&entry(&sources.prompt.name)?)?;
    let row_ctx = RowContext {
        row_id: row.row_id.clone(),
        image_id: row.image_id.clone(),
        label: Some(row.label.clone()),
    };
    let rendered = render_prompt(
        &prompt_file.templates(),
        &labels,
        &row_ctx,
        &prompt_file.params,
    )?;
    let conversation = rendered.conversation();
    let location = ModelResolver::for_pipeline_file(&args.file).open(&entry(&model.name)?)?;
    let processor = Processor::from_model_dir(&location.checkpoint_dir)?;
    let (text, tokens) = if args.no_expand {
        (processor.template().render(&conversation, true)?, None)
    } else {
        if let Some(reason) = &row.image_error {
            bail!(
                "row `{}` has no image (it failed at ingest): {reason}",
                row.row_id
            );
        }
        let images = ImageStore::open(&entry(&root_name)?.path(IMAGES_FILE))?;
        let stored = images.get(&row.image_id)?;
        let image = decode_image(&stored.bytes)
            .with_context(|| format!("the image of row `{}` does not decode", row.row_id))?;
        let inputs = processor.prepare(&conversation, &[image], true)?;
        let tokens = inputs.input_ids.len();
        (inputs.text, Some(tokens))
    };
    eprintln!(
        "row {} of `{}`: `{}` (label `{}`){}",
        args.row,
        sources.data.display_name(),
        row.row_id,
        row.label,
        tokens.map_or_else(String::new, |t| format!(", {t} tokens"))
    );
    print!("{text}");
    Ok(Outcome::Success)
}

/// Follows `finetune.base` and `export.model` links down to the `model` node (an export keeps
/// its model's tokenizer and chat template).
fn base_model(plan: &Plan, start: &NodeRef) -> anyhow::Result<NodeRef> {
    let mut current = start.clone();
    for _ in 0..=plan.nodes.len() {
        match plan.node(current.id).map(|n| &n.params) {
            Some(NodeParams::Finetune(p)) => current = p.base.clone(),
            Some(NodeParams::Export(p)) => current = p.model.clone(),
            Some(NodeParams::Model(_)) => return Ok(current),
            _ => bail!("`{}` is not a model or a fine-tune", current.name),
        }
    }
    bail!("the fine-tune chain of `{}` does not end", start.name)
}

/// The cache entry stage `name` produced or reused in `summary`.
fn entry_of(
    store: &CacheStore,
    lock: &crate::cache::CacheLock,
    summary: &RunSummary,
    name: &str,
) -> anyhow::Result<CacheEntry> {
    let report = summary
        .stage(name)
        .with_context(|| format!("stage `{name}` is not in the run summary"))?;
    let fp = Fingerprint::parse(&report.fingerprint)
        .map_err(|e| anyhow::anyhow!("stage `{name}` has no fingerprint: {}", e.0))?;
    match store.lookup(lock, &fp, Verify::Fast)? {
        Lookup::Hit(entry) => Ok(*entry),
        Lookup::Miss(_) => bail!("the cache entry of stage `{name}` vanished after the run"),
    }
}
