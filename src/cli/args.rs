//! Every flag, documented once, where it is defined (the doc comments are the `--help` text).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::model::device::DeviceChoice;

/// Turn small local vision-language models into accurate, fast image classifiers.
#[derive(Debug, Parser)]
#[command(name = "vlmpipe", version, long_version = crate::model::device::LONG_VERSION, about, long_about = None)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Check a pipeline file: print every error with file:line:column, exit 1 if there are any.
    Check {
        /// The pipeline file.
        file: PathBuf,
        #[command(flatten)]
        params: ParamOverrides,
        /// Output format of the diagnostics.
        #[arg(long, value_enum, default_value_t = DiagnosticFormat::Human)]
        format: DiagnosticFormat,
    },
    /// Show the pipeline's stages and their dependencies.
    Graph {
        /// The pipeline file.
        file: PathBuf,
        #[command(flatten)]
        params: ParamOverrides,
        /// `text` (an indented tree), `dot` (Graphviz) or `mermaid`.
        #[arg(long, value_enum, default_value_t = GraphFormat::Text)]
        format: GraphFormat,
    },
    /// Inspect and maintain the stage cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Run a pipeline: every stage whose inputs or parameters changed, the rest from the cache.
    Run(RunArgs),
    /// Run a pipeline, then rerun it whenever it or a file it reads is saved.
    Watch(RunArgs),
    /// Print the exact prompt a stage sends to the model for one row of its data.
    Render(RenderArgs),
    /// Print the headline metrics of eval stages that ran, and the path of their HTML report.
    Report(ReportArgs),
    /// List the samples of an eval stage that ran (`--misclassified`: only the wrong ones).
    Show(ShowArgs),
    /// Answer one question about one image with a model (greedy by default).
    Infer(InferArgs),
    /// Time the model stages (and compare with transformers on the same inputs).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Write a fine-tune as a standalone checkpoint (runs the stage first when it is not cached).
    Export(ExportArgs),
    /// Compute one shard of one stage into the cache and exit (what cluster tasks run).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

