//! Eval and report stages end to end: the offline shapes example with a random tiny model, run
//! by the real binary. Accuracy is not the point (the model is random); the invariants are:
//! every sample is recorded, constrained answers are always valid, label scores are
//! distributions, and the report compares the stages.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vlmpipe::stages::eval::read_records_parquet;

const BIN: &str = env!("CARGO_BIN_EXE_vlmpipe");

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/shapes_demo.vp")
}

fn run(dir: &Path) -> Value {
    let summary = dir.join("summary.json");
    let output = Command::new(BIN)
        .arg("run")
        .arg(example())
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--evals-dir")
        .arg(dir.join("evals"))
        .arg("--summary-json")
        .arg(&summary)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run vlmpipe");
    assert!(
        output.status.success(),
        "vlmpipe run failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&std::fs::read(summary).expect("summary")).expect("summary JSON")
}

fn metrics(dir: &Path, stage: &str) -> Value {
    let path = dir.join("evals").join(stage).join("metrics.json");
    serde_json::from_slice(&std::fs::read(path).expect("metrics.json")).expect("metrics JSON")
}

#[test]
fn evals_and_report_run_and_rerun_from_cache() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = run(dir.path());
    let stages = first["stages"].as_array().expect("stages");
    for stage in stages {
        assert_eq!(stage["status"], "ran", "{stage}");
    }

    // The raw baseline: a random model rambles, every answer is invalid and counted as wrong.
    let baseline = metrics(dir.path(), "baseline");
    assert_eq!(baseline["n"], 12);
    assert_eq!(baseline["invalid_rate"], 1.0);
    assert_eq!(baseline["accuracy"], 0.0);

    // The grammar forces a label every time.
    let constrained = metrics(dir.path(), "constrained");
    assert_eq!(constrained["invalid_rate"], 0.0);
    let records = read_records_parquet(&dir.path().join("evals/constrained/records.parquet"))
        .expect("records");
    assert_eq!(records.records.len(), 12);
    for record in &records.records {
        let label = record.parsed_label.as_deref().expect("a label");
        assert!(records.labels.iter().any(|l| l == label));
        assert_eq!(record.correct, label == record.ground_truth);
    }

    // Label scoring: a distribution per sample whose argmax is the prediction.
    let scored =
        read_records_parquet(&dir.path().join("evals/scored/records.parquet")).expect("records");
    for record in &scored.records {
        let probs = record.class_probs.as_ref().expect("class probabilities");
        assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }
    let scored_metrics = metrics(dir.path(), "scored");
    assert!(scored_metrics["log_loss"].as_f64().is_some());
    // Scoring picks among the labels (here under a JSON grammar): never an invalid answer.
    assert_eq!(scored_metrics["invalid_rate"], 0.0);

    // The comparison report names every compared stage; the CSV keeps the tutorial's columns.
    let report =
        std::fs::read_to_string(dir.path().join("evals/summary/report.html")).expect("report.html");
    for name in ["baseline", "constrained", "scored"] {
        assert!(report.contains(name), "report lacks `{name}`");
    }
    let csv = std::fs::read_to_string(dir.path().join("evals/baseline/predictions.csv"))
        .expect("predictions.csv");
    assert!(csv.starts_with("image_base64,ground_truth,predicted,correct\n"));

    // The summary lists the exports, and a rerun is served entirely from the cache.
    let baseline_stage = stages
        .iter()
        .find(|s| s["name"] == "baseline")
        .expect("baseline stage");
    let outputs: Vec<&str> = baseline_stage["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        outputs
            .iter()
            .any(|o| o.ends_with("evals/baseline/predictions.csv"))
    );
    let second = run(dir.path());
    for stage in second["stages"].as_array().expect("stages") {
        assert_eq!(stage["status"], "cached", "{stage}");
    }
}

#[test]
fn report_and_show_read_results_without_running() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("cache");
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg(example())
            .args(["--cache-dir", cache.to_str().expect("utf-8 path")])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .expect("run vlmpipe")
    };
    // Before any run there is nothing to report, and nothing is computed.
    let before = cli(&["report"]);
    assert_eq!(before.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&before.stderr).contains("has no results"));
    assert!(
        !cache.join("entries").exists()
            || std::fs::read_dir(cache.join("entries"))
                .expect("entries")
                .next()
                .is_none()
    );

    run_into(dir.path(), &cache);
    let after = cli(&["report"]);
    assert!(after.status.success());
    let text = String::from_utf8_lossy(&after.stdout);
    for name in ["baseline", "constrained", "scored"] {
        assert!(text.contains(name), "{text}");
    }
    assert!(
        text.contains("100.0%"),
        "baseline invalid rate missing:\n{text}"
    );
    assert!(text.contains("report: "), "{text}");

    let show = Command::new(BIN)
        .args(["show"])
        .arg(example())
        .args([
            "baseline",
            "--misclassified",
            "--cache-dir",
            cache.to_str().expect("utf-8"),
        ])
        .output()
        .expect("run vlmpipe");
    assert!(show.status.success());
    let listing = String::from_utf8_lossy(&show.stdout);
    assert!(
        listing.starts_with("12 misclassified of 12 (12 invalid)"),
        "{listing}"
    );
}

fn run_into(dir: &Path, cache: &Path) {
    let output = Command::new(BIN)
        .arg("run")
        .arg(example())
        .arg("--cache-dir")
        .arg(cache)
        .arg("--evals-dir")
        .arg(dir.join("evals"))
        .arg("--quiet")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run vlmpipe");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
