//! Issue 13, items 2, 4 and 14 with the real binary on small offline pipelines:
//! - a moved project (or a moved Hub cache) keeps its cached fine-tunes usable: nothing in a
//!   model entry names the folder the project lived in;
//! - `export --merged .` in a project folder refuses instead of emptying it;
//! - PEFT adapters (PEFT's own fixture, a vlmpipe fine-tune's, one from a Hub repo) are applied
//!   with `adapter:` in a pipeline and `--adapter` on `infer`, answering exactly like the merged
//!   model; the adapter vlmpipe writes names its Hub base and the dropout as written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use vlmpipe::train::PeftAdapter;
use vlmpipe::train::merge::{ExportOrigin, MergeOptions, merge_checkpoint};

/// The binary under test; `VLMPIPE_TEST_BIN` runs these scenarios against another build (how
/// they were shown to fail before the fixes).
fn bin() -> PathBuf {
    std::env::var_os("VLMPIPE_TEST_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_vlmpipe")),
        PathBuf::from,
    )
}
const QUESTION: &str = "Which shape is in the picture?";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

fn tiny_nothumb() -> PathBuf {
    fixtures().join("checkpoints/tiny-nothumb")
}

fn peft_adapter() -> PathBuf {
    fixtures().join("lora/adapter_trained")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
        }
    }
}

/// A pipeline whose model `base` is `model`, fine-tuned for 2 steps and evaluated.
fn finetune_pipeline(model: &str) -> String {
    format!(
        r#"
pipeline port {{ seed = 5 }}
labels shapes = ["red circle", "red square", "blue circle", "blue square"]
dataset pictures {{
  source = synthetic(kind: "shapes", n: 16, seed: 1, size: 32, colors: "red,blue", shapes: "circle,square")
  label  = "class"
  labels = shapes
}}
split parts = stratified(pictures, train: 0.5, test: 0.5, seed: 42)
prompt ask {{ user = "Which shape?" }}
model base = {model}
grammar answer = one_of(shapes)
finetune ft {{
  base = base  data = parts.train  prompt = ask  labels = shapes  output = answer
  lora {{ r = 2  alpha = 4  dropout = 0.05  targets = ["q_proj", "v_proj"] }}
  lr = 0.01  batch_size = 4  grad_accum = 1  max_steps = 2
}}
eval after {{ model = ft  data = parts.test  prompt = ask  labels = shapes  output = answer }}
"#
    )
}

/// A project folder: `pipeline.vp`, its default cache `.vlmpipe/` and `evals/` beside it.
struct Project {
    dir: PathBuf,
    env: Vec<(String, PathBuf)>,
}

impl Project {
    fn new(dir: PathBuf, text: &str) -> Self {
        std::fs::create_dir_all(&dir).expect("project dir");
        std::fs::write(dir.join("pipeline.vp"), text).expect("pipeline file");
        Self {
            dir,
            env: Vec::new(),
        }
    }

    fn command(&self, verb: &str) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg(verb)
            .arg(self.dir.join("pipeline.vp"))
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("VLMPIPE_CACHE");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// `vlmpipe run` (plus `extra`): its output and summary.
    fn run(&self, extra: &[&str]) -> (Output, Value) {
        let summary = self.dir.with_extension("summary.json");
        let output = self
            .command("run")
            .args(extra)
            .arg("--quiet")
            .arg("--summary-json")
            .arg(&summary)
            .output()
            .expect("run vlmpipe");
        let json = std::fs::read(&summary)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        (output, json)
    }

    /// Moves the project to `to` (a rename, as `mv` does).
    fn moved(self, to: PathBuf) -> Self {
        std::fs::rename(&self.dir, &to).expect("move project");
        Self { dir: to, ..self }
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn status<'a>(summary: &'a Value, name: &str) -> &'a str {
    summary["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .and_then(|s| s["status"].as_str())
        .unwrap_or_else(|| panic!("no stage `{name}` in {summary}"))
}

fn assert_ok(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        stderr(output)
    );
}

