//! `--jobs` (independent stages at once, summary in graph order) and sharded stages (each shard
//! its own entry, merged like an unsharded run, only missing shards recomputed), with small
//! in-memory stages.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::cache::{CacheEntry, CacheStore};

/// A stage that records how many stages of its group run at once while it sleeps.
struct Overlap {
    name: String,
    device: bool,
    sleep: Duration,
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl Stage for Overlap {
    fn kind(&self) -> &'static str {
        "overlap"
    }
    fn code_version(&self) -> u32 {
        1
    }
    fn params(&self) -> Value {
        json!({ "name": self.name })
    }
    fn uses_device(&self) -> bool {
        self.device
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(self.sleep);
        self.running.fetch_sub(1, Ordering::SeqCst);
        std::fs::write(ctx.out_path("out.txt"), &self.name)?;
        Ok(StageOutcome::default())
    }
}

/// Three independent stages sleeping `sleeps` ms each; returns (summary, most at once, seconds).
fn overlap_run(jobs: Option<usize>, device: bool, sleeps: [u64; 3]) -> (RunSummary, usize, f64) {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let nodes = ["a", "b", "c"]
        .iter()
        .zip(sleeps)
        .map(|(name, ms)| ExecNode {
            name: (*name).to_owned(),
            inputs: vec![],
            stage: Box::new(Overlap {
                name: (*name).to_owned(),
                device,
                sleep: Duration::from_millis(ms),
                running: running.clone(),
                most: most.clone(),
            }),
        })
        .collect();
    let graph = ExecGraph {
        pipeline: "overlap".to_owned(),
        nodes,
    };
    let options = RunOptions {
        quiet: true,
        jobs,
        ..RunOptions::default()
    };
    let started = Instant::now();
    let summary = run(&graph, &store, &options).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    (summary, most.load(Ordering::SeqCst), seconds)
}

#[test]
fn jobs_bounds_how_many_independent_stages_run_at_once() {
    let (_, most, _) = overlap_run(Some(1), false, [200, 200, 200]);
    assert_eq!(most, 1);
    let (_, most, _) = overlap_run(Some(2), false, [400, 400, 400]);
    assert_eq!(most, 2);
    let (_, most, seconds) = overlap_run(Some(3), false, [400, 400, 400]);
    assert_eq!(most, 3);
    assert!(
        seconds < 1.1,
        "three 0.4 s stages at once took {seconds:.2} s"
    );
}

#[test]
fn by_default_model_stages_run_one_at_a_time_and_others_together() {
    let (_, most, _) = overlap_run(None, true, [200, 200, 200]);
    assert_eq!(most, 1);
    if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        let (_, most, _) = overlap_run(None, false, [400, 400, 400]);
        assert!(most >= 2, "{most}");
    }
}

/// A launcher that sends whole stages elsewhere and only records how many it holds at once
/// (its jobs end without an entry).
#[derive(Default)]
struct Away {
    running: AtomicUsize,
    most: AtomicUsize,
}

impl ShardLauncher for Away {
    fn name(&self) -> &str {
        "away"
    }
    fn launch(
        &self,
        _job: &ShardJob<'_>,
        _report: &mut dyn FnMut(usize, ShardState),
        _cancelled: &dyn Fn() -> bool,
    ) -> Result<(), String> {
        Err("no shards here".to_owned())
    }
    fn runs_whole_stages(&self) -> bool {
        true
    }
    fn launch_whole(
        &self,
        job: &WholeJob<'_>,
        report: &mut dyn FnMut(ShardState),
        _cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<String>, String> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        self.running.fetch_sub(1, Ordering::SeqCst);
        report(ShardState::Failed(format!("`{}` went nowhere", job.stage)));
        Ok(vec![format!("job-{}", job.stage)])
    }
}

