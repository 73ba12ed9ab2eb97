//! The `eval` stage: runs a model (or a fine-tune) over a data table with a prompt, an optional
//! output grammar and a label set, and writes records, metrics, the tutorial CSV and the HTML
//! report into the cache; the executor copies them to `evals/<pipeline>/<stage>/` ([`Stage::exports`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use serde_json::{Value, json};

use super::run::{AnswerMode, EvalJob, EvalSample, SampleImage};
use super::{
    METRICS_FILE, MetricsOptions, PREDICTIONS_CSV_FILE, RECORDS_FILE, REPORT_FILE, compute_metrics,
    write_eval_outputs,
};
use crate::decode::{AnswerParser, CompiledGrammar, GrammarSpec, LabelScorer};
use crate::exec::{Export, Stage, StageContext, StageError, StageOutcome};
use crate::model::checkpoint::LoadOptions;
use crate::model::device::device_label;
use crate::model::generate::Sampling;
use crate::model::processor::DEFAULT_MAX_IMAGE_PIXELS;
use crate::plan::params::{EvalParams, ParamValue, PromptParams, Scoring};
use crate::plan::{Node, NodeParams, Plan};
use crate::runner::{DecodeOptions, ModelRunner};
use crate::stages::data::{IMAGES_FILE, ImageStore, read_rows};
use crate::stages::lower::{
    InputPositions, LowerContext, LowerError, data_file, grammar_of, prompt_of, root_dataset,
};
use crate::stages::model_node::ModelResolver;
use crate::stages::prompt::{RowContext, render_prompt};
use crate::stages::report::{HtmlOptions, ReportInput, StageReport, write_html};

/// Bumped when the eval stage's output for the same inputs changes.
// 2: a sampled answer is seeded by its row id, not its place in the batch; 16-bit gray clips.
// 3: `predictions.csv` embeds the original image files; records hold per-sample latency and
//    `batch_size`.
// 4: images over the pixel cap (PIL's, or the dataset's `max_image_pixels`) are error rows.
// 5: a grammar-constrained answer closes before `max_new_tokens` runs out.
const EVAL_CODE_VERSION: u32 = 5;

/// A configured eval stage.
pub struct EvalStage {
    canonical: Value,
    params: EvalParams,
    prompt: PromptParams,
    grammar: Option<GrammarSpec>,
    pipeline_params: BTreeMap<String, ParamValue>,
    model_slot: usize,
    data_slot: usize,
    data_file: String,
    dataset_slot: usize,
    /// The dataset's pixel cap (`max_image_pixels`), applied again when decoding.
    max_image_pixels: u64,
    export_dir: PathBuf,
    /// Finds the model's folders on this machine (never part of a fingerprint).
    models: ModelResolver,
    /// Not in [`Stage::params`]: the device changes where answers are computed, not what they are.
    device: Device,
}

/// Builds the eval stage of `node` (the lowering hook).
pub fn lower_eval(
    node: &Node,
    plan: &Plan,
    ctx: &LowerContext<'_>,
    inputs: &InputPositions,
) -> Result<Box<dyn Stage>, LowerError> {
    let unsupported = |message: String| LowerError::Unsupported {
        stage: node.name.clone(),
        message,
    };
    let NodeParams::Eval(params) = &node.params else {
        return Err(unsupported("not an eval node".to_owned()));
    };
    let prompt = prompt_of(node, plan, &params.prompt)?;
    let grammar = grammar_of(node, plan, params.output.as_ref())?;
    let dataset = root_dataset(&params.data, plan);
    let max_image_pixels = match plan.node(dataset).map(|n| &n.params) {
        Some(NodeParams::Dataset(d)) => d.max_image_pixels,
        _ => None,
    }
    .unwrap_or(DEFAULT_MAX_IMAGE_PIXELS);
    Ok(Box::new(EvalStage {
        canonical: node.canonical_params(),
        params: params.clone(),
        prompt,
        grammar,
        pipeline_params: plan.settings.params.clone(),
        model_slot: inputs.input_index(params.model.id)?,
        data_slot: inputs.input_index(params.data.node.id)?,
        data_file: data_file(&params.data, plan),
        dataset_slot: inputs.input_index(dataset)?,
        max_image_pixels,
        export_dir: ctx.evals_dir.join(&node.name),
        models: ModelResolver::from_lower(ctx),
        device: ctx.device.clone(),
    }))
}