/// Flags of `run` and `watch`.
#[derive(Debug, Args, Clone)]
pub(crate) struct RunArgs {
    /// The pipeline file.
    pub file: PathBuf,
    #[command(flatten)]
    pub params: ParamOverrides,
    #[command(flatten)]
    pub cache: CacheDirArg,
    /// Recompute this stage from scratch even when it is cached; a fine-tune discards its
    /// checkpoints rather than resuming (repeatable).
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// Run only this stage and the stages it reads (repeatable).
    #[arg(long, value_name = "STAGE")]
    pub only: Vec<String>,
    /// Say which stages would run and why; run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Write a machine-readable summary (status, fingerprint, seconds, outputs per stage).
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    /// No progress bars or per-stage messages (the summary table is still printed).
    #[arg(long)]
    pub quiet: bool,
    /// Where eval and report stages write exports [default: `evals/<pipeline>/` beside the pipeline].
    #[arg(long, value_name = "DIR")]
    pub evals_dir: Option<PathBuf>,
    /// Seconds to wait for another run holding the cache lock.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    pub lock_wait: f64,
    /// Split every shardable stage (evals) into N shards, each its own cache entry; overrides
    /// `shards =` on the stage (1: unsharded). Never part of a fingerprint.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub shards: Option<u32>,
    /// Run up to N independent stages at the same time [default: the CPU cores, with one model
    /// stage (eval, finetune, export) at a time per device].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: Option<u32>,
    #[command(flatten)]
    pub device: DeviceArg,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Flags of the hidden `worker` command: one shard of one stage, or a whole stage, for a cluster
/// engine's task.
#[derive(Debug, Args, Clone)]
#[command(group(clap::ArgGroup::new("what").args(["file", "probe"]).required(true)))]
pub(crate) struct WorkerArgs {
    /// The pipeline file (the driver's, with the same `--set`/`--params`).
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub params: ParamOverrides,
    #[command(flatten)]
    pub cache: CacheDirArg,
    /// The stage to compute (its shard with `--shard`, else all of it).
    #[arg(long, value_name = "NAME", requires = "file")]
    pub stage: Option<String>,
    /// Which shard, from 0.
    #[arg(long, value_name = "K", requires = "file")]
    pub shard: Option<usize>,
    /// How many shards the stage has.
    #[arg(long, value_name = "N", requires = "file")]
    pub of: Option<usize>,
    /// Seconds to wait for a `gc` holding the cache, or another worker on the same shard.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    pub lock_wait: f64,
    /// Only read the probe file the driver wrote at PATH and write `PATH.seen` beside it (checks
    /// that the cache is on a filesystem this machine sees).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["file", "stage", "shard", "of"])]
    pub probe: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArg,
}

/// Where the shards of `run` are computed (`--executor slurm`); each flag wins over the same
/// setting in the profile (`vlmpipe.toml` beside the pipeline, or `--profile`).
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct ClusterArgs {
    /// Where sharded stages compute their shards: `local` (this process) or `slurm` (one
    /// `sbatch` job array per stage; the cache must be on the cluster's shared filesystem)
    /// [default: the profile's `executor`, else local].
    #[arg(long, value_enum, value_name = "ENGINE")]
    pub executor: Option<crate::slurm::Executor>,
    /// A profile file (TOML: `executor`, a `[slurm]` table) [default: `vlmpipe.toml` beside the
    /// pipeline file, when there is one].
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Slurm partition of the tasks [default: the cluster's].
    #[arg(long, value_name = "P")]
    pub partition: Option<String>,
    /// GPUs per Slurm task (`sbatch --gpus-per-task`).
    #[arg(long, value_name = "N")]
    pub gpus_per_task: Option<u32>,
    /// CPUs per Slurm task (`sbatch --cpus-per-task`).
    #[arg(long, value_name = "N")]
    pub cpus_per_task: Option<u32>,
    /// At most K tasks of a stage at once (`sbatch --array=…%K`).
    #[arg(long, value_name = "K")]
    pub max_parallel: Option<u32>,
    /// One more `sbatch` argument, after vlmpipe's (repeatable), e.g. `--sbatch-arg=--time=1:00:00`.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub sbatch_arg: Vec<String>,
}

impl ClusterArgs {
    /// The Slurm settings these flags set (the rest come from the profile).
    pub(crate) fn slurm_settings(&self) -> crate::slurm::SlurmSettings {
        crate::slurm::SlurmSettings {
            partition: self.partition.clone(),
            gpus_per_task: self.gpus_per_task,
            cpus_per_task: self.cpus_per_task,
            max_parallel: self.max_parallel,
            sbatch_args: self.sbatch_arg.clone(),
            ..Default::default()
        }
    }
}

/// Flags of `render`.
#[derive(Debug, Args, Clone)]
pub(crate) struct RenderArgs {
    /// The pipeline file.
    pub file: PathBuf,
    /// An `eval` or `finetune` stage.
    pub stage: String,
    /// Which row of the stage's data (0-based, in the data's row order).
    #[arg(long, default_value_t = 0)]
    pub row: usize,
    /// Print the template-rendered text only, without expanding the image placeholder.
    #[arg(long)]
    pub no_expand: bool,
    #[command(flatten)]
    pub params: ParamOverrides,
    #[command(flatten)]
    pub cache: CacheDirArg,
}

/// Flags of `report`.
#[derive(Debug, Args, Clone)]
pub(crate) struct ReportArgs {
    /// The pipeline file.
    pub file: PathBuf,
    /// An `eval` or `report` stage [default: every eval stage].
    pub stage: Option<String>,
    #[command(flatten)]
    pub params: ParamOverrides,
    #[command(flatten)]
    pub cache: CacheDirArg,
}

/// Flags of `show`.
#[derive(Debug, Args, Clone)]
pub(crate) struct ShowArgs {
    /// The pipeline file.
    pub file: PathBuf,
    /// An `eval` stage.
    pub stage: String,
    /// Only the misclassified and invalid samples, with the model's raw answer.
    #[arg(long)]
    pub misclassified: bool,
    /// Truncate raw answers to this many characters.
    #[arg(long, default_value_t = 80)]
    pub max_answer_chars: usize,
    #[command(flatten)]
    pub params: ParamOverrides,
    #[command(flatten)]
    pub cache: CacheDirArg,
}

fn parse_gguf_quant(text: &str) -> Result<crate::gguf::GgufQuant, String> {
    text.parse()
        .map_err(|e: crate::gguf::UnknownQuant| e.to_string())
}

/// Flags of `export`.
#[derive(Debug, Args, Clone)]
pub(crate) struct ExportArgs {
    /// The pipeline file.
    pub file: Option<PathBuf>,
    /// A `finetune` stage, or a `model` with `adapter:` (`--gguf` also takes a plain `model`).
    pub stage: Option<String>,
    /// Write the base weights with the adapter merged in, in the Hub layout, to this folder. A
    /// folder that exists must be empty or a previous export of the same stage (vlmpipe marks
    /// its exports with `vlmpipe-export.json`); nothing else in it is ever deleted.
    #[arg(long, value_name = "DIR", conflicts_with = "gguf")]
    pub merged: Option<PathBuf>,
    /// Write llama.cpp's GGUF pair into this folder: `<name>-<QUANT>.gguf` (the text model,
    /// architecture `lfm2`, with tokenizer and chat template) and `mmproj-<name>-<QUANT>.gguf`
    /// (vision tower and projector). A fine-tune's adapter is merged in f32 first.
    #[arg(long, value_name = "DIR")]
    pub gguf: Option<PathBuf>,
    /// With `--gguf`: export this model (a Hub-layout folder or Hub id) instead of a stage.
    #[arg(long, value_name = "MODEL", requires = "gguf", conflicts_with_all = ["file", "stage"])]
    pub model: Option<String>,
    /// With `--gguf`: the text model's type: F32, F16, BF16, Q8_0, or Q4_K_M (llama.cpp's
    /// k-quant mixture, the file `llama-quantize` makes of the F16 export).
    #[arg(long, value_name = "QUANT", default_value = "F16", value_parser = parse_gguf_quant)]
    pub quant: crate::gguf::GgufQuant,
    /// With `--gguf`: the mmproj's type, F32, F16, BF16 or Q8_0 [default: the text model's; F16
    /// with Q4_K_M].
    #[arg(long, value_name = "QUANT", value_parser = parse_gguf_quant)]
    pub mmproj_quant: Option<crate::gguf::GgufQuant>,
    /// With `--gguf`: `<name>` in the file names and `general.name` [default: the stage's or
    /// the model folder's name].
    #[arg(long)]
    pub name: Option<String>,
    /// The dtype of the saved weights. The merge is computed in f32; f32 (the default) keeps
    /// the whole update, so the export answers exactly like the model vlmpipe evaluated, while
    /// bf16/f16 halve the size but round small LoRA updates away (the export says how much).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Write into a folder that holds other files, replacing only files of the names the export
    /// writes (config, weights, tokenizer and processor files, `vlmpipe-export.json`; with
    /// `--gguf`, the two `.gguf` files).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub params: ParamOverrides,
    #[command(flatten)]
    pub cache: CacheDirArg,
    /// Where eval and report stages write exports [default: `evals/<pipeline>/` beside the pipeline].
    #[arg(long, value_name = "DIR")]
    pub evals_dir: Option<PathBuf>,
    /// No progress bars or per-stage messages.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub device: DeviceArg,
}

/// How every command that loads a pipeline loads it: `--set NAME=VALUE` overrides of its
/// `param`s and `--allow-read` consents.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct ParamOverrides {
    /// Override a `param` of the pipeline (repeatable), e.g. `--set n_eval=10`.
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_override)]
    pub set: Vec<(String, String)>,
    /// Let the pipeline read this file or folder (and everything under it) besides its own
    /// folder and the Hub cache (repeatable), e.g. `--allow-read ../shared`. A pipeline file
    /// may come from someone else, so by default it cannot read your other files. Never part
    /// of a fingerprint.
    #[arg(long = "allow-read", value_name = "PATH")]
    pub allow_read: Vec<PathBuf>,
}

