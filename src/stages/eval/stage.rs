//! The `eval` stage: runs a model (or a fine-tune) over a data table with a prompt, an optional
//! output grammar and a label set, and writes records, metrics, the tutorial CSV and the HTML
//! report into the cache; the executor copies them to `evals/<pipeline>/<stage>/` ([`Stage::exports`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use serde_json::{Value, json};

use super::run::{AnswerMode, EvalJob, EvalSample, SampleImage};
use super::{
    EvalRecord, METRICS_FILE, MetricsOptions, PREDICTIONS_CSV_FILE, RECORDS_FILE, REPORT_FILE,
    compute_metrics, read_records_parquet, write_eval_outputs, write_records_parquet,
};
use crate::cache::CacheEntry;
use crate::decode::{AnswerParser, CompiledGrammar, GrammarSpec, LabelScorer};
use crate::dtype::Dtype;
use crate::exec::{Export, ShardIndex, Sharded, Stage, StageContext, StageError, StageOutcome};
use crate::file_error::FileError;
use crate::model::checkpoint::LoadOptions;
use crate::model::device::device_label;
use crate::runner::{DecodeOptions, ModelRunner};
use crate::stages::data::DataInput;
use crate::stages::model::{ModelLocation, ModelResolver};
use crate::stages::prompt::{PromptTemplates, RowContext, render_prompt};
use crate::stages::report::{HtmlOptions, ReportInput, StageReport, write_html};

/// Bumped when the eval stage's output for the same inputs changes.
// 2: a sampled answer is seeded by its row id, not its place in the batch; 16-bit gray clips.
// 3: `predictions.csv` embeds the original image files; records hold per-sample latency and
//    `batch_size`.
// 4: images over the pixel cap (PIL's, or the dataset's `max_image_pixels`) are error rows.
// 5: a grammar-constrained answer closes before `max_new_tokens` runs out.
// 6: sampled generation (temperature > 0) draws from `crate::rng` (PCG-64), not `StdRng`.
// 7: rows whose image failed at ingest are error rows; an image error row has no `image_id`, so
//    `predictions.csv` and the report show no content for it; report thumbnails are decoded as
//    the model decodes (pixel cap, EXIF orientation).
// 8: `metrics.json` holds `model_bytes`, the size of the model files loaded.
const EVAL_CODE_VERSION: u32 = 8;

/// How an eval gets its answers.
#[derive(Clone, Debug)]
pub(crate) enum EvalAnswer {
    /// The exact probability of every label (under the output grammar, if any).
    ScoreLabels,
    /// Generated text, held to the output grammar if there is one.
    Generate(DecodeOptions),
}

/// What an `eval` stage runs.
#[derive(Clone, Debug)]
pub(crate) struct EvalConfig {
    /// The node's canonical parameters. Referenced prompt, grammar and model nodes are exec
    /// inputs, so their own fingerprints cover their content.
    pub params: Value,
    pub labels: Vec<String>,
    pub prompt: PromptTemplates,
    pub grammar: Option<GrammarSpec>,
    /// The pipeline's params, which the templates may read.
    pub pipeline_params: BTreeMap<String, Value>,
    /// The input slot of the model entry.
    pub model_slot: usize,
    pub data: DataInput,
    /// The dataset's pixel cap (`max_image_pixels`), applied again when decoding.
    pub max_image_pixels: u64,
    pub batch_size: usize,
    pub answer: EvalAnswer,
    /// The class whose recall the metrics single out, if any.
    pub positive_class: Option<String>,
    /// Where the exports go (`evals/<pipeline>/<stage>/`).
    pub export_dir: PathBuf,
    /// Finds the model's folders on this machine (never part of a fingerprint).
    pub models: ModelResolver,
    /// Not in [`Stage::params`]: the device changes where answers are computed, not what they are.
    pub device: Device,
    /// `shards = N` on the stage. Not in [`Stage::params`]: an execution setting, the merged
    /// output equals an unsharded run's.
    pub shards: Option<usize>,
}

/// A configured eval stage.
pub(crate) struct EvalStage {
    config: EvalConfig,
}

impl EvalStage {
    pub(crate) fn from_config(config: EvalConfig) -> Self {
        Self { config }
    }
}

