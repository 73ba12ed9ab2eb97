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
///   else. Copies outside the cache (reports under `evals/`) are declared by [`Stage::exports`]
///   and written by the executor, so they follow the entry whether it ran or came from the cache.
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

    /// Files of this stage's entry that the executor copies outside the cache after every run,
    /// ran or cached. Targets come from the current project location and never enter the entry,
    /// so a moved project gets fresh copies and a cached stage never leaves stale ones.
    fn exports(&self) -> Vec<Export> {
        Vec::new()
    }

    /// The stage to run when some inputs are missing (an input failed or could not be resolved),
    /// or `None` (the default) when the stage needs all of them and is skipped.
    ///
    /// The returned stage reads only the available inputs, in their original order, and its
    /// [`Stage::params`] must name what is missing: its fingerprint then differs from the
    /// complete stage's, so a partial output is never taken for the complete one.
    fn without_inputs(&self, _missing: &[MissingInput]) -> Option<Box<dyn Stage>> {
        None
    }
}

/// One exported file: `file` of the stage's entry, copied to `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// A file name in the entry (as in its manifest).
    pub file: String,
    /// Where the copy goes (`evals/<pipeline>/<stage>/<file>`).
    pub target: PathBuf,
}

/// An input of a stage that has no entry in this run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingInput {
    /// The input's position among the stage's inputs.
    pub slot: usize,
    /// The input stage's name.
    pub name: String,
    /// Why it is missing: the failure at its root (`` `big` failed: … ``), which may be an
    /// upstream stage's.
    pub reason: String,
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
}
