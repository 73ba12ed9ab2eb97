//! `vlmpipe worker`: one shard of one stage, or one whole stage (a fine-tune sent out as one
//! job), computed into the cache by a process that a cluster engine started (a Slurm array task),
//! and the probe that checks the cache is visible there.
//!
//! A worker computes exactly its shard or stage: the stage's inputs must already be in the cache (the
//! driver computed them before sending the shards), else it fails naming them. It is idempotent:
//! a shard whose entry exists is found, not recomputed, and two workers given the same shard
//! compute it once (the shard's entry lock).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::executor::{Blocked, error_chain, identities, selection};
use super::shards::{ShardContext, compute_shard, compute_whole};
use super::{ExecGraph, Progress, ShardIndex, ShardOutcome};
use crate::cache::{CacheError, CacheStore, Fingerprint, Lookup, Verify};

/// What a worker is asked to compute.
#[derive(Clone, Debug)]
pub(crate) struct WorkerRequest {
    /// The stage's name in the pipeline.
    pub stage: String,
    /// The shard, or `None` for the whole stage.
    pub shard: Option<ShardIndex>,
    /// How long to wait for a `gc` holding the cache, or for another worker on the same shard.
    pub lock_wait: Duration,
    /// No progress bars or messages.
    pub quiet: bool,
}

/// Why a worker did not leave its shard's entry in the cache.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkerError {
    #[error("the pipeline has no stage `{stage}`{hint}")]
    UnknownStage { stage: String, hint: String },
    #[error("stage `{stage}` (`{kind}`) cannot be sharded; only eval and dataset stages can")]
    NotShardable { stage: String, kind: String },
    #[error("shard {index} of {count} does not exist (shards are numbered 0 to count - 1)")]
    BadShard { index: usize, count: usize },
    #[error("cannot compute the fingerprint of `{stage}`: {reason}")]
    Blocked { stage: String, reason: String },
    #[error(
        "the inputs of `{stage}` are not in the cache `{cache}`: {}; a worker computes only its \
         shard (hint: the driver, `vlmpipe run`, computes them first; check that the worker uses \
         the driver's cache and `--set` values)",
        missing.join(", ")
    )]
    MissingInputs {
        stage: String,
        cache: PathBuf,
        missing: Vec<String>,
    },
    #[error("{what} of `{stage}` failed: {reason}")]
    Failed {
        stage: String,
        /// `shard 2/4`, or `the computation` for a whole stage.
        what: String,
        reason: String,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Computes `request`'s shard (or whole stage) of `graph` into `store` (or finds it there).
pub(crate) fn run_worker(
    graph: &ExecGraph,
    store: &CacheStore,
    request: &WorkerRequest,
) -> Result<ShardOutcome, WorkerError> {
    if let Some(ShardIndex { index, count }) = request.shard
        && (count == 0 || index >= count)
    {
        return Err(WorkerError::BadShard { index, count });
    }
    let Some(position) = graph.nodes.iter().position(|n| n.name == request.stage) else {
        let hint = graph
            .nodes
            .iter()
            .map(|n| (strsim::jaro_winkler(&n.name, &request.stage), &n.name))
            .filter(|(score, _)| *score > 0.8)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, n)| format!(" (did you mean `{n}`?)"))
            .unwrap_or_default();
        return Err(WorkerError::UnknownStage {
            stage: request.stage.clone(),
            hint,
        });
    };
    let node = &graph.nodes[position];
    if request.shard.is_some() && node.stage.sharded().is_none() {
        return Err(WorkerError::NotShardable {
            stage: node.name.clone(),
            kind: node.stage.kind().to_owned(),
        });
    }
    let selected = selection(graph, std::slice::from_ref(&request.stage));
    let identities = identities(graph, &selected);
    let blocked = |reason: String| WorkerError::Blocked {
        stage: node.name.clone(),
        reason,
    };
    let fingerprint = match &identities[position] {
        Some(Ok(identity)) => {
            Fingerprint::parse(&identity.fingerprint).map_err(|e| blocked(e.to_string()))?
        }
        Some(Err(Blocked::Input(reason) | Blocked::External(reason))) => {
            return Err(blocked(reason.clone()));
        }
        None => return Err(blocked("not selected".to_owned())),
    };

    let lock = store.lock_shared_notify(request.lock_wait, &mut |m| eprintln!("{m}"))?;
    let mut inputs = Vec::with_capacity(node.inputs.len());
    let mut missing = Vec::new();
    for &i in &node.inputs {
        let name = &graph.nodes[i].name;
        let fp = match &identities[i] {
            Some(Ok(identity)) => Fingerprint::parse(&identity.fingerprint).ok(),
            _ => None,
        };
        let Some(fp) = fp else {
            missing.push(format!("`{name}` (its fingerprint cannot be computed)"));
            continue;
        };
        match store.lookup(&lock, &fp, Verify::Fast)? {
            Lookup::Hit(entry) => inputs.push(*entry),
            Lookup::Miss(_) => missing.push(format!("`{name}` (entry {})", fp.short())),
        }
    }
    if !missing.is_empty() {
        return Err(WorkerError::MissingInputs {
            stage: node.name.clone(),
            cache: store.root().to_path_buf(),
            missing,
        });
    }
    let progress = Progress::new(request.quiet);
    let cx = ShardContext {
        store,
        lock: &lock,
        name: &node.name,
        stage: node.stage.as_ref(),
        fingerprint: &fingerprint,
        inputs: &inputs,
        progress: &progress,
        lock_wait: request.lock_wait,
        // A worker never forces: the driver removed forced shards before sending them out.
        forced: false,
    };
    let (computed, what) = match request.shard {
        Some(shard) => (compute_shard(&cx, shard)?, format!("shard {shard}")),
        None => (compute_whole(&cx)?, "the computation".to_owned()),
    };
    computed.map_err(|error| WorkerError::Failed {
        stage: node.name.clone(),
        what,
        reason: error_chain(error.as_error()),
    })
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    #[error(
        "cannot read the probe file `{path}` on this machine ({source}); the cache must be on a \
         filesystem every worker sees (hint: put `--cache-dir` on the cluster's shared filesystem)"
    )]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot write `{path}` beside the probe ({source}); workers must be able to write the cache"
    )]
    Unwritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// This machine's host name (what a worker's log and probe answer name), or `unknown`.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Reads the probe file the driver wrote at `path` and writes `<path>.seen` beside it, holding
/// the probe's text, this machine's host name and this process's id (one line each), so the
/// driver knows a worker both read and wrote the cache's filesystem. Returns the host name.
pub(crate) fn probe(path: &Path) -> Result<String, ProbeError> {
    let text = std::fs::read_to_string(path).map_err(|source| ProbeError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let host = host_name();
    let mut seen = path.as_os_str().to_owned();
    seen.push(".seen");
    let seen = PathBuf::from(seen);
    std::fs::write(
        &seen,
        format!("{}\n{host}\n{}\n", text.trim(), std::process::id()),
    )
    .map_err(|source| ProbeError::Unwritable {
        path: seen.clone(),
        source,
    })?;
    Ok(host)
}