impl Stage for EvalStage {
    fn kind(&self) -> &'static str {
        "eval"
    }

    fn code_version(&self) -> u32 {
        EVAL_CODE_VERSION
    }

    fn params(&self) -> Value {
        // Referenced prompt/grammar/model nodes are exec inputs, so their own fingerprints cover
        // their content; the pipeline params a template reads are covered by the prompt node.
        self.canonical.clone()
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let started = Instant::now();
        let labels = &self.params.labels.values;
        let location = self.models.open(&ctx.inputs[self.model_slot])?;
        let dtype = parse_dtype(location.dtype.as_deref())?;
        let runner = ModelRunner::load_with_adapter(
            &location.checkpoint_dir,
            location.adapter_dir.as_deref(),
            &LoadOptions {
                dtype,
                device: self.device.clone(),
            },
        )?;
        let rows = read_rows(&ctx.inputs[self.data_slot].path(&self.data_file))?;
        let images = ImageStore::open(&ctx.inputs[self.dataset_slot].path(IMAGES_FILE))?;

        let (parser, mode) = self.answer_mode(&runner)?;
        let job = EvalJob {
            runner: &runner,
            labels,
            parser,
            mode,
            batch_size: self.params.batch_size.max(1) as usize,
        };
        let bar = ctx.progress.bar(rows.rows.len() as u64, ctx.name);
        let mut records = Vec::with_capacity(rows.rows.len());
        // Images are decoded one batch at a time: a 10,000-photo split never sits in memory.
        for chunk in rows.rows.chunks(job.batch_size) {
            let mut samples = Vec::with_capacity(chunk.len());
            for row in chunk {
                let rendered = render_prompt(
                    &self.prompt,
                    labels,
                    &RowContext {
                        row_id: row.row_id.clone(),
                        image_id: row.image_id.clone(),
                        label: Some(row.label.clone()),
                    },
                    &self.pipeline_params,
                )?;
                let read_started = Instant::now();
                // Kept encoded: the job decodes one image at a time (see `run`).
                let image = match images.get(&row.image_id) {
                    Ok(stored) => SampleImage::Encoded {
                        bytes: stored.bytes,
                        max_pixels: self.max_image_pixels,
                    },
                    Err(e) => SampleImage::Failed(e.to_string()),
                };
                samples.push(EvalSample {
                    row_id: row.row_id.clone(),
                    image_id: row.image_id.clone(),
                    ground_truth: row.label.clone(),
                    image,
                    decode_ms: read_started.elapsed().as_secs_f64() * 1000.0,
                    conversation: rendered.conversation(),
                });
            }
            records.extend(job.run(samples, |n| bar.inc(n as u64))?);
        }
        bar.finish_and_clear();

        let mut metrics = compute_metrics(
            &records,
            labels,
            &MetricsOptions {
                recall_of: self.params.positive_class.clone(),
                calibration_bins: 10,
                top_k: vec![2, 3, 5],
                wall_time_s: Some(started.elapsed().as_secs_f64()),
            },
        )?;
        metrics.device = Some(device_label(runner.device()));
        let image_source = |id: &str| images.get(id).ok().map(|stored| stored.bytes);
        write_eval_outputs(ctx.out_dir, labels, &records, &metrics, &image_source)?;
        let report = ReportInput {
            title: ctx.name.to_owned(),
            stages: vec![StageReport {
                name: ctx.name.to_owned(),
                labels: labels.clone(),
                records,
                metrics: metrics.clone(),
                curves: Vec::new(),
            }],
        };
        write_html(
            &ctx.out_path(REPORT_FILE),
            &report,
            &image_source,
            &HtmlOptions::default(),
        )?;

        let mut warnings = Vec::new();
        if metrics.invalid_rate > 0.0 {
            warnings.push(format!(
                "{:.1}% of answers were invalid (counted as wrong)",
                metrics.invalid_rate * 100.0
            ));
        }
        Ok(StageOutcome {
            metadata: json!({
                "accuracy": metrics.accuracy,
                "invalid_rate": metrics.invalid_rate,
                "n": metrics.n,
                "seconds": started.elapsed().as_secs_f64(),
                // What ran it: latencies mean little without the device and dtype.
                "device": metrics.device,
                "dtype": dtype_name(dtype),
            }),
            warnings,
        })
    }

    fn exports(&self) -> Vec<Export> {
        export_files(
            &[
                RECORDS_FILE,
                METRICS_FILE,
                PREDICTIONS_CSV_FILE,
                REPORT_FILE,
            ],
            &self.export_dir,
        )
    }
}

impl EvalStage {
    /// The parser and the answer mode: label scoring, constrained or free generation.
    fn answer_mode(&self, runner: &ModelRunner) -> Result<(AnswerParser, AnswerMode), StageError> {
        let labels = &self.params.labels.values;
        let compile = |spec: &GrammarSpec| -> Result<Arc<CompiledGrammar>, StageError> {
            Ok(Arc::new(CompiledGrammar::compile(spec, runner.vocab())?))
        };
        let parser = match &self.grammar {
            Some(spec) => AnswerParser::for_grammar(spec, None, Some(labels)),
            None => AnswerParser::choice(labels.clone()),
        };
        let mode = match self.params.scoring {
            Scoring::Labels => {
                // Without a declared grammar, score the plain labels.
                let spec = self.grammar.clone().unwrap_or(GrammarSpec::Choice {
                    labels: labels.clone(),
                });
                AnswerMode::ScoreLabels {
                    scorer: LabelScorer::new(&compile(&spec)?, None)?,
                }
            }
            Scoring::Generate => AnswerMode::Generate {
                options: DecodeOptions {
                    max_new_tokens: self.params.max_new_tokens as usize,
                    sampling: Sampling {
                        temperature: self.params.temperature as f32,
                        top_p: None,
                        min_p: self.params.min_p.map(|p| p as f32),
                        repetition_penalty: self.params.repetition_penalty.map(|p| p as f32),
                        seed: 0,
                    },
                },
                grammar: match &self.grammar {
                    Some(spec) => {
                        // A budget no answer fits is refused before any sample runs.
                        let grammar = compile(spec)?;
                        grammar.check_budget(self.params.max_new_tokens as usize)?;
                        Some(grammar)
                    }
                    None => None,
                },
            },
        };
        Ok((parser, mode))
    }
}

/// The dtype named in a model entry (`None` → f32).
pub(crate) fn parse_dtype(name: Option<&str>) -> Result<DType, StageError> {
    match name.unwrap_or("f32") {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("unknown dtype `{other}` (expected f32, f16 or bf16)").into()),
    }
}

/// The name [`parse_dtype`] reads back.
pub(crate) fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// `files` of an entry exported under the same names into `dir`.
pub(crate) fn export_files(files: &[&str], dir: &std::path::Path) -> Vec<Export> {
    files
        .iter()
        .map(|file| Export {
            file: (*file).to_owned(),
            target: dir.join(file),
        })
        .collect()
}