#[test]
fn model_stages_sent_elsewhere_go_together_and_name_their_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let nodes = ["a", "b", "c"]
        .iter()
        .map(|name| ExecNode {
            name: (*name).to_owned(),
            inputs: vec![],
            stage: Box::new(Overlap {
                name: (*name).to_owned(),
                device: true,
                sleep: Duration::ZERO,
                running: running.clone(),
                most: most.clone(),
            }),
        })
        .collect();
    let graph = ExecGraph {
        pipeline: "away".to_owned(),
        nodes,
    };
    let away = Arc::new(Away::default());
    let options = RunOptions {
        quiet: true,
        launcher: Some(away.clone()),
        ..RunOptions::default()
    };
    let summary = run(&graph, &store, &options).unwrap();
    // None ran here; each went out as one job and failed with the launcher's reason.
    assert_eq!(most.load(Ordering::SeqCst), 0);
    for stage in &summary.stages {
        assert_eq!(stage.status, StageStatus::Failed);
        let elsewhere = stage.elsewhere.as_ref().expect("sent elsewhere");
        assert_eq!(elsewhere.launcher, "away");
        assert_eq!(elsewhere.jobs, [format!("job-{}", stage.name)]);
        let reason = stage.reason.as_deref().unwrap_or_default();
        assert!(reason.contains("went nowhere"), "{reason}");
    }
    // Not held to one model stage at a time: this machine's device is not what they use.
    if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
        assert!(away.most.load(Ordering::SeqCst) >= 2);
    }
}

#[test]
fn the_summary_is_in_graph_order_whatever_finishes_first() {
    // `a` finishes last, `c` first.
    let (summary, _, _) = overlap_run(Some(3), false, [600, 300, 0]);
    let names: Vec<&str> = summary.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert!(summary.stages.iter().all(|s| s.status == StageStatus::Ran));
}

/// A stage over the rows `0..rows`: writes `i*i` for each row, one per line; shards write their
/// rows, the merge concatenates them. Counts what it computes.
struct Squares {
    rows: usize,
    unit: usize,
    shards: Option<usize>,
    whole_runs: Arc<AtomicUsize>,
    shard_runs: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl Squares {
    fn lines(range: std::ops::Range<usize>) -> String {
        range.map(|i| format!("{}\n", i * i)).collect()
    }
}

impl Stage for Squares {
    fn kind(&self) -> &'static str {
        "squares"
    }
    fn code_version(&self) -> u32 {
        1
    }
    fn params(&self) -> Value {
        json!({ "rows": self.rows, "unit": self.unit })
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        self.whole_runs.fetch_add(1, Ordering::SeqCst);
        std::fs::write(ctx.out_path("out.txt"), Self::lines(0..self.rows))?;
        Ok(StageOutcome::default())
    }
    fn sharded(&self) -> Option<&dyn Sharded> {
        Some(self)
    }
    fn shards(&self) -> Option<usize> {
        self.shards
    }
}

impl Sharded for Squares {
    fn run_shard(
        &self,
        ctx: &mut StageContext<'_>,
        shard: ShardIndex,
    ) -> Result<StageOutcome, StageError> {
        self.shard_runs.lock().unwrap().push(shard.index);
        let range = shard.range(self.rows, self.unit);
        std::fs::write(ctx.out_path("part.txt"), Self::lines(range))?;
        Ok(StageOutcome::default())
    }
    fn merge(
        &self,
        ctx: &mut StageContext<'_>,
        shards: &[CacheEntry],
    ) -> Result<StageOutcome, StageError> {
        let mut text = String::new();
        for shard in shards {
            text.push_str(&std::fs::read_to_string(shard.path("part.txt"))?);
        }
        std::fs::write(ctx.out_path("out.txt"), text)?;
        Ok(StageOutcome::default())
    }
}

