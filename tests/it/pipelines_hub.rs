//! The Hub path without the Hub: `pipelines/cats_vs_dogs.vp` (its GGUF export and the eval of
//! that export included), unchanged, run offline against a Hub cache built on disk in a temporary
//! `HF_HOME`.
//!
//! The cache holds the `tiny-thumb` reference checkpoint (random weights, LFM2-VL-450M's
//! processor settings) under both `LiquidAI/LFM2-VL-450M` and `LiquidAI/LFM2-VL-1.6B`, and a
//! dataset repo `microsoft/cats_vs_dogs` in the Hub's Parquet layout (`image` struct {bytes,
//! path}, int `labels`) made from the real photos in `../shared/data/cats_vs_dogs`. With
//! `HF_HUB_OFFLINE=1` nothing is downloaded; on a machine with internet the same pipeline fetches
//! the real model and data into the real cache instead. Only `--set` shrinks sample sizes and
//! steps. Skips when `../shared` is absent.

use crate::data_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::shared_path;
use serde_json::Value;
use vlmpipe::stages::data::read_rows;

const BIN: &str = env!("CARGO_BIN_EXE_vlmpipe");

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `(jpeg bytes, label)` for every photo of `shared/data/cats_vs_dogs/{cat,dog}`, 0 = cat.
fn photos(root: &Path) -> Vec<(Option<Vec<u8>>, Option<i64>)> {
    let mut rows = Vec::new();
    for (label, class) in ["cat", "dog"].iter().enumerate() {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join(class))
            .expect("class folder")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
            .collect();
        paths.sort();
        for path in paths {
            rows.push((
                Some(std::fs::read(&path).expect("photo")),
                Some(label as i64),
            ));
        }
    }
    rows
}

fn stage<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["stages"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no stage `{name}` in {summary}"))
}

fn output(summary: &Value, stage_name: &str, file: &str) -> PathBuf {
    stage(summary, stage_name)["outputs"]
        .as_array()
        .and_then(|o| {
            o.iter()
                .filter_map(Value::as_str)
                .find(|p| p.ends_with(&format!("/{file}")))
        })
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("stage `{stage_name}` has no output `{file}`"))
}

