//! Sharded stages: the seam through which the shards of a ready stage are computed
//! ([`ShardLauncher`]), the in-process launcher, and the computation of one shard (shared by the
//! executor and `vlmpipe worker`). The same seam sends a whole stage that loads a model (a
//! fine-tune, an unsharded eval) elsewhere as one job, when the launcher runs stages elsewhere.
//!
//! Each shard is its own cache entry, keyed by the stage's fingerprint and `index/count`
//! ([`shard_fingerprint`]), so a killed worker redoes only its shard. The merged entry keeps the
//! stage's own fingerprint: the shard count is an execution setting, and merging gives the output
//! of an unsharded run (see ARCHITECTURE.md, "Sharded stages").

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use super::stage::{ShardIndex, StageError, StageOutcome};
use super::{Progress, Stage, StageContext};
use crate::cache::{
    CacheEntry, CacheError, CacheLock, CacheStore, Fingerprint, Lookup, MissReason, Verify,
};

/// Bumped when what a shard entry holds changes for every kind (the kind's own `code_version`
/// is already in the stage fingerprint a shard's is derived from).
const SHARD_CODE_VERSION: u32 = 1;

/// The fingerprint of shard `shard` of the stage whose fingerprint is `stage`.
pub fn shard_fingerprint(stage: &Fingerprint, shard: ShardIndex) -> Fingerprint {
    crate::cache::fingerprint(
        "shard",
        &json!({ "index": shard.index, "count": shard.count }),
        std::slice::from_ref(stage),
        SHARD_CODE_VERSION,
    )
}

/// Where one shard stands, as a launcher reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ShardState {
    /// Not started (queued).
    Pending,
    /// Being computed.
    Running,
    /// Its entry is in the cache.
    Done,
    /// It failed, with the reason (the executor fails the stage with it).
    Failed(String),
}

/// The shards of one ready stage that have no entry yet, handed to a [`ShardLauncher`].
pub(crate) struct ShardJob<'a> {
    /// The stage's name in the pipeline (what `vlmpipe worker --stage` takes).
    pub stage: &'a str,
    /// The stage's kind (`eval`).
    pub kind: &'a str,
    /// The shard count (`--of`).
    pub count: usize,
    /// The shard indices to compute (`--shard`), ascending; the others are cached.
    pub pending: Vec<usize>,
    /// The cache the shards' entries must land in (`--cache-dir`).
    pub cache_root: &'a Path,
    local: &'a (dyn Fn(usize) -> Result<(), String> + Sync),
    done: &'a (dyn Fn(usize) -> bool + Sync),
}

impl ShardJob<'_> {
    /// Whether shard `index`'s entry is in the cache (a cheap look: a folder's existence; entries
    /// are renamed into place complete), so a launcher learns a shard is done from its work.
    pub(crate) fn is_done(&self, index: usize) -> bool {
        (self.done)(index)
    }

    /// Computes shard `index` in this process, into the cache (what [`LocalLauncher`] does).
    pub(crate) fn compute_here(&self, index: usize) -> Result<(), String> {
        (self.local)(index)
    }
}

/// A whole stage handed to a launcher that runs stages elsewhere: `vlmpipe worker FILE --stage S`
/// computes it into its entry (the fine-tune as one Slurm job with the GPUs asked for).
pub(crate) struct WholeJob<'a> {
    /// The stage's name in the pipeline.
    pub stage: &'a str,
    /// The stage's kind (`finetune`).
    pub kind: &'a str,
    /// The cache its entry must land in.
    pub cache_root: &'a Path,
    done: &'a (dyn Fn() -> bool + Sync),
}

impl WholeJob<'_> {
    /// Whether the stage's entry is in the cache (renamed into place complete).
    pub(crate) fn is_done(&self) -> bool {
        (self.done)()
    }
}

/// Runs the pending shards of a stage somewhere: in this process ([`LocalLauncher`]) or as
/// `vlmpipe worker FILE --stage S --shard K --of N` tasks of a cluster engine.
///
/// Contract: [`ShardLauncher::launch`] returns once every pending shard is done, failed, or not
/// started because `cancelled()` turned true; it tells `report` each shard's moves. The
/// executor does not take the launcher's word for success: it looks every shard up in the cache
/// afterwards, then merges them.
pub(crate) trait ShardLauncher: Send + Sync {
    /// A short name for messages (`local`, `slurm`).
    fn name(&self) -> &str;