/// Every `model.json` in the project's cache, with its folder.
fn model_files(project: &Path) -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(project.join(".vlmpipe/entries")).expect("entries") {
        let dir = entry.expect("entry").path();
        if let Ok(text) = std::fs::read_to_string(dir.join("model.json")) {
            out.push((dir, serde_json::from_str(&text).expect("model.json")));
        }
    }
    out
}

/// The entry of the fine-tune (the `model.json` with an adapter).
fn finetune_entry(project: &Path) -> PathBuf {
    model_files(project)
        .into_iter()
        .find(|(dir, m)| m["adapter"].is_string() && dir.join("trainable.json").is_file())
        .map(|(dir, _)| dir)
        .expect("a fine-tune entry")
}

/// Moves the project, reruns it (all cached), then forces the eval of the fine-tune to run on
/// the moved entries, and checks that no model entry names the old folder.
fn check_move(project: Project, to: PathBuf) -> Project {
    let old = project.dir.to_string_lossy().into_owned();
    let project = project.moved(to);
    let (output, summary) = project.run(&[]);
    assert_ok(&output, "rerun after the move");
    for stage in ["base", "ft", "after"] {
        assert_eq!(status(&summary, stage), "cached", "{stage}: {summary}");
    }
    let (output, summary) = project.run(&["--force", "after"]);
    assert_ok(&output, "the forced eval after the move");
    assert_eq!(status(&summary, "after"), "ran");
    for (dir, model) in model_files(&project.dir) {
        let text = model.to_string();
        assert!(
            !text.contains(&old),
            "{} names the old folder: {text}",
            dir.display()
        );
    }
    project
}

fn infer(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(bin())
        .arg("infer")
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run vlmpipe infer")
}

/// `infer` on the LoRA fixture's image and question: the JSON report and the last logits.
fn infer_logits(model: &Path, adapter: Option<&Path>, out: &Path) -> (Value, Tensor) {
    let image = fixtures().join("images/lora_a_64x48.png");
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "--model".as_ref(),
        model.as_os_str(),
        "--image".as_ref(),
        image.as_os_str(),
        "--prompt".as_ref(),
        QUESTION.as_ref(),
        "--max-new-tokens".as_ref(),
        "6".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--json".as_ref(),
        "--dump-logits".as_ref(),
        out.as_os_str(),
    ];
    if let Some(adapter) = adapter {
        args.push("--adapter".as_ref());
        args.push(adapter.as_os_str());
    }
    let output = infer(&args);
    assert_ok(&output, "infer");
    let report: Value = serde_json::from_slice(&output.stdout).expect("infer --json");
    let logits = candle_core::safetensors::load(out, &Device::Cpu).expect("logits file")["logits"]
        .to_dtype(DType::F32)
        .expect("f32");
    (report, logits)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("max")
}

/// Same answer, same tokens, logits equal within the merge test's tolerance.
fn assert_same_model(a: &(Value, Tensor), b: &(Value, Tensor), what: &str) {
    assert_eq!(a.0["text"], b.0["text"], "{what}: answers differ");
    assert_eq!(a.0["token_ids"], b.0["token_ids"], "{what}: tokens differ");
    let diff = max_abs(&(&a.1 - &b.1).expect("diff"));
    let tol = 5e-4 + 2e-5 * max_abs(&a.1);
    assert!(diff <= tol, "{what}: logits differ by {diff} > {tol}");
}

fn merge_f32(base: &Path, adapter: &Path, out: &Path) {
    let adapter = PeftAdapter::load(adapter, &Device::Cpu).expect("adapter");
    merge_checkpoint(
        base,
        &adapter,
        out,
        &MergeOptions {
            dtype: DType::F32,
            force: false,
            origin: ExportOrigin {
                pipeline: "test".into(),
                stage: "merge".into(),
            },
        },
    )
    .expect("merge");
}

