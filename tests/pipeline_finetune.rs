//! The `finetune` stage end to end, with the real binary on an offline pipeline (generated
//! shapes, a seeded `init` tiny model): it trains and writes a loadable PEFT adapter, an eval
//! stage uses the fine-tune, a rerun is cached, a `vlmpipe run` killed after a checkpoint resumes
//! on rerun and ends with the same adapter as an uninterrupted run, `export --merged` writes a
//! loadable checkpoint, and a target that matches no module fails the stage with the model's real
//! module names.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vlmpipe::model::checkpoint::{LoadOptions, load};
use vlmpipe::train::PeftAdapter;

const BIN: &str = env!("CARGO_BIN_EXE_vlmpipe");

/// A small fine-tune: 36 training rows, 12 held out, 12 steps with a checkpoint every 2.
fn pipeline(targets: &str) -> String {
    format!(
        r#"
pipeline ft_test {{ seed = 5 }}
labels shapes = ["red circle", "red square", "blue circle", "blue square"]
dataset pictures {{
  source = synthetic(kind: "shapes", n: 48, seed: 1, size: 32, colors: "red,blue", shapes: "circle,square")
  label  = "class"
  labels = shapes
}}
split parts = stratified(pictures, train: 0.75, test: 0.25, seed: 42)
prompt ask {{ user = "Which shape? {{% for l in labels %}}{{{{ l }}}}; {{% endfor %}}" }}
model tiny = init(preset: "tiny", seed: 1)
grammar answer = json(whitespace: "compact") {{ pred_class: one_of(shapes) }}
finetune ft {{
  base = tiny  data = parts.train  eval_data = parts.test  prompt = ask  labels = shapes  output = answer
  lora {{ r = 4  alpha = 8  dropout = 0.1  targets = [{targets}] }}
  lr = 0.005  batch_size = 4  grad_accum = 1  max_steps = 12  eval_every = 4  checkpoint_every = 2
}}
eval after {{ model = ft  data = parts.test  prompt = ask  labels = shapes  output = answer }}
"#
    )
}

/// A scratch folder holding the pipeline file, its cache and its exports.
struct Scene {
    dir: PathBuf,
}