    /// Computes `job.pending`. An `Err` is a failure of the launcher itself (nothing could be
    /// submitted); a failed shard is reported through `report` instead.
    fn launch(
        &self,
        job: &ShardJob<'_>,
        report: &mut dyn FnMut(usize, ShardState),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), String>;

    /// Whether stages that load a model and are not sharded also go elsewhere, one job each
    /// ([`ShardLauncher::launch_whole`]); `false` (the default) computes them in this process.
    fn runs_whole_stages(&self) -> bool {
        false
    }

    /// Computes `job`'s stage elsewhere and returns once it is done, failed (told to `report`) or
    /// cancelled, with the ids of the jobs it submitted. Called only when
    /// [`ShardLauncher::runs_whole_stages`]; the executor looks the entry up afterwards.
    fn launch_whole(
        &self,
        _job: &WholeJob<'_>,
        _report: &mut dyn FnMut(ShardState),
        _cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<String>, String> {
        Err(format!("the {} launcher runs no whole stage", self.name()))
    }
}

/// The in-process launcher: the shards one after the other in this process.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LocalLauncher;

impl ShardLauncher for LocalLauncher {
    fn name(&self) -> &str {
        "local"
    }

    fn launch(
        &self,
        job: &ShardJob<'_>,
        report: &mut dyn FnMut(usize, ShardState),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), String> {
        for &index in &job.pending {
            if cancelled() {
                break;
            }
            report(index, ShardState::Running);
            match job.compute_here(index) {
                Ok(()) => report(index, ShardState::Done),
                Err(reason) => report(index, ShardState::Failed(reason)),
            }
        }
        Ok(())
    }
}

/// What [`compute_shard`] found or did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ShardOutcome {
    /// The shard's entry was already in the cache (possibly written meanwhile by another run).
    Found,
    /// It was computed now.
    Computed,
}

/// Everything needed to compute the shards of one stage in this process.
pub(crate) struct ShardContext<'a> {
    pub store: &'a CacheStore,
    pub lock: &'a CacheLock,
    pub name: &'a str,
    pub stage: &'a dyn Stage,
    pub fingerprint: &'a Fingerprint,
    pub inputs: &'a [CacheEntry],
    pub progress: &'a Progress,
    pub lock_wait: Duration,
    /// `--force`: the shards are computed again too, not taken from the cache.
    pub forced: bool,
}

/// Computes one shard into the cache unless its entry is there. Holds the shard's entry lock while
/// computing, so two processes asked for the same shard compute it once. The outer error is a
/// cache failure; the inner one the stage's.
pub(crate) fn compute_shard(
    cx: &ShardContext<'_>,
    shard: ShardIndex,
) -> Result<Result<ShardOutcome, StageError>, CacheError> {
    let Some(sharded) = cx.stage.sharded() else {
        return Ok(Err(StageError::msg(format!(
            "`{}` ({}) cannot be sharded",
            cx.name,
            cx.stage.kind()
        ))));
    };
    let fp = shard_fingerprint(cx.fingerprint, shard);
    let label = format!("{} [shard {shard}]", cx.name);
    compute_entry(cx, &fp, &label, &|ctx| sharded.run_shard(ctx, shard))
}

/// Computes the whole stage of `cx` into its own entry unless it is there (what a worker asked
/// for a stage without `--shard` does), under the entry's lock like [`compute_shard`].
pub(crate) fn compute_whole(
    cx: &ShardContext<'_>,
) -> Result<Result<ShardOutcome, StageError>, CacheError> {
    compute_entry(cx, cx.fingerprint, cx.name, &|ctx| cx.stage.run(ctx))
}

