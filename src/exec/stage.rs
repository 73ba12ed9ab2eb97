//! The contract between the executor and a stage kind.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::Progress;
use crate::cache::CacheEntry;

/// An error a stage reports; the executor marks the stage failed and skips its dependents.
pub type StageError = Box<dyn std::error::Error + Send + Sync>;

/// One stage kind's implementation, configured with its typed parameters.
///
/// Contract:
/// - [`Stage::params`] and [`Stage::external_state`] determine the output together with the
///   inputs: the same values and inputs must produce equivalent output.
/// - [`Stage::run`] writes plain files (usually Parquet) into [`StageContext::out_dir`] and nothing
///   else into the cache; it may write exports (reports, CSV copies) outside the cache and list
///   them in [`StageOutcome::exports`].
/// - A bad row is data, not an error: record it in an output table and a warning.
pub trait Stage: Send + Sync {
    /// The kind as written in a pipeline (`dataset`, `split`, `eval`, …).
    fn kind(&self) -> &'static str;

    /// Bumped whenever this kind's output for the same parameters and inputs changes, so caches
    /// written by older code are not trusted.
    fn code_version(&self) -> u32;

    /// Canonical parameters: everything the user wrote that affects the output.
    fn params(&self) -> Value;

    /// A cheap summary of state outside the cache that the stage reads (e.g. size and mtime of
    /// every local file it ingests). Part of the fingerprint; must not read file contents of large
    /// inputs, since it is computed on every run, cached or not.
    fn external_state(&self) -> Result<Value, StageError> {
        Ok(Value::Null)
    }

    /// Computes the stage's output.
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError>;
}

/// What a running stage sees.
pub struct StageContext<'a> {
    /// The stage's name in the pipeline.
    pub name: &'a str,
    /// Cache entries of the stage's inputs, in the order the stage declared them.
    pub inputs: &'a [CacheEntry],
    /// Where the stage writes its output files (a temp folder renamed into the cache on success).
    pub out_dir: &'a Path,
    /// Progress reporting (hidden when stderr is not a terminal).
    pub progress: &'a Progress,
    /// A scratch folder that belongs to this stage's fingerprint and survives a failed or killed
    /// run (created on demand by the stage), so long stages can checkpoint and resume; the
    /// executor deletes it once the stage's entry is committed.
    pub work_dir: &'a Path,
}

impl StageContext<'_> {
    /// Path of output file `name` (a plain file name).
    pub fn out_path(&self, name: &str) -> PathBuf {
        self.out_dir.join(name)
    }
}

/// What a successful stage returns besides its files.
#[derive(Clone, Debug, Default)]
pub struct StageOutcome {
    /// Free-form metadata stored in the entry's manifest (counts, labels, metrics…).
    pub metadata: Value,
    /// Things a person should know (rejected rows, unknown drop ids…); also stored in the manifest
    /// so a cached rerun shows them again.
    pub warnings: Vec<String>,
    /// Files written outside the cache (reports, CSV exports), listed in the run summary.
    pub exports: Vec<PathBuf>,
}
