//! The contract between the executor and a stage kind.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::Progress;
use crate::cache::CacheEntry;
use crate::file_error::FileError;

/// Why a stage failed: the executor marks it failed, shows the message with its causes, and
/// skips what reads it.
///
/// Like anyhow's error it is not itself a `std::error::Error`, so `?` turns any error into one;
/// unlike it, the cause keeps its type: a file that failed is a [`FileError`] naming the file,
/// a missing input slot says so, and any other layer's error (data, Hub, model, decoding,
/// training, …) is kept as that type ([`StageError::downcast_ref`]).
#[derive(Debug)]
pub(crate) enum StageError {
    /// The stage has no input in a slot it was configured with (a lowering bug).
    NoInput(NoInput),
    /// A file could not be read or written.
    File(FileError),
    /// The error of the layer that failed.
    Layer(Box<dyn std::error::Error + Send + Sync>),
}

/// A stage reading an input slot it does not have.
#[derive(Debug, thiserror::Error)]
#[error("stage `{stage}` has no input #{slot} (a lowering bug)")]
pub(crate) struct NoInput {
    pub stage: String,
    pub slot: usize,
}

impl StageError {
    /// The error as a `std::error::Error`, whose `source` chain holds the causes.
    pub(crate) fn as_error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            StageError::NoInput(error) => error,
            StageError::File(error) => error,
            StageError::Layer(error) => error.as_ref(),
        }
    }

    /// An error that is only a message (stages should prefer their layer's typed error).
    pub(crate) fn msg(message: impl Into<String>) -> Self {
        StageError::Layer(message.into().into())
    }
}

impl std::fmt::Display for StageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self.as_error(), f)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for StageError {
    fn from(error: E) -> Self {
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(error);
        match boxed.downcast::<FileError>() {
            Ok(file) => StageError::File(*file),
            Err(other) => StageError::Layer(other),
        }
    }
}

/// One stage kind's implementation, configured with its typed parameters.
///
/// Contract:
/// - [`Stage::params`] and [`Stage::external_state`] determine the output together with the
///   inputs: the same values and inputs must produce equivalent output.
/// - [`Stage::run`] writes plain files (usually Parquet) into [`StageContext::out_dir`] and nothing
///   else. Copies outside the cache (reports under `evals/`) are declared by [`Stage::exports`]
///   and written by the executor, so they follow the entry whether it ran or came from the cache.
/// - A bad row is data, not an error: record it in an output table and a warning.
pub(crate) trait Stage: Send + Sync {
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

    /// How the stage computes its rows in shards, or `None` (the default) when it cannot.
    fn sharded(&self) -> Option<&dyn Sharded> {
        None
    }

    /// The shard count written on the stage (`shards = 8`), if any; `--shards` overrides it.
    /// An execution setting, never part of [`Stage::params`].
    fn shards(&self) -> Option<usize> {
        None
    }

    /// Whether the stage loads a model onto the device (eval, finetune, export): by default,
    /// `--jobs` runs one such stage at a time.
    fn uses_device(&self) -> bool {
        false
    }
}

/// Shard `index` (from 0) of `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ShardIndex {
    pub index: usize,
    pub count: usize,
}

impl ShardIndex {
    /// The items of `len` this shard computes: contiguous, in order, and made of whole groups of
    /// `unit` items (an eval's batches), so every item meets the same batch-mates as in an
    /// unsharded run. Shards past the last group are empty.
    pub fn range(&self, len: usize, unit: usize) -> std::ops::Range<usize> {
        let unit = unit.max(1);
        let groups = len.div_ceil(unit);
        let count = self.count.max(1);
        let group = |k: usize| groups * k / count;
        let start = (group(self.index) * unit).min(len);
        let end = (group(self.index + 1) * unit).min(len);
        start..end
    }
}

impl std::fmt::Display for ShardIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// A stage whose rows can be computed as separate shards, each its own cache entry, and merged
/// into exactly the output of an unsharded run (in row order; timings aside).
pub(crate) trait Sharded: Send + Sync {
    /// Computes the rows of `shard` into [`StageContext::out_dir`] (the stage's inputs as usual).
    fn run_shard(
        &self,
        ctx: &mut StageContext<'_>,
        shard: ShardIndex,
    ) -> Result<StageOutcome, StageError>;

    /// Writes the stage's whole output from its shards' entries, given in shard order.
    fn merge(
        &self,
        ctx: &mut StageContext<'_>,
        shards: &[CacheEntry],
    ) -> Result<StageOutcome, StageError>;
}

/// One exported file: `file` of the stage's entry, copied to `target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Export {
    /// A file name in the entry (as in its manifest).
    pub file: String,
    /// Where the copy goes (`evals/<pipeline>/<stage>/<file>`).
    pub target: PathBuf,
}

impl Export {
    /// `files` of an entry, exported under the same names into `dir`.
    pub(crate) fn all(files: &[&str], dir: &Path) -> Vec<Export> {
        files
            .iter()
            .map(|file| Export {
                file: (*file).to_owned(),
                target: dir.join(file),
            })
            .collect()
    }
}

/// An input of a stage that has no entry in this run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MissingInput {
    /// The input's position among the stage's inputs.
    pub slot: usize,
    /// The input stage's name.
    pub name: String,
    /// Why it is missing: the cause at its root, which may be an upstream stage's.
    pub reason: MissingCause,
}

/// Why a stage has no entry in this run (shown, for each input it lacks, by a partial stage).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MissingCause {
    /// `--only` left the stage out.
    NotSelected,
    /// The run was cancelled before the stage started (`watch` saw a newer save).
    Cancelled,
    /// `stage` failed, or could not resolve what it reads, with `reason`.
    Failed { stage: String, reason: String },
    /// `stage` ran without some of its inputs, so its output is not the whole one.
    Partial { stage: String, without: Vec<String> },
}

impl std::fmt::Display for MissingCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MissingCause::NotSelected => f.write_str("not selected by `--only`"),
            MissingCause::Cancelled => f.write_str("cancelled: a newer change is pending"),
            MissingCause::Failed { stage, reason } => write!(f, "`{stage}` failed: {reason}"),
            MissingCause::Partial { stage, without } => {
                let names: Vec<String> = without.iter().map(|n| format!("`{n}`")).collect();
                write!(f, "`{stage}` ran without {}", names.join(", "))
            }
        }
    }
}

/// What a running stage sees.
pub(crate) struct StageContext<'a> {
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
    pub(crate) fn out_path(&self, name: &str) -> PathBuf {
        self.out_dir.join(name)
    }

    /// The entry in input slot `slot`; a slot the stage does not have is a lowering bug,
    /// reported as an error rather than a panic.
    pub(crate) fn input(&self, slot: usize) -> Result<&CacheEntry, StageError> {
        self.inputs.get(slot).ok_or_else(|| {
            StageError::NoInput(NoInput {
                stage: self.name.to_owned(),
                slot,
            })
        })
    }
}

/// What a successful stage returns besides its files.
#[derive(Clone, Debug, Default)]
pub(crate) struct StageOutcome {
    /// Free-form metadata stored in the entry's manifest (counts, labels, metrics…).
    pub metadata: Value,
    /// Things a person should know (rejected rows, unknown drop ids…); also stored in the manifest
    /// so a cached rerun shows them again.
    pub warnings: Vec<String>,
}
