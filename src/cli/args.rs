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
    /// Inspect and maintain the stage cache.
    #[command(subcommand)]
    Cache(CacheCommand),
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