/// The entry `fp` computed by `compute` unless it is there, holding its lock meanwhile.
fn compute_entry(
    cx: &ShardContext<'_>,
    fp: &Fingerprint,
    label: &str,
    compute: &dyn Fn(&mut StageContext<'_>) -> Result<StageOutcome, StageError>,
) -> Result<Result<ShardOutcome, StageError>, CacheError> {
    if let Lookup::Hit(_) = cx.store.lookup(cx.lock, fp, Verify::Fast)? {
        return Ok(Ok(ShardOutcome::Found));
    }
    let _held = cx
        .store
        .lock_entry(cx.lock, fp, label, cx.lock_wait, &mut |m| {
            cx.progress.println(m)
        })?;
    if let Lookup::Hit(_) = cx.store.lookup(cx.lock, fp, Verify::Fast)? {
        return Ok(Ok(ShardOutcome::Found));
    }
    let mut writer = cx.store.begin(cx.lock, fp, label, cx.stage.kind())?;
    writer.set_inputs(cx.inputs.iter().map(|e| e.fingerprint().clone()).collect());
    let out_dir = writer.dir().to_path_buf();
    let work_dir = cx.store.root().join("work").join(fp.as_str());
    let mut ctx = StageContext {
        name: cx.name,
        inputs: cx.inputs,
        out_dir: &out_dir,
        progress: cx.progress,
        work_dir: &work_dir,
    };
    let outcome = match compute(&mut ctx) {
        Ok(outcome) => outcome,
        Err(error) => return Ok(Err(error)),
    };
    writer.commit(entry_metadata(&outcome))?;
    if work_dir.exists() {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    Ok(Ok(ShardOutcome::Computed))
}

/// Computes a whole stage with `launcher` (one job elsewhere, [`ShardLauncher::launch_whole`])
/// and returns its entry, or why it failed. The ids of the jobs submitted go to `jobs`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_whole_elsewhere(
    store: &CacheStore,
    lock: &CacheLock,
    name: &str,
    kind: &str,
    fp: &Fingerprint,
    progress: &Progress,
    launcher: &dyn ShardLauncher,
    cancelled: &dyn Fn() -> bool,
    jobs: &mut Vec<String>,
) -> Result<Result<CacheEntry, StageError>, CacheError> {
    let done = || store.has_entry(fp);
    let job = WholeJob {
        stage: name,
        kind,
        cache_root: store.root(),
        done: &done,
    };
    let mut failed = None;
    let mut report = |state: ShardState| {
        let said = match &state {
            ShardState::Pending => "pending".to_owned(),
            ShardState::Running => "running".to_owned(),
            ShardState::Done => "done".to_owned(),
            ShardState::Failed(reason) => {
                failed = Some(reason.clone());
                format!("failed: {reason}")
            }
        };
        progress.println(&format!("`{name}` ({} job): {said}", launcher.name()));
    };
    progress.println(&format!("`{name}`: sent to {} as one job", launcher.name()));
    match launcher.launch_whole(&job, &mut report, cancelled) {
        Ok(ids) => *jobs = ids,
        Err(reason) => {
            return Ok(Err(StageError::msg(format!(
                "the {} launcher failed: {reason}",
                launcher.name()
            ))));
        }
    }
    match store.lookup(lock, fp, Verify::Fast)? {
        Lookup::Hit(entry) => Ok(Ok(*entry)),
        Lookup::Miss(_) => {
            let why = failed.unwrap_or_else(|| {
                if cancelled() {
                    "cancelled".to_owned()
                } else {
                    format!(
                        "its {} job ended without the stage's entry in the cache",
                        launcher.name()
                    )
                }
            });
            Ok(Err(StageError::msg(why)))
        }
    }
}

/// The manifest metadata of an entry a stage (or one of its shards) wrote.
pub(crate) fn entry_metadata(outcome: &StageOutcome) -> serde_json::Value {
    json!({
        "stage": outcome.metadata,
        "warnings": outcome.warnings,
    })
}

/// How the shards of a stage went in one run (the summary's `shards`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShardCounts {
    /// The shard count.
    pub count: usize,
    /// Shard indices computed in this run.
    pub computed: Vec<usize>,
    /// Shard indices found in the cache.
    pub cached: Vec<usize>,
    /// Which launcher computed them.
    pub launcher: String,
}

