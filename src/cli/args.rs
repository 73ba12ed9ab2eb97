//! Every flag, documented once, where it is defined (the doc comments are the `--help` text).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Turn small local vision-language models into accurate, fast image classifiers.
#[derive(Debug, Parser)]
#[command(name = "vlmpipe", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
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
    /// Write a fine-tune as a standalone checkpoint (runs the stage first when it is not cached).
    Export(ExportArgs),
}

/// Flags of `run` and `watch`.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// The pipeline file.
    pub file: PathBuf,
    #[command(flatten)]
    pub params: ParamOverrides,
    #[command(flatten)]
    pub cache: CacheDirArg,
    /// Recompute this stage even when it is cached (repeatable).
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
}

/// Flags of `render`.
#[derive(Debug, Args, Clone)]
pub struct RenderArgs {
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

/// Flags of `export`.
#[derive(Debug, Args, Clone)]
pub struct ExportArgs {
    /// The pipeline file.
    pub file: PathBuf,
    /// A `finetune` stage.
    pub stage: String,
    /// Write the base weights with the adapter merged in, in the Hub layout, to this folder
    /// (replaced if it exists).
    #[arg(long, value_name = "DIR")]
    pub merged: PathBuf,
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
}

/// `--set NAME=VALUE` overrides of the pipeline's `param`s.
#[derive(Debug, Args, Clone, Default)]
pub struct ParamOverrides {
    /// Override a `param` of the pipeline (repeatable), e.g. `--set n_eval=10`.
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_override)]
    pub set: Vec<(String, String)>,
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
pub enum DiagnosticFormat {
    /// For people: file:line:column, the source line, the offending text underlined, a hint.
    Human,
    /// A JSON array, for editors and scripts.
    Json,
}

/// How `graph` draws the DAG.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum GraphFormat {
    Text,
    Dot,
    Mermaid,
}

/// Where the cache lives.
#[derive(Debug, Args, Clone)]
pub struct CacheDirArg {
    /// Cache directory [default: `.vlmpipe/` beside the pipeline, or in the current directory].
    #[arg(long, env = "VLMPIPE_CACHE", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// `vlmpipe cache …`
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List cache entries: fingerprint, stage, kind, size, age.
    Ls {
        #[command(flatten)]
        cache: CacheDirArg,
    },
    /// Remove entries older than a number of days (and any broken or half-written ones).
    Gc {
        #[command(flatten)]
        cache: CacheDirArg,
        /// Remove entries created more than this many days ago.
        #[arg(long, value_name = "DAYS", default_value_t = 30.0)]
        older_than_days: f64,
    },
    /// Rehash every file of every entry and report the ones that do not match.
    Verify {
        #[command(flatten)]
        cache: CacheDirArg,
    },
}