#[test]
fn cats_vs_dogs_runs_unchanged_from_an_offline_hub_cache() {
    let Some(photo_root) = shared_path("data/cats_vs_dogs") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp folder");
    let hub = dir.path().join("hf/hub");
    let checkpoint = data_support::tiny_checkpoint_files();
    data_support::put_hub_snapshot(&hub, "models--LiquidAI--LFM2-VL-450M", &checkpoint);
    data_support::put_hub_snapshot(&hub, "models--LiquidAI--LFM2-VL-1.6B", &checkpoint);
    let rows = photos(&photo_root);
    let n_photos = rows.len();
    // Two shards, as the Hub's Parquet conversion writes large splits.
    let half = n_photos / 2;
    let shards = dir.path().join("shards");
    for (i, part) in [&rows[..half], &rows[half..]].iter().enumerate() {
        data_support::write_hub_parquet(
            &shards.join(format!("train-0000{i}-of-00002.parquet")),
            part,
        );
    }
    let shard_files: Vec<(String, Vec<u8>)> = (0..2)
        .map(|i| {
            let name = format!("train-0000{i}-of-00002.parquet");
            let bytes = std::fs::read(shards.join(&name)).expect("shard");
            (format!("data/{name}"), bytes)
        })
        .collect();
    data_support::put_hub_snapshot(&hub, "datasets--microsoft--cats_vs_dogs", &shard_files);

    let summary_path = dir.path().join("summary.json");
    let output_run = Command::new(BIN)
        .arg("run")
        .arg(repo_root().join("pipelines/cats_vs_dogs.vp"))
        .args([
            "--set",
            "n_eval=6",
            "--set",
            "n_val=4",
            "--set",
            "max_steps=2",
        ])
        .args(["--set", "eval_every=1", "--set", "max_new_tokens=32"])
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--evals-dir")
        .arg(dir.path().join("evals"))
        .arg("--summary-json")
        .arg(&summary_path)
        .arg("--quiet")
        .current_dir(dir.path())
        .env_remove("VLMPIPE_CACHE")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env("HF_HOME", dir.path().join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .env("NO_COLOR", "1")
        .output()
        .expect("spawn vlmpipe");
    let stderr = String::from_utf8_lossy(&output_run.stderr);
    assert!(
        output_run.status.success(),
        "vlmpipe run failed:\nstdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&output_run.stdout)
    );
    let summary: Value =
        serde_json::from_slice(&std::fs::read(&summary_path).expect("summary")).expect("json");

    // Every stage ran: models and data from the cache, evals, the fine-tune and the report.
    let stages = summary["stages"].as_array().expect("stages");
    for name in [
        "pets",
        "pets_split",
        "lfm2_vl_450m",
        "lfm2_vl_1_6b",
        "base_450m",
        "base_1_6b",
        "json_1_6b",
        "json_450m",
        "tuned_450m",
        "tuned_450m_test",
        "cats_vs_dogs_report",
        "tuned_450m_q8",
        "tuned_450m_q8_test",
        "shipped_450m",
    ] {
        assert_eq!(stage(&summary, name)["status"], "ran", "stage `{name}`");
    }
    for s in stages {
        assert_eq!(s["status"], "ran", "{s}");
    }

    // The dataset is the photos, labelled through the pipeline's mapping; the split is 90/10.
    let pets = read_rows(&output(&summary, "pets", "rows.parquet")).expect("rows");
    assert_eq!(pets.rows.len(), n_photos);
    assert_eq!(pets.classes, ["cat", "dog"]);
    let train = read_rows(&output(&summary, "pets_split", "train.parquet")).expect("train");
    let test = read_rows(&output(&summary, "pets_split", "test.parquet")).expect("test");
    assert_eq!(train.rows.len() + test.rows.len(), n_photos);
    assert_eq!(test.rows.len(), (n_photos as f64 * 0.1).round() as usize);

    // The models resolved to the fake snapshots, not a download.
    for model in ["lfm2_vl_450m", "lfm2_vl_1_6b"] {
        let text = std::fs::read_to_string(output(&summary, model, "model.json")).expect("model");
        assert!(text.contains(data_support::HUB_COMMIT), "{model}: {text}");
    }

    // Each eval scored the shrunk sample; the grammar evals only give labels (32 new tokens
    // leave room for the JSON object even in the tiny byte-level vocabulary).
    for eval in [
        "base_450m",
        "base_1_6b",
        "json_1_6b",
        "json_450m",
        "tuned_450m_test",
        "tuned_450m_q8_test",
    ] {
        let path = dir.path().join("evals").join(eval).join("metrics.json");
        let metrics: Value = serde_json::from_slice(&std::fs::read(&path).expect("metrics.json"))
            .expect("metrics json");
        assert_eq!(metrics["n"], 6, "{eval}");
        if eval.starts_with("json") {
            assert_eq!(metrics["invalid_rate"], 0.0, "{eval}");
        }
    }
    // Two optimizer steps, and an adapter the tuned eval used.
    let csv = std::fs::read_to_string(output(&summary, "tuned_450m", "metrics.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(output(&summary, "tuned_450m", "adapter_model.safetensors").is_file());

    let report = std::fs::read_to_string(dir.path().join("evals/cats_vs_dogs_report/report.html"))
        .expect("report.html");
    for name in [
        "base_450m",
        "base_1_6b",
        "json_1_6b",
        "json_450m",
        "tuned_450m_test",
    ] {
        assert!(report.contains(name), "the report lacks `{name}`");
    }
    // The export: a Q8_0 text model and an F16 mmproj, copied beside the evals, evaluated from
    // those files, beside the fine-tune in its own report.
    let shipped = dir.path().join("evals/tuned_450m_q8");
    for file in ["tuned_450m_q8-Q8_0.gguf", "mmproj-tuned_450m_q8-F16.gguf"] {
        assert_eq!(
            &std::fs::read(shipped.join(file)).expect("exported file")[..4],
            b"GGUF"
        );
    }
    let report = std::fs::read_to_string(dir.path().join("evals/shipped_450m/report.html"))
        .expect("report.html");
    assert!(report.contains("model size (MB)"));
    for name in ["tuned_450m_test", "tuned_450m_q8_test"] {
        assert!(report.contains(name), "the report lacks `{name}`");
    }
}