impl Stage for EvalStage {
    fn kind(&self) -> &'static str {
        "eval"
    }

    fn uses_device(&self) -> bool {
        true
    }

    fn code_version(&self) -> u32 {
        EVAL_CODE_VERSION
    }

    fn params(&self) -> Value {
        // Referenced prompt/grammar/model nodes are exec inputs, so their own fingerprints cover
        // their content; the pipeline params a template reads are covered by the prompt node.
        self.config.params.clone()
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let started = Instant::now();
        let loaded = self.load(ctx)?;
        let records = self.answer(ctx, &loaded, None)?;
        let seconds = started.elapsed().as_secs_f64();
        self.finish(
            ctx,
            records,
            Some(device_label(loaded.runner.device())),
            loaded.dtype,
            &loaded.location,
            seconds,
        )
    }

    fn exports(&self) -> Vec<Export> {
        Export::all(
            &[
                RECORDS_FILE,
                METRICS_FILE,
                PREDICTIONS_CSV_FILE,
                REPORT_FILE,
            ],
            &self.config.export_dir,
        )
    }

    fn sharded(&self) -> Option<&dyn Sharded> {
        Some(self)
    }

    fn shards(&self) -> Option<usize> {
        self.config.shards
    }
}

/// A shard's entry holds its rows' records (in row order) and, in its metadata, the device and
/// dtype that computed them and its seconds; the merge computes everything else from the records,
/// exactly as an unsharded run does.
impl Sharded for EvalStage {
    fn run_shard(
        &self,
        ctx: &mut StageContext<'_>,
        shard: ShardIndex,
    ) -> Result<StageOutcome, StageError> {
        let started = Instant::now();
        let loaded = self.load(ctx)?;
        let records = self.answer(ctx, &loaded, Some(shard))?;
        write_records_parquet(&ctx.out_path(RECORDS_FILE), &self.config.labels, &records)?;
        Ok(StageOutcome {
            metadata: json!({
                "shard": shard,
                "n": records.len(),
                "seconds": started.elapsed().as_secs_f64(),
                "device": device_label(loaded.runner.device()),
                "dtype": loaded.dtype.name(),
            }),
            warnings: Vec::new(),
        })
    }

    fn merge(
        &self,
        ctx: &mut StageContext<'_>,
        shards: &[CacheEntry],
    ) -> Result<StageOutcome, StageError> {
        let location = self
            .config
            .models
            .open(ctx.input(self.config.model_slot)?)?;
        let dtype = location.dtype.unwrap_or_default();
        let mut records = Vec::new();
        let mut seconds = 0.0;
        let mut device = None;
        for shard in shards {
            records.extend(read_records_parquet(&shard.path(RECORDS_FILE))?.records);
            let metadata = &shard.manifest().metadata["stage"];
            seconds += metadata["seconds"].as_f64().unwrap_or(0.0);
            if device.is_none() {
                device = metadata["device"].as_str().map(str::to_owned);
            }
        }
        self.finish(ctx, records, device, dtype, &location, seconds)
    }
}

/// A loaded model and where it came from.
struct Loaded {
    runner: ModelRunner,
    location: ModelLocation,
    dtype: Dtype,
}

impl EvalStage {
    fn load(&self, ctx: &StageContext<'_>) -> Result<Loaded, StageError> {
        let config = &self.config;
        let location = config.models.open(ctx.input(config.model_slot)?)?;
        let dtype = location.dtype.unwrap_or_default();
        let options = LoadOptions {
            dtype: dtype.to_candle(),
            device: config.device.clone(),
        };
        let runner = match &location.gguf {
            Some(pair) => ModelRunner::load_gguf(pair, &options)?,
            None => ModelRunner::load_with_adapter(
                &location.checkpoint_dir,
                location.adapter_dir.as_deref(),
                &options,
            )?,
        };
        Ok(Loaded {
            runner,
            location,
            dtype,
        })
    }

