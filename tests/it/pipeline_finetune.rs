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

/// The training fields of the test fine-tune: 12 steps with a checkpoint every 2.
const TRAINING: &str = "lr = 0.005  batch_size = 4  grad_accum = 1  max_steps = 12  eval_every = 4  checkpoint_every = 2";

/// A small fine-tune: 36 training rows, 12 held out, with `training` fields (line 15 of the file).
fn pipeline(targets: &str, training: &str) -> String {
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
  {training}
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
        Self::with_training(root, name, targets, TRAINING)
    }

    fn with_training(root: &Path, name: &str, targets: &str, training: &str) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("scene dir");
        let scene = Self { dir };
        scene.write(targets, training);
        scene
    }

    /// Rewrites the pipeline file.
    fn write(&self, targets: &str, training: &str) {
        std::fs::write(self.dir.join("ft.vp"), pipeline(targets, training)).expect("pipeline file");
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

const TARGETS: &str = r#""q_proj", "v_proj", "w1""#;

/// `(line, column)` of the first `needle` in the scene's pipeline file, 1-based.
fn position(scene: &Scene, needle: &str) -> (usize, usize) {
    let text = std::fs::read_to_string(scene.dir.join("ft.vp")).expect("pipeline file");
    text.lines()
        .enumerate()
        .find_map(|(i, line)| line.find(needle).map(|col| (i + 1, col + 1)))
        .unwrap_or_else(|| panic!("`{needle}` is not in the pipeline"))
}

/// Issue 13, items 7 and 8: a change that cannot change the adapter (`epochs` under `max_steps`,
/// the checkpoint intervals) reruns nothing, and `run` and `check` say where a field has no
/// effect; a change that can reruns the fine-tune and names the field, old → new.
#[test]
fn moot_changes_rerun_nothing_and_real_ones_name_the_field() {
    let root = tempfile::tempdir().expect("temp dir");
    let scene = Scene::new(root.path(), "moot", TARGETS);
    let (output, first) = scene.run();
    assert!(output.status.success(), "run failed:\n{}", stderr(&output));
    assert_eq!(stage(&first, "ft")["status"], "ran");

    let moot = TRAINING.replace(
        "checkpoint_every = 2",
        "checkpoint_every = 5  checkpoint_minutes = 7  epochs = 3",
    );
    scene.write(TARGETS, &moot);
    let (line, col) = position(&scene, "epochs = 3");
    let at = format!("{}:{line}:{col}", scene.dir.join("ft.vp").display());
    let (output, second) = scene.run();
    let text = stderr(&output);
    assert!(output.status.success(), "run failed:\n{text}");
    for name in ["ft", "after"] {
        assert_eq!(stage(&second, name)["status"], "cached", "{name}: {text}");
    }
    let warning = "warning[no-effect]: `epochs` has no effect in finetune `ft`: `max_steps` sets the number of optimizer steps";
    assert!(text.contains(warning) && text.contains(&at), "{text}");
    let output = Command::new(BIN)
        .arg("check")
        .arg(scene.dir.join("ft.vp"))
        .env("NO_COLOR", "1")
        .output()
        .expect("run vlmpipe check");
    let text = stderr(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains(warning) && text.contains(&at), "{text}");

    // A meaningful change reruns the fine-tune, naming the field with both values.
    scene.write(
        TARGETS,
        &TRAINING.replace("max_steps = 12", "max_steps = 6"),
    );
    let (output, third) = scene.run();
    assert!(output.status.success(), "run failed:\n{}", stderr(&output));
    let ft = stage(&third, "ft");
    assert_eq!(ft["status"], "ran");
    assert_eq!(ft["reason"], "parameter `max_steps` changed: 12 → 6");
    assert_eq!(stage(&third, "after")["reason"], "input `ft` changed");
    assert_eq!(metadata(&entry_dir(&third, "ft"))["steps"], 6);
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create folder");
    for item in std::fs::read_dir(from).expect("read folder").flatten() {
        let target = to.join(item.file_name());
        if item.path().is_dir() {
            copy_tree(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), &target).expect("copy file");
        }
    }
}

fn adapter_bytes(entry: &Path) -> Vec<u8> {
    std::fs::read(entry.join("adapter/adapter_model.safetensors")).expect("adapter")
}