/// Computes the missing shards of a stage with `launcher` and returns every shard's entry, in
/// order, or why the stage failed.
pub(crate) fn run_shards(
    cx: &ShardContext<'_>,
    count: usize,
    launcher: &dyn ShardLauncher,
    cancelled: &dyn Fn() -> bool,
    counts: &mut ShardCounts,
) -> Result<Result<Vec<CacheEntry>, StageError>, CacheError> {
    counts.count = count;
    counts.launcher = launcher.name().to_owned();
    let shard = |index| ShardIndex { index, count };
    let mut pending = Vec::new();
    for index in 0..count {
        let fp = shard_fingerprint(cx.fingerprint, shard(index));
        if cx.forced {
            // Removed, not only skipped: a worker elsewhere finds an existing entry and stops.
            cx.store.remove(cx.lock, &fp)?;
        }
        match cx.store.lookup(cx.lock, &fp, Verify::Fast)? {
            Lookup::Hit(_) => counts.cached.push(index),
            Lookup::Miss(MissReason::Absent | MissReason::Corrupt(_)) => pending.push(index),
        }
    }
    if !pending.is_empty() {
        cx.progress.println(&format!(
            "`{}`: {} of {count} shards to compute ({}), {} cached",
            cx.name,
            pending.len(),
            launcher.name(),
            counts.cached.len()
        ));
    }
    // A cache failure inside a shard stops the run like any other; kept aside here because the
    // launcher's closure can only return a message.
    let cache_failure: std::sync::Mutex<Option<CacheError>> = std::sync::Mutex::new(None);
    let local = |index: usize| -> Result<(), String> {
        match compute_shard(cx, shard(index)) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(super::executor::error_chain(error.as_error())),
            Err(error) => {
                let message = error.to_string();
                if let Ok(mut slot) = cache_failure.lock() {
                    slot.get_or_insert(error);
                }
                Err(message)
            }
        }
    };
    let done = |index: usize| {
        cx.store
            .has_entry(&shard_fingerprint(cx.fingerprint, shard(index)))
    };
    let job = ShardJob {
        stage: cx.name,
        kind: cx.stage.kind(),
        count,
        pending: pending.clone(),
        cache_root: cx.store.root(),
        local: &local,
        done: &done,
    };
    let mut states: Vec<ShardState> = vec![ShardState::Pending; count];
    for &index in &counts.cached {
        states[index] = ShardState::Done;
    }
    let mut report = |index: usize, state: ShardState| {
        if index >= count {
            return;
        }
        states[index] = state;
        let done = states.iter().filter(|s| **s == ShardState::Done).count();
        let running = states.iter().filter(|s| **s == ShardState::Running).count();
        let waiting = states.iter().filter(|s| **s == ShardState::Pending).count();
        cx.progress.println(&format!(
            "`{}` shards: {done} done, {running} running, {waiting} pending",
            cx.name
        ));
    };
    let launched = launcher.launch(&job, &mut report, cancelled);
    if let Some(error) = cache_failure.lock().ok().and_then(|mut slot| slot.take()) {
        return Err(error);
    }
    if let Err(reason) = launched {
        return Ok(Err(StageError::msg(format!(
            "the {} launcher failed: {reason}",
            launcher.name()
        ))));
    }
    let mut entries = Vec::with_capacity(count);
    let mut failures = Vec::new();
    for (index, state) in states.iter().enumerate().take(count) {
        let fp = shard_fingerprint(cx.fingerprint, shard(index));
        match cx.store.lookup(cx.lock, &fp, Verify::Fast)? {
            Lookup::Hit(entry) => {
                if pending.contains(&index) {
                    counts.computed.push(index);
                }
                entries.push(*entry);
            }
            Lookup::Miss(_) => {
                let why = match state {
                    ShardState::Failed(reason) => reason.clone(),
                    _ if cancelled() => "cancelled".to_owned(),
                    _ => "its entry is not in the cache".to_owned(),
                };
                failures.push(format!("shard {}: {why}", shard(index)));
            }
        }
    }
    if failures.is_empty() {
        Ok(Ok(entries))
    } else {
        Ok(Err(StageError::msg(failures.join("; "))))
    }
}