impl ParamOverrides {
    /// Where the pipeline `file` may read: its folder, the Hub cache and `--allow-read`.
    pub(crate) fn read_policy(&self, file: &std::path::Path) -> crate::read_policy::ReadPolicy {
        crate::read_policy::ReadPolicy::for_pipeline(file, &self.allow_read)
    }
}

fn parse_override(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.to_owned()))
        }
        _ => Err(format!("expected NAME=VALUE, found `{text}`")),
    }
}

/// How `check` prints diagnostics.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum DiagnosticFormat {
    /// For people: file:line:column, the source line, the offending text underlined, a hint.
    Human,
    /// A JSON array, for editors and scripts.
    Json,
}

/// How `graph` draws the DAG.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum GraphFormat {
    Text,
    Dot,
    Mermaid,
}

/// Where models compute.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct DeviceArg {
    /// Where the model computes: `auto` (a GPU when this build has a backend and one opens, else
    /// the CPU), `cpu`, `cuda[:N]`, `metal[:N]` or `gpu`. GPUs need a build with
    /// `--features cuda` or `--features metal`. Never part of a stage fingerprint.
    #[arg(long, env = "VLMPIPE_DEVICE", value_name = "DEVICE", default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

/// Where the cache lives.
#[derive(Debug, Args, Clone)]
pub(crate) struct CacheDirArg {
    /// Cache directory [default: `.vlmpipe/` beside the pipeline, or in the current directory].
    #[arg(long, env = "VLMPIPE_CACHE", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// `vlmpipe cache …`
#[derive(Debug, Subcommand)]
pub(crate) enum CacheCommand {
    /// List cache entries: fingerprint, stage, kind, size, age.
    Ls {
        /// A pipeline file: use the cache beside it (`.vlmpipe/` in its folder).
        file: Option<PathBuf>,
        #[command(flatten)]
        cache: CacheDirArg,
    },
    /// Remove entries older than a number of days (and any broken or half-written ones).
    Gc {
        /// A pipeline file: use the cache beside it (`.vlmpipe/` in its folder).
        file: Option<PathBuf>,
        #[command(flatten)]
        cache: CacheDirArg,
        /// Remove entries created more than this many days ago.
        #[arg(long, value_name = "DAYS", default_value_t = 30.0)]
        older_than_days: f64,
    },
    /// Rehash every file of every entry; remove the entries that do not match (the next run
    /// recomputes them).
    Verify {
        /// A pipeline file: use the cache beside it (`.vlmpipe/` in its folder).
        file: Option<PathBuf>,
        #[command(flatten)]
        cache: CacheDirArg,
    },
}

/// The dtype weights are converted to and computed in (`--dtype`): the one [`Dtype`].
pub(super) use crate::dtype::Dtype as DtypeArg;

/// `vlmpipe infer …`: one image, one question.
///
/// The conversation is the system turn (with `--system`), then a user turn with the image first
/// and the text second, rendered with the model's chat template and the generation prompt.
/// Decoding flags left out take their value from the model's `generation_config.json`.
/// `--choice`, `--regex`, `--json-schema` and `--lark` constrain the answer (one at a time).
#[derive(Debug, Args, Clone)]
#[command(group(
    clap::ArgGroup::new("grammar")
        .args(["choice", "regex", "json_schema", "lark"])
        .multiple(false)
))]
#[command(group(clap::ArgGroup::new("label_grammar").args(["choice", "json_schema"])))]
pub(crate) struct InferArgs {
    /// The model: a local directory in the Hub layout, or a Hub id `org/name[@revision]`
    /// (the local Hub cache first; `HF_HUB_OFFLINE=1` forbids downloads), or a GGUF pair: a
    /// folder holding `<name>-<QUANT>.gguf` + `mmproj-….gguf`, or the text `.gguf` itself.
    #[arg(long, value_name = "REF")]
    pub model: String,
    /// A PEFT LoRA adapter to apply to `--model`: a folder with `adapter_config.json` and
    /// `adapter_model.safetensors` (PEFT's `save_pretrained`, or a vlmpipe fine-tune's
    /// `adapter/`), or a Hub id `org/name[@revision]`.
    #[arg(long, value_name = "REF")]
    pub adapter: Option<String>,
    /// The image file (JPEG, PNG, WebP, GIF, BMP or TIFF).
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// The question, sent after the image in the user turn.
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,
    /// A system turn before the user turn.
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Stop after this many generated tokens [default: generation_config.json's, else 64].
    #[arg(long, value_name = "N")]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy [default: greedy, unless generation_config.json samples].
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens whose probabilities sum to P.
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely one.
    #[arg(long, value_name = "P")]
    pub min_p: Option<f32>,
    /// transformers' repetition penalty (> 1 discourages repeats).
    #[arg(long, value_name = "R")]
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// The dtype to compute in.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Quantize the weights at load: `q8_0` (every projection and the LM head in Q8_0) or `q4_k`
    /// (decoder projections Q4_K, LM head Q6_K, vision tower and projector Q8_0), as llama.cpp
    /// stores them; a width a block type cannot take falls back per tensor, with a note.
    #[arg(long, value_name = "QUANT")]
    pub quant: Option<crate::model::quant::Quant>,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Write the prompt's last-position logits to this file (safetensors, tensor `logits`, f32 [vocab]).
    #[arg(long, value_name = "FILE")]
    pub dump_logits: Option<PathBuf>,
    /// Constrain the answer to one of these labels, comma-separated (e.g. `--choice cat,dog`).
    #[arg(long, value_name = "LABELS", value_delimiter = ',')]
    pub choice: Option<Vec<String>>,
    /// Constrain the whole answer to match this regular expression.
    #[arg(long, value_name = "REGEX")]
    pub regex: Option<String>,
    /// Constrain the answer to JSON matching the JSON Schema in this file.
    #[arg(long, value_name = "FILE")]
    pub json_schema: Option<PathBuf>,
    /// Constrain the answer to the context-free grammar in this file (llguidance's Lark dialect).
    #[arg(long, value_name = "FILE")]
    pub lark: Option<PathBuf>,
    /// Print every label's exact probability as JSON instead of generating (with `--choice`, or a
    /// `--json-schema` whose one required field is a string enum). With `--json`, the report
    /// holds the scores beside the generated answer.
    #[arg(long, requires = "label_grammar")]
    pub scores: bool,
    /// Print a JSON object (text, generated token ids, token counts, finish reason, timings, and
    /// with a grammar the parsed answer).
    #[arg(long)]
    pub json: bool,
}

/// `vlmpipe bench …`
#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Time one classification: preprocess, vision + projector, prefill, decode steps, end to end.
    Model(BenchModelArgs),
    /// Time grammar compilation, per-step masks and constrained-decoding overhead with a real
    /// tokenizer (2 labels, 49 labels, a JSON object).
    Grammar(BenchGrammarArgs),
    /// Ingest throughput (images/s) of a local class-per-folder image tree.
    Ingest(BenchIngestArgs),
    /// Time no-change reruns of a pipeline over a synthetic image folder.
    Rerun(BenchRerunArgs),
    /// Print the markdown table of BENCHMARKS.md from `bench model --json-out` reports (the
    /// range of the medians over the runs).
    Table(BenchTableArgs),
    /// Time one LoRA training step (vision, decoder forward, backward, AdamW) on a random-weight
    /// model, optionally next to PyTorch + peft on the same checkpoint and sequence.
    Train(BenchTrainArgs),
}

