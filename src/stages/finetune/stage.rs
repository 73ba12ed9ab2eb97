//! The `finetune` stage: LoRA training of a base model on a data table, yielding a model entry
//! that eval stages use like any other.
//!
//! Each training example is the conversation the eval stage sends for the row (same prompt,
//! same row context) plus the answer the output grammar prescribes for the row's label
//! (`{"pred_class": "dog"}`), or the plain label without a grammar, so training and constrained
//! decoding agree. The trainer's run directory is the executor's per-fingerprint work dir, which
//! survives a killed `vlmpipe run`: the rerun resumes from the last checkpoint (written at least
//! every `checkpoint_every` steps and `checkpoint_minutes`; a damaged one is passed over with a
//! warning). The fingerprint holds the effective training settings only: checkpoint intervals,
//! `epochs` under `max_steps` and `eval_every` without `eval_data` cannot change the adapter, so
//! changing them reruns nothing.
//!
//! Entry layout:
//! ```text
//! model.json        {"base": <the base model's reference>, "adapter": "adapter", "dtype"}
//! base/             the base checkpoint, copied, when it lives in the base model's entry (`init`)
//! adapter/          PEFT adapter after the last step
//! best_adapter/     PEFT adapter with the lowest evaluation loss (when evaluated)
//! metrics.parquet   one row per optimizer step (train/eval loss, lr, grad norm)
//! trainable.json    trained parameter count, LoRA settings, adapted modules
//! ```
//! Exports under `evals/<pipeline>/<stage>/`: `training.html` (loss curves), `metrics.csv` and
//! `metrics.parquet`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::{Value, json};

use crate::decode::{DecodeError, GrammarSpec, answer_text};
use crate::exec::{Export, Stage, StageContext, StageError, StageOutcome};
use crate::file_error::FileError;
use crate::model::checkpoint::{self, LoadOptions};
use crate::model::device::device_label;
use crate::model::lfm2_vl::Lfm2VlModel;
use crate::model::processor::{Processor, decode_image};
use crate::stages::data::DataInput;
use crate::stages::model::{FolderRef, MODEL_FILE, ModelFile, ModelResolver};
use crate::stages::prompt::{PromptTemplates, RowContext, render_prompt};
use crate::stages::report::{LineChart, Series, html_escape};
use crate::train::batch::end_of_turn_id;
use crate::train::lora::{ModulePart, linear_modules, select_modules};
use crate::train::metrics::{MetricRow, write_metrics};
use crate::train::trainer::scan_checkpoints;
use crate::train::{Example, TrainConfig, TrainError, train};

/// Bumped when the finetune stage's output for the same inputs changes.
// 2: `eval_data` is evaluated after the last step even without `eval_every`.
// 3: `model.json` names the base independently of the project's location; adapter configs
// name a Hub base and write `lora_dropout` as written.
// 4: images over the default pixel cap (PIL's `MAX_IMAGE_PIXELS`) are skipped as undecodable.
// 5: LoRA init, dropout masks and shuffles drawn from `crate::rng` (PCG-64), not `StdRng`.
// 6: LoRA layers, norms and activations train through fused ops (issue 17): the same
// gradients up to summation order, so trained adapters differ in the last bits.
const FINETUNE_CODE_VERSION: u32 = 6;

/// Folder of the final adapter inside the entry.
pub(crate) const ADAPTER_DIR: &str = "adapter";
/// Folder of a base checkpoint copied into the entry (one that lives in another entry).
const BASE_DIR: &str = "base";
/// Folder of the best-by-eval-loss adapter inside the entry.
pub(crate) const BEST_ADAPTER_DIR: &str = "best_adapter";
/// Per-step training metrics inside the entry.
pub(crate) const METRICS_FILE: &str = "metrics.parquet";
/// Parameter counts and targets inside the entry.
pub(crate) const TRAINABLE_FILE: &str = "trainable.json";
/// The loss-curve page among the exports.
pub(crate) const TRAINING_HTML: &str = "training.html";
/// The metrics as CSV among the exports.
pub(crate) const METRICS_CSV: &str = "metrics.csv";