#[test]
fn a_moved_project_keeps_its_init_finetune_and_its_adapter_works_outside() {
    let root = tempfile::tempdir().expect("temp dir");
    let project = Project::new(
        root.path().join("first"),
        &finetune_pipeline(r#"init(preset: "tiny", seed: 1)"#),
    );
    let (output, _) = project.run(&[]);
    assert_ok(&output, "first run");
    let project = check_move(project, root.path().join("second"));

    // The adapter vlmpipe wrote: the dropout as the pipeline wrote it, no machine path as base.
    let entry = finetune_entry(&project.dir);
    let config_text =
        std::fs::read_to_string(entry.join("adapter/adapter_config.json")).expect("config");
    let config: Value = serde_json::from_str(&config_text).expect("adapter config");
    assert_eq!(config["lora_dropout"].to_string(), "0.05", "{config_text}");
    assert!(config["base_model_name_or_path"].is_null(), "{config_text}");

    // `export --merged .` in the project folder refuses and leaves every file where it was.
    let listing = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = listing(&project.dir);
    let output = Command::new(bin())
        .current_dir(&project.dir)
        .args(["export", "pipeline.vp", "ft", "--merged", "."])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run export");
    assert!(!output.status.success(), "export into `.` succeeded");
    let text = stderr(&output);
    assert!(
        text.contains("is not empty") && text.contains("--force"),
        "{text}"
    );
    assert_eq!(listing(&project.dir), before);
    assert!(project.dir.join("pipeline.vp").is_file());
    // `.` when it is an empty folder is filled in place.
    let here = root.path().join("here");
    std::fs::create_dir_all(&here).expect("empty folder");
    let output = Command::new(bin())
        .current_dir(&here)
        .arg("export")
        .arg(project.dir.join("pipeline.vp"))
        .args(["ft", "--merged", "."])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run export");
    assert_ok(&output, "export into an empty `.`");
    assert!(here.join("model.safetensors").is_file());

    // A fresh folder: the export reports the dtype's rounding and marks the folder as its own.
    let merged = root.path().join("merged");
    let output = project
        .command("export")
        .arg("ft")
        .arg("--merged")
        .arg(&merged)
        .output()
        .expect("run export");
    assert_ok(&output, "export");
    let text = stderr(&output);
    assert!(
        text.contains("saved as f32") && text.contains("rounded away"),
        "{text}"
    );
    assert!(merged.join("vlmpipe-export.json").is_file());
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(merged.join("config.json")).expect("config.json"),
    )
    .expect("config JSON");
    assert_eq!(config["model_type"], "lfm2_vl");

    // The fine-tune's own adapter on its base answers exactly like the merged export.
    let with_adapter = infer_logits(
        &entry.join("base"),
        Some(&entry.join("adapter")),
        &root.path().join("a.safetensors"),
    );
    let exported = infer_logits(&merged, None, &root.path().join("b.safetensors"));
    assert_same_model(&with_adapter, &exported, "vlmpipe adapter vs merged export");
}

