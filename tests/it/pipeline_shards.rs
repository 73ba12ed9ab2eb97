//! Issue 16 items 1-2 with the real binary on a small offline pipeline: sharded evals (`--shards
//! N`, `shards = N`) merge to an unsharded run's records, metrics and CSV under the same
//! fingerprint; a lost shard alone is recomputed; `vlmpipe worker` computes exactly one shard
//! (and refuses without its inputs) and answers a probe; two runs on one cache share it (runs of
//! different pipelines both progress, two runs needing one stage compute it once); `--jobs`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vlmpipe");

/// A generated dataset, a random tiny model, a generating eval held to a grammar (batches of 2)
/// and a label-scoring eval, both over the same eight held-out rows.
pub(crate) const PIPELINE: &str = r#"
pipeline sharding { seed = 23 }
labels shapes = ["red circle", "blue circle"]
dataset pictures {
  source = synthetic(kind: "shapes", n: 16, seed: 1, size: 32, colors: "red,blue", shapes: "circle")
  label  = "class"
  labels = shapes
}
split parts = stratified(pictures, train: 0.5, test: 0.5, seed: 42)
prompt ask { user = "Which colour is the circle? {% for l in labels %}{{ l }}; {% endfor %}" }
model small = init(preset: "tiny", seed: 1)
grammar one = one_of(shapes)
eval guessed { model = small  data = parts.test  prompt = ask  labels = shapes  output = one  batch_size = 2 }
eval scored { model = small  data = parts.test  prompt = ask  labels = shapes  scoring = labels }
"#;

/// Another pipeline (another dataset seed): its stages share nothing with [`PIPELINE`]'s.
pub(crate) const OTHER: &str = r#"
pipeline other { seed = 5 }
labels shapes = ["red circle", "blue circle"]
dataset pictures {
  source = synthetic(kind: "shapes", n: 8, seed: 9, size: 32, colors: "red,blue", shapes: "circle")
  label  = "class"
  labels = shapes
}
prompt ask { user = "Which colour is the circle? {% for l in labels %}{{ l }}; {% endfor %}" }
model small = init(preset: "tiny", seed: 2)
grammar one = one_of(shapes)
eval quick { model = small  data = pictures  prompt = ask  labels = shapes  output = one }
"#;

/// Pipelines in `proj/` inside a temp folder, with their own Hub cache, offline.
pub(crate) struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp folder");
        std::fs::create_dir_all(dir.path().join("proj")).expect("proj");
        std::fs::write(dir.path().join("proj/shards.vp"), PIPELINE).expect("pipeline");
        std::fs::write(dir.path().join("proj/other.vp"), OTHER).expect("pipeline");
        Self { dir }
    }

    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("VLMPIPE_CACHE")
            .env("HF_HOME", self.path("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .env("NO_COLOR", "1");
        cmd
    }

    pub(crate) fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("spawn vlmpipe")
    }

    /// `vlmpipe run FILE --cache-dir CACHE --summary-json … EXTRA`: (output, summary).
    pub(crate) fn run(&self, file: &str, cache: &str, extra: &[&str]) -> (Output, Value) {
        let summary = self.path(&format!("{cache}.summary.json"));
        let _ = std::fs::remove_file(&summary);
        let summary_arg = summary.to_string_lossy().into_owned();
        let mut args = vec![
            "run",
            file,
            "--cache-dir",
            cache,
            "--quiet",
            "--summary-json",
            &summary_arg,
        ];
        args.extend(extra);
        let output = self.cli(&args);
        (output.clone(), read_summary(&summary, &output))
    }
}

pub(crate) fn read_summary(path: &Path, output: &Output) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|_| {
        panic!(
            "no summary; stdout:\n{}\nstderr:\n{}",
            text(&output.stdout),
            text(&output.stderr)
        )
    });
    serde_json::from_str(&text).expect("summary JSON")
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub(crate) fn stage<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no stage `{name}` in {summary}"))
}

