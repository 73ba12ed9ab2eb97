//! The executor: runs a graph of stages in dependency order against the content-addressed cache.
//!
//! The plan says *what* to compute; the executor decides order, caching and reporting.
//! Each stage's fingerprint is `blake3(kind, canonical params, external state, input fingerprints,
//! code version)` ([`crate::cache::fingerprint`]); a stage whose fingerprint has a verified cache
//! entry is not run again. Fingerprints depend only on parameters and upstream fingerprints, never
//! on outputs, so a dry run knows exactly what a real run would do.
//!
//! **API Boundary**: stages implement [`Stage`] and only see a [`StageContext`]; they never see
//! pipeline syntax, the cache layout or other stages.

mod executor;
mod exports;
mod history;
mod parallel;
mod progress;
mod shards;
mod stage;
mod summary;
mod worker;

pub(crate) use executor::{ExecError, ExecGraph, ExecNode, RunOptions, run};
pub(crate) use progress::Progress;
pub use shards::shard_fingerprint;
pub(crate) use shards::{ShardJob, ShardLauncher, ShardOutcome, ShardState, WholeJob};
pub use stage::ShardIndex;
pub(crate) use stage::{
    Export, MissingInput, Sharded, Stage, StageContext, StageError, StageOutcome,
};
pub use summary::{Elsewhere, RunSummary, StageReport, StageStatus};
pub(crate) use worker::{WorkerRequest, host_name, probe, run_worker};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_scale;