/// `vlmpipe bench train …`
#[derive(Debug, Args, Clone)]
pub(crate) struct BenchTrainArgs {
    /// The LFM2-VL `config.json` whose shapes the random-weight model takes.
    #[arg(long, value_name = "CONFIG.json")]
    pub config: PathBuf,
    /// Timed steps after one warm-up; the report gives medians.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = at_least_one)]
    pub steps: usize,
    /// Patch grid of the image view (24 x 32: a 384 x 512 image, 192 image tokens).
    #[arg(long, value_name = "N", default_value_t = 24, value_parser = at_least_one)]
    pub patch_rows: usize,
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = at_least_one)]
    pub patch_cols: usize,
    /// Text tokens besides the image and the answer.
    #[arg(long, value_name = "N", default_value_t = 76)]
    pub prompt_tokens: usize,
    /// Labelled answer tokens.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = at_least_one)]
    pub answer_tokens: usize,
    /// Compute threads (sets `RAYON_NUM_THREADS`; PyTorch pins 2 like its other references).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub threads: usize,
    /// A Python with torch, transformers and peft (e.g. `tests/reference/.venv-5/bin/python`):
    /// time PyTorch + peft's step on the same checkpoint and sequence in the same run.
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// The PyTorch benchmark script.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "tests/reference/bench_peft_train.py"
    )]
    pub peft_script: PathBuf,
    /// Where `--python` writes (or reuses) the random checkpoint both sides load [default: a
    /// temp dir].
    #[arg(long, value_name = "DIR")]
    pub random_dir: Option<PathBuf>,
    /// Also write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
}