/// Why a fine-tune could not run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FinetuneError {
    /// The base is itself a fine-tuned model; adapters do not stack yet.
    #[error(
        "the base model at `{0}` already carries an adapter; fine-tuning a fine-tune is not supported (merge it first with `vlmpipe export --merged` and use `local(...)`)"
    )]
    StackedAdapter(PathBuf),
    /// The base model is a GGUF pair (quantized, llama.cpp's layout).
    #[error(
        "the base model `{0}` is a GGUF file; fine-tuning needs its safetensors checkpoint \
         (`hf(...)` or `local(...)`), which `export` then turns into GGUF"
    )]
    Gguf(PathBuf),
    /// The output grammar cannot turn a label into an answer.
    #[error("cannot derive the training answer from the output grammar: {0}")]
    NoAnswer(#[source] DecodeError),
    /// No row of the training data could be turned into an example.
    #[error("none of the {rows} training rows could be used (first problem: {first})")]
    NoUsableRows { rows: usize, first: String },
    /// Loading the base model or its processor failed.
    #[error("cannot load the base model in `{dir}`: {message}")]
    Load { dir: PathBuf, message: String },
    /// Training failed (bad target names list the model's real modules).
    #[error(transparent)]
    Train(#[from] TrainError),
    /// An output or export file could not be written.
    #[error(transparent)]
    File(#[from] FileError),
}

/// What a `finetune` stage trains.
#[derive(Clone, Debug)]
pub(crate) struct FinetuneConfig {
    /// The parameters that identify the adapter: the node's canonical parameters minus those
    /// that cannot change it (checkpoint intervals, …). The base model, data, prompt, labels and
    /// grammar are exec inputs, so their fingerprints cascade.
    pub params: Value,
    /// The trainer's settings; `pad_id` is set from the tokenizer the stage loads.
    pub train: TrainConfig,
    /// The LoRA settings as written, recorded in `trainable.json`.
    pub lora: Value,
    /// The declared label set; `None` takes the training table's classes.
    pub labels: Option<Vec<String>>,
    pub prompt: PromptTemplates,
    pub grammar: Option<GrammarSpec>,
    /// The pipeline's params, which the templates may read.
    pub pipeline_params: BTreeMap<String, Value>,
    /// The input slot of the base model's entry.
    pub base_slot: usize,
    pub train_data: DataInput,
    pub eval_data: Option<DataInput>,
    /// Where the exports go (`evals/<pipeline>/<stage>/`).
    pub export_dir: PathBuf,
    /// Finds the base model's folders on this machine (never part of a fingerprint).
    pub models: ModelResolver,
    /// Not in [`Stage::params`]: training on another device must not invalidate the cache.
    pub device: Device,
}

/// A configured finetune stage.
pub(crate) struct FinetuneStage {
    config: FinetuneConfig,
}

impl FinetuneStage {
    pub(crate) fn from_config(config: FinetuneConfig) -> Self {
        Self { config }
    }
}

impl Stage for FinetuneStage {
    fn kind(&self) -> &'static str {
        "finetune"
    }

    fn uses_device(&self) -> bool {
        true
    }

    fn code_version(&self) -> u32 {
        FINETUNE_CODE_VERSION
    }

    fn params(&self) -> Value {
        // The base model, data, prompt, labels and grammar are exec inputs, so their fingerprints
        // cascade; the parameters here cover every hyperparameter.
        self.config.params.clone()
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let config = &self.config;
        let location = config.models.open(ctx.input(config.base_slot)?)?;
        if location.adapter_dir.is_some() {
            return Err(FinetuneError::StackedAdapter(location.checkpoint_dir).into());
        }
        if let Some(pair) = location.gguf {
            return Err(FinetuneError::Gguf(pair.text).into());
        }
        let dtype = location.dtype.unwrap_or_default().to_candle();
        let load_err = |message: String| FinetuneError::Load {
            dir: location.checkpoint_dir.clone(),
            message,
        };
        let processor = Processor::from_model_dir(&location.checkpoint_dir)
            .map_err(|e| load_err(e.to_string()))?;
        let mut model = checkpoint::load(
            &location.checkpoint_dir,
            &LoadOptions {
                dtype,
                device: config.device.clone(),
            },
        )
        .map_err(|e| load_err(e.to_string()))?;

        let pad_id = processor.tokenizer().token_to_id("<|pad|>").unwrap_or(0);
        let mut cfg = config.train.clone();
        cfg.pad_id = pad_id;
        // Bad target names fail before minutes of image preprocessing, not after.
        check_targets(&model, &cfg)?;

        let mut warnings = Vec::new();
        let builder = ExampleBuilder {
            stage: config,
            processor: &processor,
            end_of_turn: end_of_turn_id(&processor),
        };
        let train_set = builder.build(ctx, &config.train_data, &mut warnings)?;
        let eval_set = match &config.eval_data {
            Some(data) => builder.build(ctx, data, &mut warnings)?,
            None => Vec::new(),
        };

        let run_dir = ctx.work_dir.to_path_buf();
        // Said before training starts (the trainer repeats these checks when it resumes).
        let scan = scan_checkpoints(&run_dir);
        for problem in &scan.problems {
            ctx.progress
                .println(&format!("{}: warning: {problem}", ctx.name));
        }
        match scan.step {
            Some(step) => ctx.progress.println(&format!(
                "{}: resuming from the checkpoint at step {step}",
                ctx.name
            )),
            None if !scan.problems.is_empty() => ctx.progress.println(&format!(
                "{}: no usable checkpoint, training starts over",
                ctx.name
            )),
            None => {}
        }
        let outcome = {
            let bar = ctx.progress.bar(0, ctx.name);
            let mut on_step = |row: &MetricRow| {
                bar.set_position(row.step);
                bar.set_message(match row.eval_loss {
                    Some(e) => format!("loss {:.4} eval {e:.4}", row.train_loss),
                    None => format!("loss {:.4}", row.train_loss),
                });
            };
            let total = cfg.max_steps.unwrap_or_else(|| {
                let per_epoch = train_set.len().div_ceil(cfg.batch_size);
                (cfg.epochs * per_epoch).div_ceil(cfg.grad_accum)
            });
            bar.set_length(total as u64);
            let result = match train(
                &mut model,
                &train_set,
                &eval_set,
                &cfg,
                Some(&run_dir),
                Some(&mut on_step),
            ) {
                Err(TrainError::CheckpointMismatch { path, message }) => {
                    // A stale checkpoint of other settings must not block the stage forever:
                    // the work dir belongs to this fingerprint, so start it over.
                    warnings.push(format!(
                        "discarded checkpoint `{}` ({message}); training restarted",
                        path.display()
                    ));
                    std::fs::remove_dir_all(&run_dir).map_err(FileError::remove(&run_dir))?;
                    bar.set_position(0);
                    train(
                        &mut model,
                        &train_set,
                        &eval_set,
                        &cfg,
                        Some(&run_dir),
                        Some(&mut on_step),
                    )
                }
                other => other,
            };
            bar.finish_and_clear();
            result.map_err(FinetuneError::from)?
        };
        if let Some(step) = outcome.resumed_from {
            ctx.progress.println(&format!(
                "{}: resumed at step {step} of {}",
                ctx.name, outcome.total_steps
            ));
        }
        if !outcome.discarded_checkpoints.is_empty() {
            let then = match outcome.resumed_from {
                Some(step) => format!("resumed from the checkpoint at step {step}"),
                None => "training started over".to_owned(),
            };
            warnings.extend(
                outcome
                    .discarded_checkpoints
                    .iter()
                    .map(|problem| format!("{problem}; {then}")),
            );
        }

        // Outputs in the entry. PEFT loads the base an adapter names: a Hub id is portable, a
        // path on this machine is not, so only Hub bases are named.
        let base_model = location.base.hub_id().map(str::to_owned);
        let adapter_dir = ctx.out_path(ADAPTER_DIR);
        let mut adapter = outcome.adapter.clone();
        adapter.base_model.clone_from(&base_model);
        adapter.save(&adapter_dir)?;
        let best = run_dir.join("best");
        let has_best = best.join("adapter_config.json").is_file();
        if has_best {
            let mut best = crate::train::PeftAdapter::load(&best, &Device::Cpu)?;
            best.base_model.clone_from(&base_model);
            best.save(&ctx.out_path(BEST_ADAPTER_DIR))?;
        }
        // A base inside another entry (an `init` model) is copied, so this entry stands alone.
        let base_ref = match &location.base {
            FolderRef::Entry { .. } => {
                copy_dir(&location.checkpoint_dir, &ctx.out_path(BASE_DIR))?;
                FolderRef::Entry {
                    path: PathBuf::from(BASE_DIR),
                }
            }
            other => other.clone(),
        };
        let model_file = ModelFile {
            base: base_ref.clone(),
            adapter: Some(PathBuf::from(ADAPTER_DIR)),
            dtype: location.dtype,
            gguf: None,
        };
        let model_path = ctx.out_path(MODEL_FILE);
        std::fs::write(&model_path, serde_json::to_string_pretty(&model_file)?)
            .map_err(FileError::write(&model_path))?;
        let metrics_path = ctx.out_path(METRICS_FILE);
        write_metrics(&metrics_path, &outcome.metrics)?;
        let modules: Vec<&str> = outcome
            .adapter
            .lora
            .iter()
            .map(|l| l.module.as_str())
            .collect();
        let trainable = json!({
            "num_parameters": outcome.num_parameters,
            "lora": config.lora,
            "modules": modules,
        });
        let trainable_path = ctx.out_path(TRAINABLE_FILE);
        std::fs::write(&trainable_path, serde_json::to_string_pretty(&trainable)?)
            .map_err(FileError::write(&trainable_path))?;

        // Exported beside the eval reports (see `exports`).
        let html_path = ctx.out_path(TRAINING_HTML);
        let html = training_page(ctx.name, &outcome.metrics, &trainable);
        std::fs::write(&html_path, html).map_err(FileError::write(&html_path))?;
        let csv_path = ctx.out_path(METRICS_CSV);
        std::fs::write(&csv_path, metrics_csv(&outcome.metrics))
            .map_err(FileError::write(&csv_path))?;

        let final_eval = outcome.metrics.iter().rev().find_map(|m| m.eval_loss);
        Ok(StageOutcome {
            metadata: json!({
                "base": base_ref.describe(),
                "trained_parameters": outcome.num_parameters,
                "steps": outcome.total_steps,
                "train_examples": train_set.len(),
                "eval_examples": eval_set.len(),
                "final_train_loss": outcome.metrics.last().map(|m| m.train_loss),
                "final_eval_loss": final_eval,
                "best_eval_loss": outcome.best_eval_loss,
                "best_step": outcome.best_step,
                "resumed_from": outcome.resumed_from,
                "seconds": outcome.metrics.last().map(|m| m.seconds),
                "device": device_label(&config.device),
            }),
            warnings,
        })
    }

    fn exports(&self) -> Vec<Export> {
        Export::all(
            &[TRAINING_HTML, METRICS_CSV, METRICS_FILE],
            &self.config.export_dir,
        )
    }
}

/// Turns data rows into tokenised examples.
struct ExampleBuilder<'a> {
    stage: &'a FinetuneConfig,
    processor: &'a Processor,
    end_of_turn: Option<u32>,
}