/// The entry file `name` of a stage (its first output of that name).
fn entry_file(stage: &Value, name: &str) -> PathBuf {
    stage["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .filter_map(Value::as_str)
        .map(PathBuf::from)
        .find(|p| p.ends_with(name))
        .unwrap_or_else(|| panic!("no `{name}` in {stage}"))
}

/// Records as JSON, without the per-sample latency (what sharding may change).
pub(crate) fn records(stage: &Value) -> Vec<Value> {
    let table = vlmpipe::stages::eval::read_records_parquet(&entry_file(stage, "records.parquet"))
        .expect("records");
    table
        .records
        .iter()
        .map(|r| {
            let mut value = serde_json::to_value(r).expect("record");
            value["latency_ms"] = Value::Null;
            value
        })
        .collect()
}

/// Metrics as JSON, without the timings.
pub(crate) fn metrics(stage: &Value) -> Value {
    let text = std::fs::read_to_string(entry_file(stage, "metrics.json")).expect("metrics");
    let mut value: Value = serde_json::from_str(&text).expect("metrics JSON");
    for timing in ["latency_ms_p50", "latency_ms_p95", "samples_per_s"] {
        value[timing] = Value::Null;
    }
    value
}

pub(crate) fn csv(stage: &Value) -> Vec<u8> {
    std::fs::read(entry_file(stage, "predictions.csv")).expect("csv")
}

pub(crate) fn shard_list(stage: &Value, key: &str) -> Vec<u64> {
    stage["shards"][key]
        .as_array()
        .unwrap_or_else(|| panic!("no `shards.{key}` in {stage}"))
        .iter()
        .filter_map(Value::as_u64)
        .collect()
}

#[test]
fn a_sharded_eval_equals_the_unsharded_one() {
    let project = Project::new();
    let (output, whole) = project.run("proj/shards.vp", "whole", &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let (output, parts) = project.run("proj/shards.vp", "parts", &["--shards", "3"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    for name in ["guessed", "scored"] {
        let (a, b) = (stage(&whole, name), stage(&parts, name));
        assert_eq!(b["status"], "ran", "{b}");
        assert_eq!(b["shards"]["count"], 3, "{b}");
        assert_eq!(shard_list(b, "computed"), [0, 1, 2]);
        assert!(a.get("shards").is_none(), "{a}");
        // The shard count is not part of what the eval computes.
        assert_eq!(a["fingerprint"], b["fingerprint"]);
        let rows = records(a);
        assert_eq!(rows.len(), 8);
        assert_eq!(records(b), rows, "{name}: records differ");
        assert_eq!(metrics(b), metrics(a), "{name}: metrics differ");
        assert_eq!(csv(b), csv(a), "{name}: CSV differs");
    }
    // One cache serves the other setting: sharded entries satisfy an unsharded rerun.
    let (_, again) = project.run("proj/shards.vp", "parts", &[]);
    assert_eq!(stage(&again, "guessed")["status"], "cached");
}

#[test]
fn a_lost_shard_alone_is_recomputed() {
    let project = Project::new();
    let (output, first) = project.run("proj/shards.vp", "cache", &["--shards", "4"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let eval = stage(&first, "guessed");
    let before = records(eval);

    // Lose shard 2 (as a worker killed before it committed) and the merged entry.
    lose_shard(&project, eval, 2, 4);

    let (output, second) = project.run("proj/shards.vp", "cache", &["--shards", "4"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let eval = stage(&second, "guessed");
    assert_eq!(eval["status"], "ran");
    assert_eq!(shard_list(eval, "computed"), [2]);
    assert_eq!(shard_list(eval, "cached"), [0, 1, 3]);
    assert_eq!(records(eval), before);
    // Everything else came from the cache.
    assert_eq!(stage(&second, "scored")["status"], "cached");
    assert_eq!(stage(&second, "pictures")["status"], "cached");
}

#[test]
fn force_recomputes_the_shards_too() {
    let project = Project::new();
    let (output, _) = project.run("proj/shards.vp", "cache", &["--shards", "4"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let (output, forced) = project.run(
        "proj/shards.vp",
        "cache",
        &["--shards", "4", "--force", "guessed"],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let eval = stage(&forced, "guessed");
    assert_eq!(eval["status"], "ran", "{eval}");
    assert_eq!(shard_list(eval, "computed"), [0, 1, 2, 3], "{eval}");
    assert!(shard_list(eval, "cached").is_empty(), "{eval}");
}

#[test]
fn shards_on_the_stage_are_checked_and_used() {
    let project = Project::new();
    let staged = PIPELINE.replace("batch_size = 2 }", "batch_size = 2  shards = 2 }");
    std::fs::write(project.path("proj/staged.vp"), &staged).unwrap();
    let (output, summary) = project.run("proj/staged.vp", "cache", &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(stage(&summary, "guessed")["shards"]["count"], 2);
    assert!(stage(&summary, "scored").get("shards").is_none());
    // `--shards 1` runs it whole (and finds it cached: same fingerprint).
    let (_, again) = project.run("proj/staged.vp", "cache", &["--shards", "1"]);
    assert_eq!(stage(&again, "guessed")["status"], "cached");

    let bad = PIPELINE.replace("batch_size = 2 }", "batch_size = 2  shards = 0 }");
    std::fs::write(project.path("proj/bad.vp"), &bad).unwrap();
    let output = project.cli(&["check", "proj/bad.vp"]);
    assert!(!output.status.success());
    let said = text(&output.stdout) + &text(&output.stderr);
    let line = bad.lines().position(|l| l.contains("shards = 0")).unwrap() + 1;
    let column = bad.lines().nth(line - 1).unwrap().find("0 }").unwrap() + 1;
    assert!(
        said.contains(&format!("bad.vp:{line}:{column}")) && said.contains("shards"),
        "{said}"
    );
}

#[test]
fn a_worker_computes_exactly_its_shard_once_its_inputs_are_cached() {
    let project = Project::new();
    let worker = |shard: &str| {
        project.cli(&[
            "worker",
            "proj/shards.vp",
            "--cache-dir",
            "cache",
            "--stage",
            "guessed",
            "--shard",
            shard,
            "--of",
            "3",
        ])
    };
    // Nothing cached: it names the inputs it lacks and computes nothing.
    let output = worker("1");
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let said = text(&output.stderr);
    assert!(
        said.contains("inputs of `guessed` are not in the cache") && said.contains("`small`"),
        "{said}"
    );
    assert!(!project.path("cache/entries").exists() || count_entries(&project) == 0);

    // The driver computes the inputs (everything but the evals) ...
    let (output, _) = project.run(
        "proj/shards.vp",
        "cache",
        &[
            "--only", "small", "--only", "parts", "--only", "ask", "--only", "one",
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let before = count_entries(&project);
    // ... then a worker computes its shard: one new entry.
    let output = worker("1");
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("shard 1/3: computed"));
    assert_eq!(count_entries(&project), before + 1);
    // Idempotent.
    let output = worker("1");
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("shard 1/3: found in the cache"));
    assert_eq!(count_entries(&project), before + 1);
    // The driver then computes only the other shards.
    let (output, summary) = project.run("proj/shards.vp", "cache", &["--shards", "3"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let eval = stage(&summary, "guessed");
    assert_eq!(shard_list(eval, "computed"), [0, 2]);
    assert_eq!(shard_list(eval, "cached"), [1]);

    // Bad requests are refused with the reason.
    let output = worker("3");
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("shard 3 of 3 does not exist"));
    let output = project.cli(&[
        "worker",
        "proj/shards.vp",
        "--cache-dir",
        "cache",
        "--stage",
        "gessed",
        "--shard",
        "0",
        "--of",
        "2",
    ]);
    assert!(
        text(&output.stderr).contains("did you mean `guessed`"),
        "{}",
        text(&output.stderr)
    );
    let output = project.cli(&[
        "worker",
        "proj/shards.vp",
        "--cache-dir",
        "cache",
        "--stage",
        "parts",
        "--shard",
        "0",
        "--of",
        "2",
    ]);
    assert!(
        text(&output.stderr).contains("cannot be sharded"),
        "{}",
        text(&output.stderr)
    );
}

fn count_entries(project: &Project) -> usize {
    std::fs::read_dir(project.path("cache/entries"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_worker_answers_a_probe_and_names_the_fix_when_it_cannot_see_it() {
    let project = Project::new();
    let probe = project.path("probe-1234");
    std::fs::write(&probe, "token-1234\n").unwrap();
    let output = project.cli(&["worker", "--probe", probe.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let seen = std::fs::read_to_string(project.path("probe-1234.seen")).expect("seen");
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[0], "token-1234");
    assert!(!lines[1].is_empty());
    assert!(lines[2].parse::<u32>().is_ok(), "{seen}");

    let output = project.cli(&["worker", "--probe", "/nonexistent/vlmpipe-probe"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("filesystem every worker sees"),
        "{}",
        text(&output.stderr)
    );
}

/// Lines of a child's stderr, as they come.
fn stderr_lines(child: &mut Child) -> Receiver<String> {
    let err = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Waits for a line containing `needle` (returns it), failing after 60 s.
fn wait_for_line(rx: &Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(_) => panic!("no line containing `{needle}`"),
        }
    }
}

/// The fingerprint a dry run gives `name`.
fn dry_fingerprint(project: &Project, file: &str, name: &str) -> String {
    let (_, summary) = project.run(file, "cache", &["--dry-run"]);
    stage(&summary, name)["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_owned()
}

#[test]
fn runs_of_different_pipelines_on_one_cache_both_progress() {
    let project = Project::new();
    // Hold the entry of `guessed` as a run computing it would: the first run waits there, still
    // holding the cache, while the other pipeline runs to the end.
    let fp = dry_fingerprint(&project, "proj/shards.vp", "guessed");
    let root = project.path("cache");
    let held = vlmpipe::cache::EntryLock::acquire_notify(
        &root,
        &fp,
        "guessed",
        Duration::ZERO,
        &mut |_| {},
    )
    .expect("entry lock");
    let summary = project.path("first.json");
    let mut first = project
        .command(&[
            "run",
            "proj/shards.vp",
            "--cache-dir",
            "cache",
            "--summary-json",
            summary.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let lines = stderr_lines(&mut first);
    let waiting = wait_for_line(&lines, "waiting for `guessed`");
    assert!(
        waiting.contains("another run is computing it")
            && waiting.contains(&format!("pid {} (`", std::process::id())),
        "{waiting}"
    );
    // The other pipeline runs to the end on the same cache meanwhile.
    let (output, other) = project.run("proj/other.vp", "cache", &["--lock-wait", "5"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(stage(&other, "quick")["status"], "ran");
    assert!(
        first.try_wait().expect("poll").is_none(),
        "the first run did not wait"
    );
    drop(held);
    let status = first.wait().expect("wait");
    assert!(status.success());
    let first = read_summary(
        &summary,
        &Output {
            status,
            stdout: Vec::new(),
            stderr: Vec::new(),
        },
    );
    assert_eq!(stage(&first, "guessed")["status"], "ran");
}

#[test]
fn two_runs_needing_the_same_stage_compute_it_once() {
    let project = Project::new();
    let fp = dry_fingerprint(&project, "proj/shards.vp", "scored");
    let root = project.path("cache");
    // Both runs reach `scored` while it is held, so they overlap there whatever the timing.
    let held = vlmpipe::cache::EntryLock::acquire_notify(
        &root,
        &fp,
        "scored",
        Duration::ZERO,
        &mut |_| {},
    )
    .expect("entry lock");
    let spawn = |name: &str| {
        let summary = project.path(name);
        let mut child = project
            .command(&[
                "run",
                "proj/shards.vp",
                "--cache-dir",
                "cache",
                "--only",
                "scored",
                "--summary-json",
                summary.to_str().unwrap(),
            ])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn");
        let lines = stderr_lines(&mut child);
        (child, lines, summary)
    };
    let (mut a, a_lines, a_summary) = spawn("a.json");
    let (mut b, b_lines, b_summary) = spawn("b.json");
    wait_for_line(&a_lines, "waiting for `scored`");
    wait_for_line(&b_lines, "waiting for `scored`");
    drop(held);
    let (a_status, b_status) = (a.wait().expect("a"), b.wait().expect("b"));
    let empty = |status| Output {
        status,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    let a = read_summary(&a_summary, &empty(a_status));
    let b = read_summary(&b_summary, &empty(b_status));
    let statuses = [
        stage(&a, "scored")["status"].clone(),
        stage(&b, "scored")["status"].clone(),
    ];
    let ran = statuses.iter().filter(|s| **s == "ran").count();
    assert_eq!(ran, 1, "{statuses:?}");
    let reused = if stage(&a, "scored")["status"] == "cached" {
        stage(&a, "scored")
    } else {
        stage(&b, "scored")
    };
    assert_eq!(reused["reason"], "computed meanwhile by another run");
    assert_eq!(records(stage(&a, "scored")), records(stage(&b, "scored")));
    // The stages before it were computed once too.
    for name in ["pictures", "small"] {
        let ran = [&a, &b]
            .iter()
            .filter(|s| stage(s, name)["status"] == "ran")
            .count();
        assert_eq!(ran, 1, "{name}");
    }
}

#[test]
fn jobs_give_the_same_results_and_summary_order() {
    let project = Project::new();
    let (output, one) = project.run("proj/shards.vp", "one", &["--jobs", "1"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let (output, two) = project.run("proj/shards.vp", "two", &["--jobs", "2"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let names = |s: &Value| -> Vec<String> {
        s["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&one), names(&two));
    for name in ["guessed", "scored"] {
        assert_eq!(records(stage(&one, name)), records(stage(&two, name)));
        assert_eq!(
            stage(&one, name)["fingerprint"],
            stage(&two, name)["fingerprint"]
        );
    }
    let output = project.cli(&["run", "proj/shards.vp", "--jobs", "0"]);
    assert_eq!(output.status.code(), Some(2));
}

/// A folder dataset over [`make_photos`]: error rows (corrupt files, one of them the only file of
/// its class), a duplicate image, filtered rows, a dropped row and an unknown drop id, and a
/// skipped non-image, in more rows than one read chunk (256), so shards cut across chunks.
const INGEST: &str = r#"
pipeline ingesting { seed = 3 }
dataset photos {
  source = folder("photos")
  max_image_size = 40
  drop = ["blue/00007.png", "blue/nope.png"]
}
"#;

/// Writes `proj/photos/<class>/NNNNN.png` (290 rendered images, every 13th too large for
/// `max_image_size`), three corrupt files, a copy of one image and a README.
fn make_photos(project: &Project) {
    let photos = project.path("proj/photos");
    let spec = |size: u32| vlmpipe::stages::data::SyntheticSpec {
        n: 290,
        seed: 4,
        width: size,
        height: size,
        colors: vec!["red".to_owned(), "blue".to_owned()],
        shapes: vec![vlmpipe::stages::data::Shape::Circle],
    };
    let (small, large) = (spec(24), spec(48));
    for i in 0..290 {
        let class = if i % 2 == 0 { "red" } else { "blue" };
        let folder = photos.join(class);
        std::fs::create_dir_all(&folder).unwrap();
        let source = if i % 13 == 5 { &large } else { &small };
        let bytes = source.render(i).unwrap();
        std::fs::write(folder.join(format!("{i:05}.png")), bytes).unwrap();
    }
    for bad in ["red/00100x.png", "blue/00200x.png"] {
        std::fs::write(photos.join(bad), b"not a png at all").unwrap();
    }
    // A class met only in an error row: in errors.parquet, not among the classes.
    std::fs::create_dir_all(photos.join("green")).unwrap();
    std::fs::write(photos.join("green/00001.png"), b"\x89PNG broken").unwrap();
    std::fs::copy(
        photos.join("red/00002.png"),
        photos.join("red/00250dup.png"),
    )
    .unwrap();
    std::fs::write(photos.join("red/README.txt"), b"not an image").unwrap();
}

fn ingest_project(pipeline: &str) -> Project {
    let project = Project::new();
    std::fs::write(project.path("proj/ingest.vp"), pipeline).unwrap();
    make_photos(&project);
    project
}

/// The dataset entry's four files, byte for byte.
fn dataset_files(stage: &Value) -> Vec<(String, Vec<u8>)> {
    [
        "rows.parquet",
        "images.parquet",
        "errors.parquet",
        "filtered.parquet",
    ]
    .iter()
    .map(|name| {
        let bytes = std::fs::read(entry_file(stage, name)).expect("entry file");
        ((*name).to_owned(), bytes)
    })
    .collect()
}

#[test]
fn an_ingest_in_shards_equals_the_unsharded_one() {
    let project = ingest_project(INGEST);
    let (output, whole) = project.run("proj/ingest.vp", "whole", &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let a = stage(&whole, "photos");
    assert!(a.get("shards").is_none(), "{a}");
    // What makes the comparison worth it: error rows among the rows, filtered rows, a duplicate.
    let rows = vlmpipe::stages::data::read_rows(&entry_file(a, "rows.parquet")).expect("rows");
    assert_eq!(rows.classes, ["blue", "red"]);
    let errors: Vec<&str> = rows
        .rows
        .iter()
        .filter(|r| r.image_error.is_some())
        .map(|r| r.row_id.as_str())
        .collect();
    assert_eq!(errors, ["blue/00200x.png", "red/00100x.png"], "{rows:?}");

    for (cache, extra) in [
        ("three", &["--shards", "3"][..]),
        ("seven", &["--shards", "7"]),
    ] {
        let (output, parts) = project.run("proj/ingest.vp", cache, extra);
        assert!(output.status.success(), "{}", text(&output.stderr));
        let b = stage(&parts, "photos");
        assert_eq!(b["status"], "ran", "{b}");
        assert_eq!(
            b["shards"]["count"],
            extra[1].parse::<u64>().unwrap(),
            "{b}"
        );
        assert_eq!(a["fingerprint"], b["fingerprint"]);
        assert_eq!(
            dataset_files(b),
            dataset_files(a),
            "{cache}: entry files differ"
        );
        assert_eq!(a["warnings"], b["warnings"]);
    }
    // The same with `shards = 4` written on the dataset.
    let staged = INGEST.replace("max_image_size = 40", "max_image_size = 40  shards = 4");
    std::fs::write(project.path("proj/staged.vp"), &staged).unwrap();
    let (output, parts) = project.run("proj/staged.vp", "staged", &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let b = stage(&parts, "photos");
    assert_eq!(b["shards"]["count"], 4, "{b}");
    assert_eq!(a["fingerprint"], b["fingerprint"]);
    assert_eq!(dataset_files(b), dataset_files(a));
}

#[test]
fn a_lost_ingest_shard_alone_is_recomputed() {
    let project = ingest_project(INGEST);
    let (output, first) = project.run("proj/ingest.vp", "cache", &["--shards", "4"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let photos = stage(&first, "photos");
    let before = dataset_files(photos);

    lose_shard(&project, photos, 1, 4);

    let (output, second) = project.run("proj/ingest.vp", "cache", &["--shards", "4"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let photos = stage(&second, "photos");
    assert_eq!(photos["status"], "ran");
    assert_eq!(shard_list(photos, "computed"), [1]);
    assert_eq!(shard_list(photos, "cached"), [0, 2, 3]);
    assert_eq!(dataset_files(photos), before);
}

#[test]
fn a_worker_ingests_one_shard_of_a_dataset() {
    let project = ingest_project(INGEST);
    let output = project.cli(&[
        "worker",
        "proj/ingest.vp",
        "--cache-dir",
        "cache",
        "--stage",
        "photos",
        "--shard",
        "2",
        "--of",
        "3",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("shard 2/3: computed"));
    assert_eq!(count_entries(&project), 1);
    let (output, summary) = project.run("proj/ingest.vp", "cache", &["--shards", "3"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let photos = stage(&summary, "photos");
    assert_eq!(shard_list(photos, "computed"), [0, 1]);
    assert_eq!(shard_list(photos, "cached"), [2]);
}

#[test]
fn shards_on_a_dataset_are_checked() {
    let project = ingest_project(INGEST);
    let bad = INGEST.replace("max_image_size = 40", "max_image_size = 40  shards = 0");
    std::fs::write(project.path("proj/bad.vp"), &bad).unwrap();
    let output = project.cli(&["check", "proj/bad.vp"]);
    assert!(!output.status.success());
    let said = text(&output.stdout) + &text(&output.stderr);
    let line = bad.lines().position(|l| l.contains("shards = 0")).unwrap() + 1;
    // The value's `0`, the line's last character.
    let column = bad.lines().nth(line - 1).unwrap().len();
    assert!(
        said.contains(&format!("bad.vp:{line}:{column}")) && said.contains("shards"),
        "{said}"
    );
}

/// Whether the run left any cache entry (work started).
fn no_entries(project: &Project) -> bool {
    count_entries(project) == 0
}

/// [`PIPELINE`] with an `executor slurm { ... }` block of `fields`, in `proj/NAME.vp`.
fn with_executor(project: &Project, name: &str, fields: &str) -> String {
    let file = format!("proj/{name}.vp");
    let text = format!("{PIPELINE}\nexecutor slurm {{ {fields} }}\n");
    std::fs::write(project.path(&file), text).unwrap();
    file
}

#[test]
fn an_executor_block_never_changes_a_fingerprint() {
    let project = Project::new();
    let file = with_executor(
        &project,
        "blocked",
        "partition = \"gpu\"  gpus_per_task = 1  cpus_per_task = 4  max_parallel = 8  \
         sbatch_args = [\"--time=01:00:00\"]",
    );
    let (output, plain) = project.run("proj/shards.vp", "cache", &["--dry-run"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let (output, blocked) = project.run(&file, "cache", &["--dry-run"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let fingerprints = |s: &Value| -> Vec<(String, String)> {
        s["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let name = s["name"].as_str().unwrap().to_owned();
                (name, s["fingerprint"].as_str().unwrap().to_owned())
            })
            .collect()
    };
    assert_eq!(fingerprints(&plain).len(), fingerprints(&blocked).len());
    assert_eq!(fingerprints(&plain), fingerprints(&blocked));
}

#[test]
fn an_executor_block_runs_on_slurm_only_when_active_or_asked() {
    let project = Project::new();
    // No Slurm anywhere: a run that tried it would fail before any work, naming `sbatch`.
    let empty = project.path("no-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let run = |file: &str, extra: &[&str]| {
        let mut args = vec![
            "run",
            file,
            "--cache-dir",
            "cache",
            "--quiet",
            "--only",
            "pictures",
        ];
        args.extend(extra);
        project.command(&args).env("PATH", &empty).output().unwrap()
    };

    // Settings alone do not switch the executor: the run is local.
    let inactive = with_executor(&project, "inactive", "partition = \"gpu\"");
    let output = run(&inactive, &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    std::fs::remove_dir_all(project.path("cache")).unwrap();

    // `active = true` does, before any work ...
    let active = with_executor(&project, "active", "active = true  partition = \"gpu\"");
    let output = run(&active, &["--shards", "2"]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("sbatch"),
        "{}",
        text(&output.stderr)
    );
    assert!(no_entries(&project), "work started");
    // ... and `--executor slurm` does for an inactive block; `--executor local` wins over it.
    let output = run(&inactive, &["--executor", "slurm"]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("sbatch"),
        "{}",
        text(&output.stderr)
    );
    assert!(no_entries(&project), "work started");
    let output = run(&active, &["--executor", "local"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
}

#[test]
fn an_executor_blocks_partition_reaches_slurm() {
    if crate::slurm::cluster().is_none() {
        return;
    }
    let project = Project::new();
    let file = with_executor(
        &project,
        "nope",
        "active = true  partition = \"nope\"  poll_interval = 0.2",
    );
    let output = project.cli(&["run", &file, "--cache-dir", "cache", "--shards", "2"]);
    assert!(!output.status.success());
    let said = text(&output.stderr);
    assert!(said.contains("partition `nope` does not exist"), "{said}");
    assert!(no_entries(&project), "work started: {said}");
    // The flag wins over the file: on the cluster's own partition the dataset's shards run
    // there, as a job array like an eval's.
    let listing = Command::new("sinfo")
        .args(["--noheader", "--format=%R"])
        .output()
        .expect("sinfo");
    let partition = text(&listing.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let (output, summary) = project.run(
        &file,
        "cache",
        &[
            "--shards",
            "2",
            "--only",
            "pictures",
            "--partition",
            &partition,
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let pictures = stage(&summary, "pictures");
    assert_eq!(pictures["shards"]["launcher"], "slurm", "{pictures}");
    assert_eq!(shard_list(pictures, "computed"), [0, 1]);
}

/// Removes shard `index` of `count` of a stage (as a worker killed before it committed) and the
/// stage's merged entry, from the project's `cache`.
fn lose_shard(project: &Project, stage: &Value, index: usize, count: usize) {
    let merged =
        vlmpipe::cache::Fingerprint::parse(stage["fingerprint"].as_str().unwrap()).unwrap();
    let shard =
        vlmpipe::exec::shard_fingerprint(&merged, vlmpipe::exec::ShardIndex { index, count });
    let entries = project.path("cache/entries");
    std::fs::remove_dir_all(entries.join(shard.as_str())).expect("shard entry");
    std::fs::remove_dir_all(entries.join(merged.as_str())).expect("merged entry");
}