#[test]
fn a_moved_project_keeps_its_local_finetune() {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().join("first");
    copy_dir(&tiny_nothumb(), &dir.join("models/base"));
    let project = Project::new(dir, &finetune_pipeline(r#"local("models/base")"#));
    let (output, _) = project.run(&[]);
    assert_ok(&output, "first run");
    let project = check_move(project, root.path().join("second"));
    // What the entry says: the folder relative to the pipeline.
    let local = model_files(&project.dir)
        .into_iter()
        .find(|(_, m)| m["base"]["source"] == "pipeline")
        .map(|(_, m)| m)
        .expect("a local model entry");
    assert_eq!(local["base"]["path"], "models/base");
    let output = project
        .command("export")
        .arg("ft")
        .arg("--merged")
        .arg(root.path().join("merged"))
        .output()
        .expect("run export");
    assert_ok(&output, "export after the move");

    // The adapter vlmpipe saved, applied with `adapter:` in another pipeline, answers exactly
    // like the merged export.
    let entry = finetune_entry(&project.dir);
    copy_dir(
        &entry.join("adapter"),
        &root.path().join("check/adapters/mine"),
    );
    let text = r#"
pipeline again { seed = 5 }
labels shapes = ["red circle", "red square", "blue circle", "blue square"]
dataset pictures {
  source = synthetic(kind: "shapes", n: 12, seed: 3, size: 32, colors: "red,blue", shapes: "circle,square")
  label  = "class"
  labels = shapes
}
prompt ask { user = "Which shape?" }
grammar answer = one_of(shapes)
model adapted = local("../second/models/base", adapter: "adapters/mine")
model merged = local("../merged")
eval with_adapter { model = adapted  data = pictures  prompt = ask  labels = shapes  scoring = labels  output = answer }
eval with_merged { model = merged  data = pictures  prompt = ask  labels = shapes  scoring = labels  output = answer }
"#;
    let check = Project::new(root.path().join("check"), text);
    // Its models lie beside the project, outside its folder: reading them needs consent.
    let beside = root.path().display().to_string();
    let (output, _) = check.run(&["--allow-read", &beside]);
    assert_ok(&output, "the pipeline with vlmpipe's adapter");
    let read = |stage: &str| -> Value {
        serde_json::from_slice(
            &std::fs::read(
                check
                    .dir
                    .join("evals/again")
                    .join(stage)
                    .join("metrics.json"),
            )
            .expect("metrics"),
        )
        .expect("metrics json")
    };
    let (a, b) = (read("with_adapter"), read("with_merged"));
    assert_eq!(a["confusion_matrix"], b["confusion_matrix"]);
    let (la, lb) = (a["log_loss"].as_f64(), b["log_loss"].as_f64());
    assert!(
        la.zip(lb).is_some_and(|(x, y)| (x - y).abs() < 1e-4),
        "log loss {la:?} vs {lb:?}"
    );
}

/// A Hugging Face cache on disk with `repo` at one commit holding the files of `from`.
fn hub_repo(cache: &Path, repo: &str, commit: &str, from: &Path) {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    copy_dir(from, &folder.join("snapshots").join(commit));
    std::fs::create_dir_all(folder.join("refs")).expect("refs");
    std::fs::write(folder.join("refs/main"), commit).expect("ref");
}

#[test]
fn hub_bases_and_adapters_resolve_through_the_hub_cache_wherever_it_is() {
    let root = tempfile::tempdir().expect("temp dir");
    let hub = root.path().join("hub");
    hub_repo(
        &hub,
        "LiquidAI/LFM2-VL-450M",
        "0123456789abcdef0123456789abcdef01234567",
        &tiny_nothumb(),
    );
    hub_repo(
        &hub,
        "someone/shape-adapter",
        "89abcdef0123456789abcdef0123456789abcdef",
        &peft_adapter(),
    );
    let dir = root.path().join("project");
    copy_dir(&peft_adapter(), &dir.join("adapters/peft"));
    copy_dir(&tiny_nothumb(), &dir.join("models/base"));
    let mut text = finetune_pipeline(r#"hf("LiquidAI/LFM2-VL-450M")"#);
    text.push_str(
        r#"
model hub_adapted = hf("LiquidAI/LFM2-VL-450M", adapter: "someone/shape-adapter")
model local_adapted = local("models/base", adapter: "adapters/peft")
eval via_hub { model = hub_adapted  data = parts.test  prompt = ask  labels = shapes  output = answer }
eval via_local { model = local_adapted  data = parts.test  prompt = ask  labels = shapes  output = answer }
"#,
    );
    let mut project = Project::new(dir, &text);
    project.env.push(("HF_HUB_CACHE".into(), hub.clone()));
    let (output, summary) = project.run(&[]);
    assert_ok(&output, "first run");
    assert_eq!(status(&summary, "via_hub"), "ran");

    // PEFT loads the base an adapter names: the Hub id.
    let entry = finetune_entry(&project.dir);
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(entry.join("adapter/adapter_config.json")).expect("config"),
    )
    .expect("adapter config");
    assert_eq!(config["base_model_name_or_path"], "LiquidAI/LFM2-VL-450M");
    // The same PEFT adapter from the Hub and from a folder answers alike.
    let predictions = |stage: &str| {
        std::fs::read(
            project
                .dir
                .join("evals/port")
                .join(stage)
                .join("metrics.json"),
        )
        .expect("metrics")
    };
    let metrics = |stage: &str| -> Value { serde_json::from_slice(&predictions(stage)).unwrap() };
    assert_eq!(
        metrics("via_hub")["accuracy"],
        metrics("via_local")["accuracy"]
    );

    // Move the Hub cache (a new machine, a new HF_HOME): nothing reruns, the eval still loads.
    let moved_hub = root.path().join("hub-elsewhere");
    std::fs::rename(&hub, &moved_hub).expect("move hub cache");
    project.env = vec![("HF_HUB_CACHE".into(), moved_hub)];
    let (output, summary) = project.run(&["--force", "after", "--force", "via_hub"]);
    assert_ok(&output, "run with the moved Hub cache");
    assert_eq!(status(&summary, "ft"), "cached");
    assert_eq!(status(&summary, "after"), "ran");
    assert_eq!(status(&summary, "via_hub"), "ran");
}

#[test]
fn a_peft_adapter_answers_like_its_merged_model_in_a_pipeline_and_in_infer() {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().join("project");
    copy_dir(&tiny_nothumb(), &dir.join("models/base"));
    copy_dir(&peft_adapter(), &dir.join("adapters/peft"));
    merge_f32(
        &dir.join("models/base"),
        &dir.join("adapters/peft"),
        &dir.join("models/merged"),
    );

    // `infer --adapter` = the merged model = PEFT's own logits for this prompt.
    let adapted = infer_logits(
        &dir.join("models/base"),
        Some(&dir.join("adapters/peft")),
        &root.path().join("a.safetensors"),
    );
    let merged = infer_logits(
        &dir.join("models/merged"),
        None,
        &root.path().join("b.safetensors"),
    );
    assert_same_model(&adapted, &merged, "infer --adapter vs merged");
    let refs = candle_core::safetensors::load(
        fixtures().join("lora/lora_reference.safetensors"),
        &Device::Cpu,
    )
    .expect("lora references");
    let peft = refs["logits_last_trained"].flatten_all().expect("flat");
    let diff = max_abs(&(&adapted.1 - &peft).expect("diff"));
    assert!(
        diff <= 5e-4 + 2e-5 * max_abs(&peft),
        "infer --adapter vs PEFT: {diff}"
    );
    let plain = infer_logits(
        &dir.join("models/base"),
        None,
        &root.path().join("c.safetensors"),
    );
    assert!(
        max_abs(&(&plain.1 - &adapted.1).expect("diff")) > 1e-3,
        "the adapter changed nothing"
    );

    // In a pipeline: `local(..., adapter:)` and the merged folder give the same records.
    let text = r#"
pipeline peft { seed = 5 }
labels shapes = ["red circle", "red square", "blue circle", "blue square"]
dataset pictures {
  source = synthetic(kind: "shapes", n: 12, seed: 3, size: 32, colors: "red,blue", shapes: "circle,square")
  label  = "class"
  labels = shapes
}
prompt ask { user = "Which shape is in the picture?" }
grammar answer = one_of(shapes)
model adapted = local("models/base", adapter: "adapters/peft")
model merged = local("models/merged")
eval with_adapter { model = adapted  data = pictures  prompt = ask  labels = shapes  scoring = labels  output = answer }
eval with_merged { model = merged  data = pictures  prompt = ask  labels = shapes  scoring = labels  output = answer }
"#;
    let project = Project::new(dir, text);
    let (output, _) = project.run(&[]);
    assert_ok(&output, "the adapter pipeline");
    let read = |stage: &str| -> Value {
        serde_json::from_slice(
            &std::fs::read(
                project
                    .dir
                    .join("evals/peft")
                    .join(stage)
                    .join("metrics.json"),
            )
            .expect("metrics"),
        )
        .expect("metrics json")
    };
    let (a, b) = (read("with_adapter"), read("with_merged"));
    assert_eq!(a["confusion_matrix"], b["confusion_matrix"]);
    let (la, lb) = (a["log_loss"].as_f64(), b["log_loss"].as_f64());
    assert!(
        la.zip(lb).is_some_and(|(x, y)| (x - y).abs() < 1e-4),
        "log loss {la:?} vs {lb:?}"
    );

    // `export --merged` takes a model with `adapter:` too: the same model as the merge above.
    let exported = root.path().join("exported");
    let output = project
        .command("export")
        .arg("adapted")
        .arg("--merged")
        .arg(&exported)
        .output()
        .expect("run export");
    assert_ok(&output, "export of a model with an adapter");
    let again = infer_logits(&exported, None, &root.path().join("d.safetensors"));
    assert_same_model(&again, &merged, "exported model with adapter vs merged");
}

#[test]
fn adapters_in_the_wrong_place_say_what_to_do() {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().join("project");
    copy_dir(&tiny_nothumb(), &dir.join("models/base"));
    copy_dir(&peft_adapter(), &dir.join("adapters/peft"));
    let check = |model: &str| -> String {
        let project = Project::new(dir.clone(), &finetune_pipeline(model));
        let output = project.command("check").output().expect("run check");
        assert!(!output.status.success(), "`{model}` passed the check");
        stderr(&output)
    };
    let text = check(r#"local("adapters/peft")"#);
    assert!(
        text.contains("is a PEFT adapter, not a model") && text.contains("merge"),
        "{text}"
    );
    let text = check(r#"local("models/base", adapter: "models/base")"#);
    assert!(text.contains("has no `adapter_config.json`"), "{text}");

    // Adapters do not stack: fine-tuning a model with an adapter says to merge it first.
    let project = Project::new(
        dir.clone(),
        &finetune_pipeline(r#"local("models/base", adapter: "adapters/peft")"#),
    );
    let (output, summary) = project.run(&["--only", "ft"]);
    assert!(!output.status.success(), "a stacked fine-tune ran");
    let reason = summary["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "ft"))
        .map(|s| s["reason"].to_string())
        .unwrap_or_default();
    assert!(
        reason.contains("already carries an adapter") && reason.contains("export --merged"),
        "{reason}"
    );

    let image = fixtures().join("images/lora_a_64x48.png");
    let adapter = dir.join("adapters/peft");
    let output = infer(&[
        "--model".as_ref(),
        adapter.as_os_str(),
        "--image".as_ref(),
        image.as_os_str(),
        "--prompt".as_ref(),
        "x".as_ref(),
    ]);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(
        text.contains("--adapter") && text.contains("merge"),
        "{text}"
    );
}

#[test]
fn bench_model_applies_an_adapter_and_refuses_one_for_another_base() {
    let root = tempfile::tempdir().expect("temp dir");
    let report = root.path().join("bench.json");
    let image = fixtures().join("images/lora_a_64x48.png");
    let bench = |model: &Path| {
        Command::new(bin())
            .args(["bench", "model", "--model"])
            .arg(model)
            .arg("--adapter")
            .arg(peft_adapter())
            .arg("--image")
            .arg(&image)
            .args(["--threads", "1", "--repeats", "1", "--device", "cpu"])
            .arg("--json-out")
            .arg(&report)
            .output()
            .expect("run bench model")
    };
    let output = bench(&tiny_nothumb());
    assert_ok(&output, "bench model --adapter");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
    assert_eq!(json["adapter"], peft_adapter().to_string_lossy().as_ref());
    // The adapter's modules do not fit tiny-thumb's shapes.
    let output = bench(&fixtures().join("checkpoints/tiny-thumb"));
    assert!(!output.status.success(), "a mismatched adapter was applied");
    let text = stderr(&output);
    assert!(
        text.contains("fits only the base model it was trained on"),
        "{text}"
    );
}