impl ExampleBuilder<'_> {
    /// The examples of `data`; rows whose image or answer is unusable become warnings.
    fn build(
        &self,
        ctx: &StageContext<'_>,
        data: &DataInput,
        warnings: &mut Vec<String>,
    ) -> Result<Vec<Example>, StageError> {
        let rows = data.read_rows(ctx)?;
        let images = data.open_images(ctx)?;
        let labels = match &self.stage.labels {
            Some(labels) => labels.clone(),
            None => rows.classes.clone(),
        };
        let mut examples = Vec::with_capacity(rows.rows.len());
        let mut skipped: Vec<String> = Vec::new();
        for row in &rows.rows {
            let answer = match &self.stage.grammar {
                Some(spec) => match answer_text(spec, &row.label, None) {
                    Ok(answer) => answer,
                    Err(DecodeError::UnknownLabel(label)) => {
                        skipped.push(format!(
                            "row `{}`: label `{label}` is not in the output grammar",
                            row.row_id
                        ));
                        continue;
                    }
                    Err(e) => return Err(FinetuneError::NoAnswer(e).into()),
                },
                None => row.label.clone(),
            };
            let rendered = render_prompt(
                &self.stage.prompt,
                &labels,
                &RowContext {
                    row_id: row.row_id.clone(),
                    image_id: row.image_id.clone(),
                    label: Some(row.label.clone()),
                },
                &self.stage.pipeline_params,
            )?;
            if let Some(reason) = &row.image_error {
                skipped.push(format!("row `{}`: image error: {reason}", row.row_id));
                continue;
            }
            let image = match images
                .get(&row.image_id)
                .map_err(|e| e.to_string())
                .and_then(|stored| decode_image(&stored.bytes).map_err(|e| e.to_string()))
            {
                Ok(image) => image,
                Err(reason) => {
                    skipped.push(format!("row `{}`: image error: {reason}", row.row_id));
                    continue;
                }
            };
            match Example::prepare(
                self.processor,
                &rendered.conversation(),
                std::slice::from_ref(&image),
                &answer,
                self.end_of_turn,
            ) {
                Ok(example) => examples.push(example),
                Err(e) => skipped.push(format!("row `{}`: {e}", row.row_id)),
            }
        }
        if examples.is_empty() && !rows.rows.is_empty() {
            return Err(FinetuneError::NoUsableRows {
                rows: rows.rows.len(),
                first: skipped.first().cloned().unwrap_or_default(),
            }
            .into());
        }
        if let Some(first) = skipped.first() {
            warnings.push(format!(
                "{} of {} rows of `{}` were skipped (first: {first})",
                skipped.len(),
                rows.rows.len(),
                data.name
            ));
        }
        Ok(examples)
    }
}