/// `vlmpipe bench table REPORT.json…`
#[derive(Debug, Args, Clone)]
pub(crate) struct BenchTableArgs {
    /// Reports written by `bench model --python … --json-out`, one per run.
    #[arg(value_name = "REPORT", required = true)]
    pub reports: Vec<PathBuf>,
}

/// `vlmpipe bench grammar …`
#[derive(Debug, Args, Clone)]
pub(crate) struct BenchGrammarArgs {
    /// A Hugging Face `tokenizer.json` (LFM2's: `tokenizer.json` of an LFM2-VL checkpoint).
    #[arg(long, value_name = "PATH")]
    pub tokenizer: PathBuf,
    /// Fresh compilations per grammar (the median is reported).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub compile_repeats: usize,
    /// Sequences decoded per grammar.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub sequences: usize,
    /// Token limit per sequence.
    #[arg(long, value_name = "N", default_value_t = 48)]
    pub max_tokens: usize,
    /// A real decode step in milliseconds, to put the grammar's per-token cost in proportion.
    #[arg(long, value_name = "MS", default_value_t = 100.0)]
    pub model_step_ms: f64,
}

/// `vlmpipe bench ingest …`
#[derive(Debug, Args, Clone)]
pub(crate) struct BenchIngestArgs {
    /// A folder with one sub-folder of images per class.
    pub dir: PathBuf,
    /// Worker threads (0 = all cores).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// Decode every image fully instead of checking headers only.
    #[arg(long)]
    pub full_decode: bool,
}

