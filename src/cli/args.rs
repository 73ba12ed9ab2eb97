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