/// Fails like training would when a LoRA target matches no module of `model`.
fn check_targets(model: &Lfm2VlModel, cfg: &TrainConfig) -> Result<(), FinetuneError> {
    let Some(lora) = &cfg.trainable.lora else {
        return Ok(());
    };
    let parts: &[ModulePart] = if lora.include_vision {
        &[
            ModulePart::VisionTower,
            ModulePart::Projector,
            ModulePart::LanguageModel,
        ]
    } else {
        &[ModulePart::LanguageModel]
    };
    select_modules(&linear_modules(model), &lora.targets, parts)?;
    Ok(())
}

/// Copies the plain files of `from` into a new folder `to` (adapter folders are flat).
fn copy_dir(from: &Path, to: &Path) -> Result<(), FinetuneError> {
    std::fs::create_dir_all(to).map_err(FileError::create(to))?;
    for item in std::fs::read_dir(from).map_err(FileError::list(from))? {
        let item = item.map_err(FileError::list(from))?;
        let path = item.path();
        if path.is_file() {
            let target = to.join(item.file_name());
            std::fs::copy(&path, &target).map_err(FileError::copy_to(&target))?;
        }
    }
    Ok(())
}

/// The metrics as CSV: one row per step, an empty `eval_loss` where none was computed.
pub(crate) fn metrics_csv(rows: &[MetricRow]) -> String {
    let mut out = String::from("step,epoch,train_loss,eval_loss,lr,grad_norm,seconds\n");
    for r in rows {
        let eval = r.eval_loss.map(|e| e.to_string()).unwrap_or_default();
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "{},{},{},{eval},{},{},{}",
            r.step, r.epoch, r.train_loss, r.lr, r.grad_norm, r.seconds
        );
    }
    out
}