impl Scene {
    fn new(root: &Path, name: &str, targets: &str) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("scene dir");
        std::fs::write(dir.join("ft.vp"), pipeline(targets)).expect("pipeline file");
        Self { dir }
    }

    fn command(&self, verb: &str) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg(verb)
            .arg(self.dir.join("ft.vp"))
            .arg("--cache-dir")
            .arg(self.cache())
            .arg("--evals-dir")
            .arg(self.dir.join("evals"))
            .env("HF_HUB_OFFLINE", "1");
        cmd
    }

    fn cache(&self) -> PathBuf {
        self.dir.join("cache")
    }

    fn summary_path(&self) -> PathBuf {
        self.dir.join("summary.json")
    }

    /// `vlmpipe run` to completion: its output and the summary JSON.
    fn run(&self) -> (Output, Value) {
        let output = self
            .command("run")
            .arg("--summary-json")
            .arg(self.summary_path())
            .output()
            .expect("run vlmpipe");
        let summary = std::fs::read(self.summary_path()).expect("summary.json");
        let summary = serde_json::from_slice(&summary).expect("summary JSON");
        (output, summary)
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stage<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["stages"]
        .as_array()
        .and_then(|stages| stages.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no stage `{name}` in {summary}"))
}

/// The cache entry folder of stage `name` (where its `model.json` is).
fn entry_dir(summary: &Value, name: &str) -> PathBuf {
    stage(summary, name)["outputs"]
        .as_array()
        .and_then(|outputs| {
            outputs
                .iter()
                .filter_map(Value::as_str)
                .find(|o| o.ends_with("/model.json"))
        })
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
        .unwrap_or_else(|| panic!("no model.json among the outputs of `{name}`"))
}

fn metadata(entry: &Path) -> Value {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(entry.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    manifest["metadata"]["stage"].clone()
}

/// Polls the cache's work dirs until a trainer checkpoint is complete.
fn wait_for_checkpoint(cache: &Path, deadline: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < deadline {
        if let Ok(dirs) = std::fs::read_dir(cache.join("work")) {
            for dir in dirs.flatten() {
                if dir.path().join("checkpoints/latest").is_file() {
                    return true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn finetune_trains_caches_resumes_after_a_kill_and_exports() {
    let root = tempfile::tempdir().expect("temp dir");
    let targets = r#""q_proj", "v_proj", "w1""#;

    // Uninterrupted: the stage runs, writes a loadable adapter and a model entry.
    let whole = Scene::new(root.path(), "whole", targets);
    let (output, first) = whole.run();
    assert!(output.status.success(), "run failed:\n{}", stderr(&output));
    assert_eq!(stage(&first, "ft")["status"], "ran");
    let entry = entry_dir(&first, "ft");
    for file in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.parquet",
        "trainable.json",
    ] {
        assert!(entry.join(file).is_file(), "missing {file}");
    }
    let adapter = PeftAdapter::load(&entry.join("adapter"), &candle_core::Device::Cpu)
        .expect("the adapter loads");
    // q_proj and v_proj exist only in the attention layers, w1 in every layer.
    assert!(
        adapter.lora.len() > 6,
        "{} LoRA modules",
        adapter.lora.len()
    );
    let model_json: Value =
        serde_json::from_slice(&std::fs::read(entry.join("model.json")).expect("model.json"))
            .expect("model JSON");
    assert_eq!(model_json["adapter"], "adapter");
    // The `init` base lives in another entry: copied, so the entry names no machine path.
    assert_eq!(
        model_json["base"],
        serde_json::json!({"source": "entry", "path": "base"})
    );
    assert!(entry.join("base/config.json").is_file());
    let meta = metadata(&entry);
    assert_eq!(meta["steps"], 12);
    assert!(meta["trained_parameters"].as_u64().is_some_and(|n| n > 0));
    assert!(meta["best_eval_loss"].as_f64().is_some());
    assert!(meta["resumed_from"].is_null());
    let trainable: Value =
        serde_json::from_slice(&std::fs::read(entry.join("trainable.json")).expect("trainable"))
            .expect("trainable JSON");
    assert_eq!(trainable["num_parameters"], meta["trained_parameters"]);
    for export in ["training.html", "metrics.csv", "metrics.parquet"] {
        assert!(
            whole.dir.join("evals/ft").join(export).is_file(),
            "missing export {export}"
        );
    }
    let csv = std::fs::read_to_string(whole.dir.join("evals/ft/metrics.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 13, "{csv}");

    // An eval stage uses the fine-tune like any model (base + adapter).
    assert_eq!(stage(&first, "after")["status"], "ran");
    let eval: Value = serde_json::from_slice(
        &std::fs::read(whole.dir.join("evals/after/metrics.json")).expect("eval metrics"),
    )
    .expect("metrics JSON");
    assert_eq!(eval["n"], 12);
    assert_eq!(eval["invalid_rate"], 0.0);

    // A rerun is served from the cache.
    let (output, second) = whole.run();
    assert!(
        output.status.success(),
        "rerun failed:\n{}",
        stderr(&output)
    );
    for name in ["ft", "after"] {
        assert_eq!(stage(&second, name)["status"], "cached");
    }

    // Killed after its first checkpoint, the rerun resumes and ends with the same adapter.
    let killed = Scene::new(root.path(), "killed", targets);
    let mut child = killed
        .command("run")
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vlmpipe run");
    let checkpointed = wait_for_checkpoint(&killed.cache(), Duration::from_secs(60));
    child.kill().expect("kill vlmpipe run");
    let status = child.wait().expect("wait for the killed run");
    assert!(checkpointed, "no checkpoint appeared");
    assert!(!status.success(), "the run finished before it was killed");
    let (output, resumed) = killed.run();
    let text = stderr(&output);
    assert!(output.status.success(), "resumed run failed:\n{text}");
    assert_eq!(stage(&resumed, "ft")["status"], "ran");
    assert!(
        text.contains("ft: resuming from the checkpoint at step"),
        "{text}"
    );
    let resumed_entry = entry_dir(&resumed, "ft");
    let from = metadata(&resumed_entry)["resumed_from"].as_u64();
    assert!(from.is_some_and(|s| (1..12).contains(&s)), "{from:?}");
    let read = |dir: &Path| std::fs::read(dir.join("adapter/adapter_model.safetensors"));
    assert!(
        read(&entry).expect("adapter") == read(&resumed_entry).expect("resumed adapter"),
        "the resumed run ended with another adapter"
    );
    // The work dir is gone once the entry is committed.
    let leftovers = std::fs::read_dir(killed.cache().join("work"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0);

    // `export --merged` (cached, so no training) writes a checkpoint that loads.
    let merged = root.path().join("merged");
    let output = whole
        .command("export")
        .arg("ft")
        .arg("--merged")
        .arg(&merged)
        .output()
        .expect("run vlmpipe export");
    assert!(
        output.status.success(),
        "export failed:\n{}",
        stderr(&output)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        merged.display().to_string()
    );
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(
            merged.join(file).is_file(),
            "merged checkpoint lacks {file}"
        );
    }
    let model = load(&merged, &LoadOptions::default());
    assert!(model.is_ok(), "{:?}", model.err());
}

#[test]
fn unknown_target_fails_the_stage_listing_real_modules() {
    let root = tempfile::tempdir().expect("temp dir");
    let scene = Scene::new(root.path(), "bad", r#""o_proj""#);
    let (output, summary) = scene.run();
    assert!(!output.status.success());
    let ft = stage(&summary, "ft");
    assert_eq!(ft["status"], "failed");
    let reason = ft["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("`o_proj`"), "{reason}");
    for real in ["q_proj", "out_proj", "in_proj", "w1"] {
        assert!(reason.contains(real), "`{real}` not listed: {reason}");
    }

    // Exporting a stage that cannot run reports the failure instead of writing anything.
    let merged = root.path().join("merged");
    let output = scene
        .command("export")
        .arg("ft")
        .arg("--merged")
        .arg(&merged)
        .output()
        .expect("run vlmpipe export");
    assert!(!output.status.success());
    assert!(!merged.exists());
}