    /// The records of every row, or of `shard`'s rows (whole batches, see [`ShardIndex::range`]).
    fn answer(
        &self,
        ctx: &StageContext<'_>,
        loaded: &Loaded,
        shard: Option<ShardIndex>,
    ) -> Result<Vec<EvalRecord>, StageError> {
        let config = &self.config;
        let labels = &config.labels;
        let runner = &loaded.runner;
        let rows = config.data.read_rows(ctx)?;
        let images = config.data.open_images(ctx)?;
        let range = match shard {
            Some(shard) => shard.range(rows.rows.len(), config.batch_size),
            None => 0..rows.rows.len(),
        };
        let rows = &rows.rows[range];

        let (parser, mode) = self.answer_mode(runner)?;
        let job = EvalJob {
            runner,
            labels,
            parser,
            mode,
            batch_size: config.batch_size,
        };
        let bar = ctx.progress.bar(rows.len() as u64, ctx.name);
        let mut records = Vec::with_capacity(rows.len());
        // Images are decoded one batch at a time: a 10,000-photo split never sits in memory.
        for chunk in rows.chunks(job.batch_size) {
            let mut samples = Vec::with_capacity(chunk.len());
            for row in chunk {
                let rendered = render_prompt(
                    &config.prompt,
                    labels,
                    &RowContext {
                        row_id: row.row_id.clone(),
                        image_id: row.image_id.clone(),
                        label: Some(row.label.clone()),
                    },
                    &config.pipeline_params,
                )?;
                let read_started = Instant::now();
                // Kept encoded: the job decodes one image at a time (see `run`). A row whose
                // image failed at ingest has none: it becomes an error row with that reason.
                let image = match &row.image_error {
                    Some(reason) => SampleImage::Failed(reason.clone()),
                    None => match images.get(&row.image_id) {
                        Ok(stored) => SampleImage::Encoded {
                            bytes: stored.bytes,
                            max_pixels: config.max_image_pixels,
                        },
                        Err(e) => SampleImage::Failed(e.to_string()),
                    },
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
        Ok(records)
    }

    /// Metrics, records, CSV and report from the records of every row, in row order.
    fn finish(
        &self,
        ctx: &StageContext<'_>,
        records: Vec<EvalRecord>,
        device: Option<String>,
        dtype: Dtype,
        location: &ModelLocation,
        seconds: f64,
    ) -> Result<StageOutcome, StageError> {
        let config = &self.config;
        let labels = &config.labels;
        let images = config.data.open_images(ctx)?;
        let mut metrics = compute_metrics(
            &records,
            labels,
            &MetricsOptions {
                recall_of: config.positive_class.clone(),
                calibration_bins: 10,
                top_k: vec![2, 3, 5],
                wall_time_s: Some(seconds),
            },
        )?;
        metrics.device = device;
        metrics.model_bytes = Some(model_bytes(location)?);
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
            &HtmlOptions {
                max_image_pixels: config.max_image_pixels,
                ..HtmlOptions::default()
            },
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
                "seconds": seconds,
                // What ran it: latencies mean little without the device and dtype.
                "device": metrics.device,
                "dtype": dtype.name(),
            }),
            warnings,
        })
    }
}

/// Bytes on disk of the model files an eval loads: a checkpoint's weights (`*.safetensors`) and
/// its adapter's, or a GGUF pair (an export's entry holds one).
fn model_bytes(location: &ModelLocation) -> Result<u64, FileError> {
    let sum = |dir: &Path| -> Result<u64, FileError> {
        let mut bytes = 0;
        for entry in std::fs::read_dir(dir).map_err(FileError::read(dir))? {
            let path = entry.map_err(FileError::read(dir))?.path();
            let weights = path
                .extension()
                .is_some_and(|e| e == "safetensors" || e == "gguf");
            if weights {
                // Hub snapshots link to their blobs: the size is the target's.
                bytes += std::fs::metadata(&path)
                    .map_err(FileError::read(&path))?
                    .len();
            }
        }
        Ok(bytes)
    };
    let mut bytes = sum(&location.checkpoint_dir)?;
    if let Some(adapter) = &location.adapter_dir {
        bytes += sum(adapter)?;
    }
    Ok(bytes)
}

impl EvalStage {
    /// The parser and the answer mode: label scoring, constrained or free generation.
    fn answer_mode(&self, runner: &ModelRunner) -> Result<(AnswerParser, AnswerMode), StageError> {
        let config = &self.config;
        let labels = &config.labels;
        let compile = |spec: &GrammarSpec| -> Result<Arc<CompiledGrammar>, StageError> {
            Ok(Arc::new(CompiledGrammar::compile(spec, runner.vocab())?))
        };
        let parser = match &config.grammar {
            Some(spec) => AnswerParser::for_grammar(spec, None, Some(labels)),
            None => AnswerParser::choice(labels.clone()),
        };
        let mode = match &config.answer {
            EvalAnswer::ScoreLabels => {
                // Without a declared grammar, score the plain labels.
                let spec = config.grammar.clone().unwrap_or(GrammarSpec::Choice {
                    labels: labels.clone(),
                });
                AnswerMode::ScoreLabels {
                    scorer: LabelScorer::new(&compile(&spec)?, None)?,
                }
            }
            EvalAnswer::Generate(options) => AnswerMode::Generate {
                options: options.clone(),
                grammar: match &config.grammar {
                    Some(spec) => {
                        // A budget no answer fits is refused before any sample runs.
                        let grammar = compile(spec)?;
                        grammar.check_budget(options.max_new_tokens)?;
                        Some(grammar)
                    }
                    None => None,
                },
            },
        };
        Ok((parser, mode))
    }
}