/// `vlmpipe bench rerun …`
#[derive(Debug, Args, Clone)]
pub(crate) struct BenchRerunArgs {
    /// Images in the synthetic dataset (two classes, 16×16 PNGs).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub images: usize,
    /// Timed no-change reruns after the first run.
    #[arg(long, value_name = "M", default_value_t = 5)]
    pub reruns: usize,
    /// Run in this process (check + lower + execute) instead of spawning `vlmpipe run`, which
    /// leaves out process start-up.
    #[arg(long)]
    pub in_process: bool,
    /// Build the dataset and cache here and keep them [default: a temporary folder].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// `vlmpipe bench model …`
#[derive(Debug, Args, Clone)]
pub(crate) struct BenchModelArgs {
    /// A checkpoint directory (Hub layout), Hub id, or GGUF pair (as `infer --model`).
    #[arg(
        long,
        value_name = "REF",
        conflicts_with = "config",
        required_unless_present = "config"
    )]
    pub model: Option<String>,
    /// A PEFT LoRA adapter to apply to the model (a folder or a Hub id, as `infer --adapter`).
    /// Not with `--python`: merge it first (`vlmpipe export --merged`) to time transformers on
    /// the same weights.
    #[arg(long, value_name = "REF", conflicts_with = "python")]
    pub adapter: Option<String>,
    /// A `config.json` to build a model with random weights from (tokenizer and processor files
    /// are read from its folder). With `--python`, a random checkpoint is written once with
    /// `--random-dir` so both sides load the same weights.
    #[arg(long, value_name = "CONFIG.json")]
    pub config: Option<PathBuf>,
    /// The image to classify (`bench_transformers.py` gets the same one).
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// Compute threads (sets `RAYON_NUM_THREADS` for candle and `--threads` for transformers).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub threads: usize,
    /// Timed repetitions after one warm-up; the report gives medians and minimums.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub repeats: usize,
    /// Decode steps timed per repetition (transformers is given the same number; llama.cpp's decode
    /// is timed over at least 64, its classify compared at this number).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = at_least_one)]
    pub decode_steps: usize,
    /// The dtype to compute in (transformers too).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Also time the model quantized at load (`q8_0` or `q4_k`, as `infer --quant`) in the same
    /// run, step by step, with its ratio to the unquantized model, the label KL between them and
    /// decode time against the memory-bandwidth floor of each model's weights.
    #[arg(long, value_name = "QUANT")]
    pub quant: Option<crate::model::quant::Quant>,
    /// A folder holding llama.cpp's `llama-mtmd-cli`, in itself or in its `bin/` (`bash
    /// tests/llama_cpp/build.sh bins` prints such a folder): also time llama.cpp in the same run on the
    /// checkpoint exported by vlmpipe (`--llama-cpp-quant` text file, F16 mmproj), the same
    /// image and conversation, by the wall clock of whole processes, and print vlmpipe's ratios
    /// to it. Not with `--adapter`: merge it first (`vlmpipe export --merged`).
    #[arg(long, value_name = "DIR", conflicts_with = "adapter")]
    pub llama_cpp: Option<PathBuf>,
    /// The text file's type for `--llama-cpp`.
    #[arg(long, value_name = "QUANT", default_value = "Q8_0", value_parser = parse_gguf_quant)]
    pub llama_cpp_quant: crate::gguf::GgufQuant,
    // transformers computes on the same device (`metal` is torch's `mps`).
    #[command(flatten)]
    pub device: DeviceArg,
    /// A Python with transformers (e.g. `tests/reference/.venv-5/bin/python`): run the
    /// transformers benchmark on the same checkpoint and image in the same run and print ratios.
    #[arg(long, value_name = "PATH", requires = "transformers_script")]
    pub python: Option<PathBuf>,
    /// The transformers benchmark script (`tests/reference/bench_transformers.py`).
    #[arg(long, value_name = "PATH", requires = "python")]
    pub transformers_script: Option<PathBuf>,
    /// Where `--config --python` writes (or reuses) the random checkpoint [default: a temp dir].
    #[arg(long, value_name = "DIR")]
    pub random_dir: Option<PathBuf>,
    /// Also write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
}

/// A count that must be positive (`--decode-steps`).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}