/// Issue 13, items 9 and 10: a fine-tune that sets nothing about checkpoints still checkpoints
/// (every 50 steps by default), so a killed run resumes and ends with the uninterrupted run's
/// adapter; a damaged checkpoint is reported and training starts over instead of failing for
/// good; `--force` discards the checkpoints and trains from scratch.
#[test]
fn default_checkpoints_resume_a_killed_run_survive_damage_and_force_starts_fresh() {
    let root = tempfile::tempdir().expect("temp dir");
    // 60 steps of one example: the default checkpoint comes at step 50.
    let training = "lr = 0.005  batch_size = 1  grad_accum = 1  max_steps = 60";
    let whole = Scene::with_training(root.path(), "whole", TARGETS, training);
    let (output, first) = whole.run();
    assert!(output.status.success(), "run failed:\n{}", stderr(&output));
    let expected = adapter_bytes(&entry_dir(&first, "ft"));

    let killed = Scene::with_training(root.path(), "killed", TARGETS, training);
    let mut child = killed
        .command("run")
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vlmpipe run");
    let checkpointed = wait_for_checkpoint(&killed.cache(), Duration::from_secs(120));
    child.kill().expect("kill vlmpipe run");
    let status = child.wait().expect("wait for the killed run");
    assert!(
        checkpointed,
        "no checkpoint appeared with the default settings"
    );
    assert!(!status.success(), "the run finished before it was killed");
    let work = killed.cache().join("work");
    let snapshot = root.path().join("work-after-kill");
    copy_tree(&work, &snapshot);

    // Resumed from the default checkpoint, to the same adapter.
    let (output, resumed) = killed.run();
    let text = stderr(&output);
    assert!(output.status.success(), "resumed run failed:\n{text}");
    assert!(
        text.contains("ft: resuming from the checkpoint at step 50"),
        "{text}"
    );
    let entry = entry_dir(&resumed, "ft");
    assert_eq!(metadata(&entry)["resumed_from"], 50);
    assert!(
        adapter_bytes(&entry) == expected,
        "resumed to another adapter"
    );

    // The same work folder with its checkpoint damaged: reported, and training starts over.
    let rerun_with = |damage: &dyn Fn(&Path), args: &[&str]| {
        std::fs::remove_dir_all(&entry).expect("remove the fine-tune's entry");
        let _ = std::fs::remove_dir_all(&work);
        copy_tree(&snapshot, &work);
        let dirs: Vec<PathBuf> = std::fs::read_dir(&work)
            .expect("work folder")
            .flatten()
            .map(|d| d.path())
            .collect();
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        damage(&dirs[0].join("checkpoints"));
        let output = killed
            .command("run")
            .args(args)
            .arg("--summary-json")
            .arg(killed.summary_path())
            .output()
            .expect("run vlmpipe");
        let summary: Value =
            serde_json::from_slice(&std::fs::read(killed.summary_path()).expect("summary"))
                .expect("summary JSON");
        (output, summary)
    };
    let truncate = |checkpoints: &Path| {
        let path = checkpoints.join("step-000050/trainable.safetensors");
        let bytes = std::fs::read(&path).expect("checkpoint weights");
        std::fs::write(&path, &bytes[..bytes.len() / 3]).expect("truncate");
    };
    let (output, damaged) = rerun_with(&truncate, &[]);
    let text = stderr(&output);
    assert!(
        output.status.success(),
        "run with a damaged checkpoint failed:\n{text}"
    );
    let ft = stage(&damaged, "ft");
    assert_eq!(ft["status"], "ran", "{text}");
    let warnings = ft["warnings"].to_string();
    assert!(
        warnings.contains("step-000050") && warnings.contains("trainable.safetensors"),
        "{warnings}"
    );
    assert!(warnings.contains("training started over"), "{warnings}");
    // Said before training and again in the run's table.
    assert!(
        text.contains("no usable checkpoint, training starts over"),
        "{text}"
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("training started over"), "{table}");
    assert!(metadata(&entry)["resumed_from"].is_null());
    assert!(
        adapter_bytes(&entry) == expected,
        "started over to another adapter"
    );

    // `--force` trains from scratch rather than resuming from an intact checkpoint.
    let (output, forced) = rerun_with(&|_: &Path| {}, &["--force", "ft"]);
    let text = stderr(&output);
    assert!(output.status.success(), "forced run failed:\n{text}");
    assert_eq!(stage(&forced, "ft")["reason"], "forced");
    assert!(!text.contains("resuming"), "{text}");
    assert!(metadata(&entry)["resumed_from"].is_null());
    assert!(
        adapter_bytes(&entry) == expected,
        "a forced run ended with another adapter"
    );
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