/// The loss curves of a run as `train` and `eval` series (the report's curve format).
pub(crate) fn loss_series(rows: &[MetricRow]) -> Vec<Series> {
    let train: Vec<(f64, f64)> = rows.iter().map(|r| (r.step as f64, r.train_loss)).collect();
    let eval: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| r.eval_loss.map(|e| (r.step as f64, e)))
        .collect();
    let mut series = vec![Series {
        name: "train loss".to_owned(),
        points: train,
    }];
    if !eval.is_empty() {
        series.push(Series {
            name: "eval loss".to_owned(),
            points: eval,
        });
    }
    series
}

/// A small standalone page: the loss chart and the trainable-parameter summary.
fn training_page(stage: &str, rows: &[MetricRow], trainable: &Value) -> String {
    let chart = LineChart {
        title: format!("{stage}: training and evaluation loss"),
        x_label: "step".to_owned(),
        y_label: "loss".to_owned(),
        series: loss_series(rows),
    };
    let summary = serde_json::to_string_pretty(trainable).unwrap_or_default();
    let title = html_escape(&format!("fine-tune `{stage}`"));
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:720px;margin:2em auto}}\
         pre{{background:#f4f4f4;padding:1em}}</style></head>\n<body><h1>{title}</h1>\n\
         <p>{} optimizer steps.</p>\n{}\n<h2>Trained parameters</h2><pre>{}</pre></body></html>\n",
        rows.len(),
        chart.to_svg(),
        html_escape(&summary)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: u64, eval: Option<f64>) -> MetricRow {
        MetricRow {
            step,
            epoch: step as f64 / 4.0,
            train_loss: 2.0 / step as f64,
            eval_loss: eval,
            lr: 1e-3,
            grad_norm: 0.5,
            seconds: step as f64,
        }
    }

    #[test]
    fn csv_and_series_keep_sparse_eval_losses() {
        let rows = vec![row(1, None), row(2, Some(1.5)), row(3, None)];
        let csv = metrics_csv(&rows);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[1], "1,0.25,2,,0.001,0.5,1");
        assert!(lines[2].contains(",1.5,"));
        let series = loss_series(&rows);
        assert_eq!(series.len(), 2);
        assert_eq!(series[0].points.len(), 3);
        assert_eq!(series[1].points, vec![(2.0, 1.5)]);
        assert_eq!(loss_series(&[row(1, None)]).len(), 1);
    }

    #[test]
    fn training_page_embeds_the_chart_and_escapes_names() {
        let page = training_page("a<b", &[row(1, Some(1.0))], &json!({"n": 1}));
        assert!(page.contains("<svg"));
        assert!(page.contains("a&lt;b"));
        assert!(!page.contains("a<b"));
    }
}
