//! Issue 13, "what a user reads must be true", for what `run` leaves and says: exports that
//! equal the cache entries of the stages a run resolved (cached or not), a verified-bad entry
//! never trusted again, a run waiting for the cache lock that says for whom, a missing model
//! reported before anything runs with a report over the evals that exist, and the lines `run`,
//! `report` and `cache ls` print. The real binary on a tiny offline pipeline in a temp folder.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vlmpipe");

/// A quickstart in miniature: a generated dataset, a random tiny model, a grammar eval, a
/// one-step fine-tune and its eval, and a report comparing the two evals.
const PIPELINE: &str = r#"
pipeline tiny { seed = 23 }
param n_eval = 4
param max_steps = 1
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
eval constrained { model = small  data = sample(parts.test, n_eval)  prompt = ask  labels = shapes  output = one }
finetune tuned {
  base = small  data = parts.train  prompt = ask  labels = shapes  output = one
  lora { r = 2  alpha = 4  dropout = 0  targets = ["w1"] }
  max_steps = max_steps  batch_size = 2  grad_accum = 1  seed = 1
}
eval tuned_eval { model = tuned  data = sample(parts.test, n_eval)  prompt = ask  labels = shapes  output = one }
report summary { compare = [constrained, tuned_eval] }
"#;

/// A pipeline folder `proj/` inside a temp folder, with its own Hub cache, offline.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(pipeline: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp folder");
        std::fs::create_dir_all(dir.path().join("proj")).expect("proj");
        std::fs::write(dir.path().join("proj/tiny.vp"), pipeline).expect("pipeline");
        Self { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `vlmpipe ARGS`, run from the temp folder (the pipeline is `proj/tiny.vp`).
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("VLMPIPE_CACHE")
            .env("HF_HOME", self.path("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .env("NO_COLOR", "1");
        cmd
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("spawn vlmpipe")
    }

    /// `vlmpipe run proj/tiny.vp EXTRA --summary-json …`: (output, summary).
    fn run(&self, extra: &[&str]) -> (Output, Value) {
        let summary = self.path("summary.json");
        let _ = std::fs::remove_file(&summary);
        let mut args = vec!["run", "proj/tiny.vp", "--summary-json", "summary.json"];
        args.extend(extra);
        let output = self.cli(&args);
        let text = std::fs::read_to_string(&summary).unwrap_or_else(|_| {
            panic!(
                "no summary; stdout:\n{}\nstderr:\n{}",
                stdout(&output),
                stderr(&output)
            )
        });
        (output, serde_json::from_str(&text).expect("summary JSON"))
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stages(summary: &Value) -> &[Value] {
    summary["stages"].as_array().expect("stages")
}

fn stage<'a>(summary: &'a Value, name: &str) -> &'a Value {
    stages(summary)
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no stage `{name}` in {summary}"))
}

fn outputs(stage: &Value) -> Vec<PathBuf> {
    stage["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .filter_map(Value::as_str)
        .map(PathBuf::from)
        .collect()
}

/// Every export a stage lists (a path under `evals/`) has the bytes of the entry file of the same
/// name; returns how many were compared.
fn assert_exports_equal_entries(project: &Project, summary: &Value) -> usize {
    let mut compared = 0;
    for stage in stages(summary) {
        let files = outputs(stage);
        let (exports, entry): (Vec<&PathBuf>, Vec<&PathBuf>) = files
            .iter()
            .partition(|p| p.components().any(|c| c.as_os_str() == "evals"));
        for export in exports {
            let name = export.file_name().expect("file name");
            let source = entry
                .iter()
                .find(|p| p.file_name() == Some(name))
                .unwrap_or_else(|| panic!("no entry file for {}", export.display()));
            let export_path = if export.is_absolute() {
                export.clone()
            } else {
                project.path("").join(export)
            };
            assert!(
                std::fs::read(&export_path).expect("export")
                    == std::fs::read(source).expect("entry"),
                "{} differs from its entry {} (stage `{}`, {})",
                export.display(),
                source.display(),
                stage["name"],
                stage["status"]
            );
            compared += 1;
        }
    }
    compared
}

fn metrics_n(project: &Project, stage: &str) -> u64 {
    let path = project.path(&format!("proj/evals/tiny/{stage}/metrics.json"));
    let metrics: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("metrics.json")).expect("JSON");
    metrics["n"].as_u64().expect("n")
}

#[test]
fn exports_equal_the_entries_a_run_resolved_cached_or_not() {
    let project = Project::new(PIPELINE);
    let (out, a) = project.run(&["--quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Eval files, report pages and the fine-tune's pages: 4 + 4 + 1 + 3.
    assert_eq!(assert_exports_equal_entries(&project, &a), 12);

    let (out, _) = project.run(&["--quiet", "--set", "max_steps=2", "--set", "n_eval=6"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(metrics_n(&project, "tuned_eval"), 6);

    // Back to A: every stage from the cache, and every export is A's again.
    let (out, again) = project.run(&["--quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for s in stages(&again) {
        assert_eq!(s["status"], "cached", "{s}");
    }
    assert_eq!(assert_exports_equal_entries(&project, &again), 12);
    assert_eq!(metrics_n(&project, "tuned_eval"), 4);
    assert_eq!(metrics_n(&project, "constrained"), 4);

    // Deleted exports come back with the next run.
    let page = project.path("proj/evals/tiny/summary/report.html");
    let training = project.path("proj/evals/tiny/tuned/training.html");
    std::fs::remove_file(&page).expect("remove report");
    std::fs::remove_file(&training).expect("remove training page");
    let (out, restored) = project.run(&["--quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(page.is_file() && training.is_file());
    assert_eq!(assert_exports_equal_entries(&project, &restored), 12);
}

#[test]
fn run_report_and_cache_ls_say_what_is_true() {
    let project = Project::new(PIPELINE);
    let (out, _) = project.run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));

    // What `run` prints at the end: each eval's headline metrics and where the pages are.
    let text = stdout(&out);
    let table_at = text.find("accuracy").unwrap_or_else(|| panic!("{text}"));
    for name in ["constrained", "tuned_eval"] {
        assert!(text[table_at..].contains(name), "{text}");
    }
    assert!(text.contains("reports:"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("summary") && l.ends_with("summary/report.html")),
        "{text}"
    );

    // `vlmpipe report FILE` names the comparison page too.
    let report = project.cli(&["report", "proj/tiny.vp"]);
    assert!(report.status.success(), "{}", stderr(&report));
    assert!(
        stdout(&report)
            .lines()
            .any(|l| l.starts_with("report: ") && l.ends_with("summary/report.html")),
        "{}",
        stdout(&report)
    );

    // `--dry-run` runs nothing and says so; `--quiet` prints no per-stage lines.
    let (out, _) = project.run(&["--dry-run", "--set", "n_eval=5", "--quiet"]);
    let last = stdout(&out).lines().last().unwrap_or_default().to_owned();
    assert!(
        last.starts_with("dry run, nothing ran: 4 would run, 7 cached"),
        "{}",
        stdout(&out)
    );
    let (out, forced) = project.run(&["--quiet", "--force", "summary"]);
    assert_eq!(stage(&forced, "summary")["status"], "ran");
    assert!(!stderr(&out).contains("running `"), "{}", stderr(&out));

    // `cache ls` from the folder above the pipeline's: it says where the cache was found, and
    // takes the pipeline file.
    let ls = project.cli(&["cache", "ls"]);
    let text = stdout(&ls);
    assert!(text.contains("proj/.vlmpipe"), "{text}");
    let ls = project.cli(&["cache", "ls", "proj/tiny.vp"]);
    let text = stdout(&ls);
    assert!(
        text.contains("tuned_eval") && text.contains("entries,"),
        "{text}"
    );
    assert!(
        !project.path(".vlmpipe").exists(),
        "`cache ls` created a cache"
    );
}

#[test]
fn a_verified_bad_entry_is_removed_and_recomputed() {
    let project = Project::new(PIPELINE);
    let (out, first) = project.run(&["--quiet", "--only", "small"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The random checkpoint is above the size that fast lookups rehash only when mtime moved.
    let big = outputs(stage(&first, "small"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a weights file");
    let meta = std::fs::metadata(&big).expect("metadata");
    assert!(meta.len() > 1 << 20, "{} bytes", meta.len());
    let mut bytes = std::fs::read(&big).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&big, bytes).expect("write");
    std::fs::File::options()
        .write(true)
        .open(&big)
        .expect("open")
        .set_modified(meta.modified().expect("mtime"))
        .expect("set mtime");

    let verify = project.cli(&["cache", "verify", "--cache-dir", "proj/.vlmpipe"]);
    assert_eq!(verify.status.code(), Some(1), "{}", stdout(&verify));
    let text = stdout(&verify);
    assert!(
        text.contains("checksum mismatch") && text.contains("removed"),
        "{text}"
    );

    let (out, second) = project.run(&["--quiet", "--only", "small"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stage(&second, "small")["status"], "ran");
    let verify = project.cli(&["cache", "verify", "proj/tiny.vp"]);
    assert!(verify.status.success(), "{}", stdout(&verify));
}

#[test]
fn a_run_waiting_for_the_lock_says_who_holds_it() {
    let project = Project::new(PIPELINE);
    let held = vlmpipe::cache::CacheLock::acquire(&project.path("proj/.vlmpipe"), Duration::ZERO)
        .expect("lock");
    let mut child = project
        .command(&[
            "run",
            "proj/tiny.vp",
            "--only",
            "pictures",
            "--quiet",
            "--lock-wait",
            "60",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let err = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let started = Instant::now();
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the waiting run printed nothing");
    // Said at once, naming the holder (this test) and its command line.
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(first.starts_with("waiting for the cache"), "{first}");
    assert!(
        first.contains(&format!("pid {} (`", std::process::id())),
        "{first}"
    );
    assert!(first.contains("giving up after 60 s"), "{first}");
    drop(held);
    let status = child.wait().expect("wait");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.starts_with("got the cache lock")),
        "{rest:?}"
    );
}

#[test]
fn a_missing_model_is_reported_first_and_the_report_renders_what_exists() {
    // `absent` is declared after the first eval, so before the fix it was only looked at once
    // `constrained` had run.
    let pipeline = PIPELINE.replace(
        "finetune tuned {",
        "model absent = hf(\"LiquidAI/not-downloaded\")\n\
         eval absent_eval { model = absent  data = sample(parts.test, n_eval)  prompt = ask  labels = shapes  output = one }\n\
         finetune tuned {",
    )
    .replace(
        "compare = [constrained, tuned_eval]",
        "compare = [constrained, absent_eval, tuned_eval]",
    );
    let project = Project::new(&pipeline);
    let (out, summary) = project.run(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let reported = err
        .find("LiquidAI/not-downloaded")
        .unwrap_or_else(|| panic!("{err}"));
    let first_run = err.find("running `").unwrap_or_else(|| panic!("{err}"));
    assert!(reported < first_run, "{err}");
    assert!(err[..first_run].contains("cannot run"), "{err}");
    assert_eq!(stage(&summary, "absent")["status"], "failed");
    assert_eq!(stage(&summary, "absent_eval")["status"], "skipped");
    assert_eq!(stage(&summary, "tuned_eval")["status"], "ran");

    // The report renders the two evals that exist and names the missing one.
    let report = stage(&summary, "summary");
    assert_eq!(report["status"], "ran", "{report}");
    let page = std::fs::read_to_string(project.path("proj/evals/tiny/summary/report.html"))
        .expect("report.html");
    assert!(page.contains("Not in this report"));
    assert!(page.contains("absent_eval"));
    // With the root cause, not just "an input did not complete".
    assert!(page.contains("LiquidAI/not-downloaded"), "{page}");
    assert!(page.contains("constrained") && page.contains("tuned_eval"));
    assert!(report["warnings"].as_array().is_some_and(|w| {
        w.iter()
            .any(|w| w.as_str().unwrap_or("").contains("absent_eval"))
    }));
    let partial_fp = report["fingerprint"].as_str().expect("fp").to_owned();

    // The same run again: the partial report is reused, keyed by what it lacks …
    let (_, again) = project.run(&["--quiet"]);
    assert_eq!(stage(&again, "summary")["status"], "cached");
    assert_eq!(stage(&again, "summary")["fingerprint"], partial_fp.as_str());

    // … and never taken for the complete one once the model is there.
    let fixed = pipeline.replace(
        "hf(\"LiquidAI/not-downloaded\")",
        "init(preset: \"tiny\", seed: 2)",
    );
    std::fs::write(project.path("proj/tiny.vp"), fixed).expect("pipeline");
    let (out, complete) = project.run(&["--quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = stage(&complete, "summary");
    assert_eq!(report["status"], "ran");
    assert_ne!(report["fingerprint"], partial_fp.as_str());
    let page = std::fs::read_to_string(project.path("proj/evals/tiny/summary/report.html"))
        .expect("report.html");
    assert!(!page.contains("Not in this report"));
    assert_exports_equal_entries(&project, &complete);
}