struct ShardFixture {
    dir: tempfile::TempDir,
    whole_runs: Arc<AtomicUsize>,
    shard_runs: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl ShardFixture {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            whole_runs: Arc::new(AtomicUsize::new(0)),
            shard_runs: Arc::new(std::sync::Mutex::new(Vec::new())),
        }
    }

    fn run(&self, on_stage: Option<usize>, flag: Option<usize>) -> RunSummary {
        let store = CacheStore::open(self.dir.path()).unwrap();
        let graph = ExecGraph {
            pipeline: "squares".to_owned(),
            nodes: vec![ExecNode {
                name: "sq".to_owned(),
                inputs: vec![],
                stage: Box::new(Squares {
                    rows: 10,
                    unit: 3,
                    shards: on_stage,
                    whole_runs: self.whole_runs.clone(),
                    shard_runs: self.shard_runs.clone(),
                }),
            }],
        };
        let options = RunOptions {
            quiet: true,
            shards: flag,
            ..RunOptions::default()
        };
        run(&graph, &store, &options).unwrap()
    }

    fn shard_runs(&self) -> Vec<usize> {
        std::mem::take(&mut *self.shard_runs.lock().unwrap())
    }
}

fn output(summary: &RunSummary) -> String {
    let stage = &summary.stages[0];
    let path = stage
        .outputs
        .iter()
        .find(|p| p.ends_with("out.txt"))
        .unwrap();
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn shard_ranges_are_whole_units_in_order_and_cover_every_item() {
    for (len, unit, count) in [(10, 3, 3), (10, 3, 8), (0, 2, 4), (7, 1, 7), (100, 8, 6)] {
        let mut next = 0;
        for index in 0..count {
            let range = ShardIndex { index, count }.range(len, unit);
            assert_eq!(range.start, next, "{len} {unit} {count}");
            assert!(range.start == len || range.start.is_multiple_of(unit));
            next = range.end;
        }
        assert_eq!(next, len, "{len} {unit} {count}");
    }
}

#[test]
fn a_sharded_stage_merges_to_the_unsharded_output_under_the_same_fingerprint() {
    let whole = ShardFixture::new();
    let unsharded = whole.run(None, None);
    assert_eq!(whole.whole_runs.load(Ordering::SeqCst), 1);

    let parts = ShardFixture::new();
    let sharded = parts.run(None, Some(3));
    assert_eq!(parts.whole_runs.load(Ordering::SeqCst), 0);
    assert_eq!(parts.shard_runs(), [0, 1, 2]);
    assert_eq!(output(&sharded), output(&unsharded));
    assert_eq!(
        sharded.stages[0].fingerprint,
        unsharded.stages[0].fingerprint
    );
    let counts = sharded.stages[0].shards.as_ref().unwrap();
    assert_eq!(
        (counts.count, &counts.computed, &counts.cached),
        (3, &vec![0, 1, 2], &vec![])
    );

    // The shard count is an execution setting: an unsharded entry serves a sharded rerun and
    // the other way round.
    let again = whole.run(Some(4), None);
    assert_eq!(again.stages[0].status, StageStatus::Cached);
    let again = parts.run(None, None);
    assert_eq!(again.stages[0].status, StageStatus::Cached);
    assert!(whole.shard_runs().is_empty() && parts.shard_runs().is_empty());
}

#[test]
fn a_lost_shard_alone_is_recomputed() {
    let fixture = ShardFixture::new();
    // `shards = 3` on the stage; `--shards` overrides it.
    let first = fixture.run(Some(3), None);
    assert_eq!(fixture.shard_runs(), [0, 1, 2]);
    let store = CacheStore::open(fixture.dir.path()).unwrap();
    let lock = store.lock(Duration::ZERO).unwrap();
    let merged = crate::cache::Fingerprint::parse(&first.stages[0].fingerprint).unwrap();
    let lost = shard_fingerprint(&merged, ShardIndex { index: 1, count: 3 });
    assert!(store.remove(&lock, &lost).unwrap());
    assert!(store.remove(&lock, &merged).unwrap());
    drop(lock);

    let second = fixture.run(Some(3), None);
    assert_eq!(fixture.shard_runs(), [1]);
    let counts = second.stages[0].shards.as_ref().unwrap();
    assert_eq!((&counts.computed, &counts.cached), (&vec![1], &vec![0, 2]));
    assert_eq!(output(&second), output(&first));

    // A different count is a different set of shards.
    store
        .remove(&store.lock(Duration::ZERO).unwrap(), &merged)
        .unwrap();
    fixture.run(Some(3), Some(2));
    assert_eq!(fixture.shard_runs(), [0, 1]);
}
