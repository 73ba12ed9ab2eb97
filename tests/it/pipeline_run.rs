//! `vlmpipe run`, `watch` and `render` end to end: the real binary on pipelines in temp folders,
//! checked through `--summary-json` and the cache entries it names.
//!
//! One test binary holds every scenario (each test binary is a separate link of the whole
//! crate, which the 2-core CI pays for). The 10,000-image rerun benchmark is `#[ignore]`d:
//! `cargo test --test it pipeline_run -- --ignored --nocapture bench`.

use crate::data_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vlmpipe::stages::data::read_rows;

const BIN: &str = env!("CARGO_BIN_EXE_vlmpipe");

/// A pipeline folder with its own cache and a clean environment.
struct Scenario {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Scenario {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp folder");
        Self {
            dir,
            env: vec![("HF_HUB_OFFLINE".into(), "1".into())],
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("VLMPIPE_CACHE")
            .env("HF_HOME", self.path("hf"))
            .env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs `vlmpipe ARGS --summary-json summary.json` and returns (output, summary).
    fn run(&self, args: &[&str]) -> (Output, Value) {
        let summary = self.path("summary.json");
        let _ = std::fs::remove_file(&summary);
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--summary-json", "summary.json", "--quiet"]);
        let output = self.command(&all).output().expect("spawn vlmpipe");
        let text = std::fs::read_to_string(&summary).unwrap_or_else(|_| {
            panic!(
                "no summary; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (output, serde_json::from_str(&text).expect("summary json"))
    }
}

/// `stage name → status` of a summary.
fn statuses(summary: &Value) -> Vec<(String, String)> {
    summary["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or("").to_owned(),
                s["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn status<'a>(summary: &'a Value, name: &str) -> &'a str {
    stage(summary, name)["status"].as_str().unwrap_or("")
}

fn stage<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["stages"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no stage `{name}` in {summary}"))
}

/// The output file `name` of stage `stage_name`.
fn output(summary: &Value, stage_name: &str, name: &str) -> PathBuf {
    stage(summary, stage_name)["outputs"]
        .as_array()
        .and_then(|o| {
            o.iter()
                .filter_map(Value::as_str)
                .find(|p| p.ends_with(&format!("/{name}")))
        })
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("stage `{stage_name}` has no output `{name}`"))
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A class-per-folder tree of small JPEGs: `n` per class, distinct bytes each.
fn image_folder(root: &Path, classes: &[&str], n: usize) {
    for (c, class) in classes.iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).expect("class folder");
        for i in 0..n {
            let shade = (c * 97 + i * 7) as u8;
            let bytes = data_support::rgb_jpeg(24 + (i % 5) as u32, 20, shade);
            std::fs::write(dir.join(format!("{i:03}.jpg")), bytes).expect("image");
        }
    }
}

const FOLDER_PIPELINE: &str = r#"
pipeline pets { seed = 5 }
param n_rows = 16
labels animals = ["cat", "dog"]
dataset photos {
  source = folder("photos")
  label  = "class"
  labels = animals
}
split parts = stratified(sample(photos, n_rows, seed: 3), train: 0.5, test: 0.5, seed: 42)
"#;

#[test]
fn folder_split_sample_caches_and_reruns_only_what_changed() {
    let s = Scenario::new();
    image_folder(&s.path("photos"), &["cat", "dog"], 12);
    // A truncated JPEG and a non-image: recorded and reported, never a crash.
    std::fs::write(
        s.path("photos/cat/broken.jpg"),
        &data_support::rgb_jpeg(30, 30, 9)[..60],
    )
    .expect("broken image");
    s.write("pets.vp", FOLDER_PIPELINE);

    let (out, first) = s.run(&["run", "pets.vp"]);
    assert!(out.status.success(), "{}", stdout(&out));
    for (name, st) in statuses(&first) {
        assert_eq!(st, "ran", "stage `{name}` on the first run");
    }
    let table = stdout(&out);
    assert!(
        table.contains("warning: 1 image could not be read") && table.contains("`cat/broken.jpg`"),
        "{table}"
    );
    let rows = read_rows(&output(&first, "photos", "rows.parquet")).expect("dataset rows");
    // 24 images, and the broken one as an error row without an image.
    assert_eq!(rows.rows.len(), 25);
    let failed: Vec<&str> = rows
        .rows
        .iter()
        .filter(|r| r.image_error.is_some())
        .map(|r| r.row_id.as_str())
        .collect();
    assert_eq!(failed, ["cat/broken.jpg"]);
    assert_eq!(rows.classes, ["cat", "dog"]);
    let train = read_rows(&output(&first, "parts", "train.parquet")).expect("train rows");
    let test = read_rows(&output(&first, "parts", "test.parquet")).expect("test rows");
    assert_eq!(train.rows.len() + test.rows.len(), 16);
    // Stratified: each class is cut in half (largest remainder), whatever the sample drew.
    for class in ["cat", "dog"] {
        let count = |t: &vlmpipe::stages::data::RowTable| {
            t.rows.iter().filter(|r| r.label == class).count() as i64
        };
        assert!((count(&train) - count(&test)).abs() <= 1, "class {class}");
    }
    let errors = data_support::read_text_table(&output(&first, "photos", "errors.parquet"));
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0][0], "cat/broken.jpg");

    // No change: everything cached, same fingerprints, the warning shown again.
    let (out, second) = s.run(&["run", "pets.vp"]);
    assert!(out.status.success());
    for (name, st) in statuses(&second) {
        assert_eq!(st, "cached", "stage `{name}` on the no-change rerun");
        assert_eq!(
            stage(&second, &name)["fingerprint"],
            stage(&first, &name)["fingerprint"]
        );
    }
    assert!(stdout(&out).contains("warning: 1 image could not be read"));

    // A param change reruns the sample and the split; the dataset stays cached.
    let (_, dry) = s.run(&["run", "pets.vp", "--set", "n_rows=20", "--dry-run"]);
    assert_eq!(status(&dry, "photos"), "cached");
    assert_eq!(status(&dry, "parts"), "would_run");
    let sample_name = "sample(photos,20,3)";
    assert_eq!(status(&dry, sample_name), "would_run");
    assert!(
        stage(&dry, "parts")["reason"]
            .as_str()
            .unwrap_or("")
            .contains("input"),
        "{}",
        stage(&dry, "parts")
    );
    let (_, changed) = s.run(&["run", "pets.vp", "--set", "n_rows=20"]);
    assert_eq!(status(&changed, "photos"), "cached");
    assert_eq!(status(&changed, sample_name), "ran");
    assert_eq!(status(&changed, "parts"), "ran");

    // Editing the pipeline text in a way that changes nothing (comments, spacing) keeps the cache.
    s.write(
        "pets.vp",
        &FOLDER_PIPELINE.replace("label  = \"class\"", "label = \"class\"   // from folders"),
    );
    let (_, reformatted) = s.run(&["run", "pets.vp"]);
    assert!(statuses(&reformatted).iter().all(|(_, st)| st == "cached"));

    // A new image invalidates the dataset and everything downstream of it.
    std::fs::write(
        s.path("photos/dog/new.jpg"),
        data_support::rgb_jpeg(26, 22, 201),
    )
    .expect("new image");
    let (_, edited) = s.run(&["run", "pets.vp", "--dry-run"]);
    assert_eq!(status(&edited, "photos"), "would_run");
    assert_eq!(status(&edited, "animals"), "cached");

    // --only runs a stage and its inputs; --force recomputes a stage even when cached.
    let (_, only) = s.run(&["run", "pets.vp", "--only", "photos"]);
    assert_eq!(status(&only, "photos"), "ran");
    assert_eq!(status(&only, "parts"), "skipped");
    let (_, forced) = s.run(&["run", "pets.vp", "--force", "animals"]);
    assert_eq!(status(&forced, "animals"), "ran");
    assert_eq!(stage(&forced, "animals")["reason"], "forced");

    // An unknown stage name is a usage problem with a suggestion.
    let out = s
        .command(&["run", "pets.vp", "--only", "part"])
        .output()
        .expect("spawn");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did you mean `parts`"), "{err}");
}

#[test]
fn pipeline_errors_are_printed_and_exit_one() {
    let s = Scenario::new();
    s.write(
        "bad.vp",
        "pipeline p { seed = 1 }\nsplit x = stratified(nothing, train: 0.5, test: 0.5)\n",
    );
    let out = s.command(&["run", "bad.vp"]).output().expect("spawn");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.vp:2:"), "{err}");
    assert!(!s.path(".vlmpipe/entries").exists());
}

#[test]
fn real_photos_split_and_sample() {
    let Some(photos) = crate::support::shared_path("data/cats_vs_dogs") else {
        return;
    };
    let s = Scenario::new();
    s.write(
        "real.vp",
        &format!(
            r#"
            pipeline real {{ seed = 23 }}
            labels animals = ["cat", "dog"]
            dataset pets {{ source = folder("{}") label = "class" labels = animals keep = rgb_only }}
            split pets_split = stratified(pets, train: 0.8, test: 0.2, seed: 42)
            split again = random(sample(pets_split.test, 20, seed: 23), train: 0.5, test: 0.5, seed: 1)
            "#,
            photos.display()
        ),
    );
    // The shared photos lie outside the pipeline's folder: reading them needs consent.
    let allow = photos.display().to_string();
    let (out, summary) = s.run(&["run", "real.vp", "--allow-read", &allow]);
    assert!(out.status.success(), "{}", stdout(&out));
    let all = read_rows(&output(&summary, "pets", "rows.parquet")).expect("rows");
    let test = read_rows(&output(&summary, "pets_split", "test.parquet")).expect("test");
    let train = read_rows(&output(&summary, "pets_split", "train.parquet")).expect("train");
    assert_eq!(test.rows.len() + train.rows.len(), all.rows.len());
    let share = test.rows.len() as f64 / all.rows.len() as f64;
    assert!((share - 0.2).abs() < 0.02, "test share {share}");
    let a = read_rows(&output(&summary, "again", "train.parquet")).expect("a");
    assert_eq!(a.rows.len(), 10);
    assert!(a.rows.iter().all(|r| test.rows.contains(r)));
}

/// A dataset in the Hub layout, resolved offline from a fake Hub cache; moving `main` to a new
/// commit reruns the dataset.
#[test]
fn hub_dataset_through_fake_cache_offline() {
    let s = Scenario::new();
    let base = s.path("hf/hub/datasets--acme--pets");
    let put = |commit: &str, n: usize| {
        let rows: Vec<(Option<Vec<u8>>, Option<i64>)> = (0..n)
            .map(|i| {
                (
                    Some(data_support::rgb_jpeg(20, 20, (i * 13) as u8)),
                    Some((i % 2) as i64),
                )
            })
            .collect();
        data_support::write_hub_parquet(
            &base.join(format!(
                "snapshots/{commit}/data/train-00000-of-00001.parquet"
            )),
            &rows,
        );
        std::fs::create_dir_all(base.join("refs")).expect("refs");
        std::fs::write(base.join("refs/main"), commit).expect("ref");
    };
    let first_commit = "1".repeat(40);
    put(&first_commit, 10);
    s.write(
        "hub.vp",
        r#"
        pipeline hub { seed = 1 }
        dataset pets { source = hf("acme/pets", split: "train") label = "labels" -> { 0: "cat", 1: "dog" } }
        split parts = stratified(pets, train: 0.6, test: 0.4)
        "#,
    );
    let (out, first) = s.run(&["run", "hub.vp"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = read_rows(&output(&first, "pets", "rows.parquet")).expect("rows");
    assert_eq!(rows.rows.len(), 10);
    assert_eq!(rows.rows[1].label, "dog");
    assert_eq!(rows.rows[0].row_id, "train-00000-of-00001:0");

    let (_, cached) = s.run(&["run", "hub.vp"]);
    assert_eq!(status(&cached, "pets"), "cached");
    put(&"2".repeat(40), 12);
    let (_, moved) = s.run(&["run", "hub.vp"]);
    assert_eq!(status(&moved, "pets"), "ran");
    let rows = read_rows(&output(&moved, "pets", "rows.parquet")).expect("rows");
    assert_eq!(rows.rows.len(), 12);

    // A repo the offline cache does not have: the stage fails with the Hub's message.
    s.write(
        "missing.vp",
        "pipeline m { seed = 1 }\ndataset d { source = hf(\"acme/none\", split: \"train\") label = \"labels\" }\n",
    );
    let (out, missing) = s.run(&["run", "missing.vp"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(status(&missing, "d"), "failed");
}

const MODEL_PIPELINE: &str = r#"
pipeline shapes { seed = 23 }
labels shapes = ["red circle", "red square", "blue circle", "blue square"]
dataset pictures {
  source = synthetic(kind: "shapes", n: 40, seed: 1, size: 48, colors: "red,blue", shapes: "circle,square")
  label = "class"
  labels = shapes
}
prompt ask {
  system = "You identify {{ what }}."
  user = """
    Which one?
    {% for l in labels %}- {{ l }}
    {% endfor %}Answer with one item.
    """
}
param what = "coloured shapes"
model tiny = init(preset: "tiny", seed: 1)
eval baseline { model = tiny  data = sample(pictures, 4)  prompt = ask  labels = shapes }
"#;

#[test]
fn init_model_is_loadable_and_render_prints_the_exact_prompt() {
    let s = Scenario::new();
    s.write("shapes.vp", MODEL_PIPELINE);
    let (_, summary) = s.run(&["run", "shapes.vp", "--only", "tiny"]);
    assert_eq!(status(&summary, "tiny"), "ran");
    let model_json = output(&summary, "tiny", "model.json");
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(&model_json).expect("model.json"))
            .expect("json");
    assert_eq!(
        file["base"],
        serde_json::json!({"source": "entry", "path": "checkpoint"})
    );
    assert_eq!(file["adapter"], Value::Null);
    let dir = model_json.parent().expect("entry").join("checkpoint");
    let model = vlmpipe::model::checkpoint::load(&dir, &Default::default());
    assert!(model.is_ok(), "{:?}", model.err());

    let out = s
        .command(&[
            "render",
            "shapes.vp",
            "baseline",
            "--row",
            "2",
            "--no-expand",
        ])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(text.starts_with("<|startoftext|><|im_start|>system\nYou identify coloured shapes.<|im_end|>\n<|im_start|>user\n<image>Which one?\n- red circle\n"), "{text}");
    assert!(
        text.ends_with("Answer with one item.<|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );

    let out = s
        .command(&[
            "render",
            "shapes.vp",
            "baseline",
            "--row",
            "2",
            "--set",
            "what=pets",
        ])
        .output()
        .expect("spawn");
    let text = stdout(&out);
    assert!(text.contains("You identify pets."), "{text}");
    assert!(
        text.contains("<|image_start|><image>") && !text.contains("<image>Which"),
        "{text}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("row 2 of `sample(pictures,4,23)`"), "{err}");

    let out = s
        .command(&["render", "shapes.vp", "baseline", "--row", "9"])
        .output()
        .expect("spawn");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("row 9 is out of range"));
}

/// Kills `vlmpipe run` (SIGKILL) in the middle of a large ingest, then proves the next run
/// recomputes the dataset completely and the cache verifies.
#[test]
fn killed_run_leaves_a_consistent_cache() {
    let s = Scenario::new();
    let n = 40_000;
    s.write(
        "big.vp",
        &format!(
            "pipeline big {{ seed = 1 }}\ndataset d {{ source = synthetic(kind: \"shapes\", n: {n}, seed: 2, size: 96) label = \"class\" }}\n"
        ),
    );
    let mut child: Child = s
        .command(&["run", "big.vp", "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // Wait until the stage is writing into its temp folder, then kill it hard.
    let tmp = s.path(".vlmpipe/tmp");
    let started = Instant::now();
    loop {
        let writing = std::fs::read_dir(&tmp)
            .map(|d| {
                d.flatten()
                    .any(|e| e.path().join("images.parquet").exists())
            })
            .unwrap_or(false);
        if writing || started.elapsed() > Duration::from_secs(30) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let finished_early = child.try_wait().expect("wait").is_some();
    child.kill().expect("kill");
    child.wait().expect("reap");
    assert!(
        !finished_early,
        "the ingest finished before it could be killed"
    );
    assert!(
        std::fs::read_dir(s.path(".vlmpipe/entries"))
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "a killed run published an entry"
    );

    let (out, summary) = s.run(&["run", "big.vp"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status(&summary, "d"), "ran");
    let rows = read_rows(&output(&summary, "d", "rows.parquet")).expect("rows");
    assert_eq!(rows.rows.len(), n);
    let images = vlmpipe::stages::data::ImageStore::open(&output(&summary, "d", "images.parquet"))
        .expect("image store");
    assert_eq!(images.len(), n);
    let verify = s
        .command(&["cache", "verify", "--cache-dir", ".vlmpipe"])
        .output()
        .expect("spawn");
    assert!(verify.status.success(), "{}", stdout(&verify));
    let (_, again) = s.run(&["run", "big.vp"]);
    assert_eq!(status(&again, "d"), "cached");
}

/// `vlmpipe watch` reruns after an edit, only the stages the edit invalidates, and survives a
/// syntax error.
#[test]
fn watch_reruns_on_save_and_survives_syntax_errors() {
    let s = Scenario::new();
    image_folder(&s.path("photos"), &["cat", "dog"], 10);
    s.write("pets.vp", FOLDER_PIPELINE);
    let mut child = s
        .command(&["watch", "pets.vp", "--summary-json", "summary.json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let summary_path = s.path("summary.json");
    let wait_for = |what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        let started = Instant::now();
        loop {
            if let Some(v) = std::fs::read_to_string(&summary_path)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                && pred(&v)
            {
                return v;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("the first run", &|v| {
            statuses(v).iter().all(|(_, st)| st == "ran")
        });
        // The watcher registers its folders before waiting; give it a moment after the run.
        std::thread::sleep(Duration::from_millis(300));
        s.write("pets.vp", "pipeline pets { seed = 5 \n dataset }}}\n");
        std::thread::sleep(Duration::from_millis(800));
        s.write(
            "pets.vp",
            &FOLDER_PIPELINE.replace("n_rows = 16", "n_rows = 10"),
        );
        let second = wait_for("the rerun", &|v| {
            v["stages"]
                .as_array()
                .is_some_and(|a| a.iter().any(|s| s["name"] == "sample(photos,10,3)"))
        });
        assert_eq!(status(&second, "photos"), "cached");
        assert_eq!(status(&second, "sample(photos,10,3)"), "ran");
        assert_eq!(status(&second, "parts"), "ran");
        // A new image in the data folder is a change too: the dataset reruns.
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(
            s.path("photos/dog/extra.jpg"),
            data_support::rgb_jpeg(30, 20, 77),
        )
        .expect("new image");
        let third = wait_for("the rerun after a data change", &|v| {
            status(v, "photos") == "ran"
        });
        assert_eq!(status(&third, "animals"), "cached");
    }));
    child.kill().expect("kill watcher");
    let out = child.wait_with_output().expect("reap");
    let err = String::from_utf8_lossy(&out.stderr);
    if let Err(panic) = result {
        eprintln!("watcher stderr:\n{err}");
        std::panic::resume_unwind(panic);
    }
    assert!(
        err.contains("pets.vp:2:"),
        "the syntax error was not shown:\n{err}"
    );
    assert!(err.contains("changed, rerunning"), "{err}");
}

const WATCH_PIPELINE: &str = r#"
pipeline shapes { seed = 23 }
param what = "coloured shapes"
labels shapes = ["red circle", "blue circle"]
dataset pictures {
  source = synthetic(kind: "shapes", n: 40, seed: 1, size: 48, colors: "red,blue", shapes: "circle")
  label = "class"
  labels = shapes
}
prompt ask { user = "Which {{ what }}? {% for l in labels %}{{ l }}, {% endfor %}" }
model tiny = init(preset: "tiny", seed: 1)
eval first { model = tiny  data = sample(pictures, 24)  prompt = ask  labels = shapes  max_new_tokens = 32  batch_size = 4 }
eval second { model = tiny  data = sample(pictures, 12)  prompt = ask  labels = shapes  max_new_tokens = 7  batch_size = 2 }
"#;

/// Issue 13, item 20: a burst of saves is one rerun (or two, when one save lands during the
/// rerun), and a save during a run cancels the stages it has not started.
#[test]
fn watch_debounces_bursts_and_cancels_moot_runs() {
    let s = Scenario::new();
    s.write("shapes.vp", WATCH_PIPELINE);
    let log_path = s.path("watch.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = s
        .command(&["watch", "shapes.vp", "--summary-json", "summary.json"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let reruns = || log_text().matches("changed, rerunning").count();
    let summary = || {
        std::fs::read_to_string(s.path("summary.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    };
    // Waits until the watcher has been idle (its log unchanged and ending in "watching") for 1 s.
    let wait_idle = |what: &str| {
        let started = Instant::now();
        let mut last = (String::new(), Instant::now());
        loop {
            let text = log_text();
            if text != last.0 {
                last = (text, Instant::now());
            } else if last.0.trim_end().ends_with("(Ctrl-C to stop)")
                && last.1.elapsed() > Duration::from_secs(1)
            {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}:\n{}",
                last.0
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let edit = |what: &str| {
        // Written beside and renamed over the pipeline, as editors save.
        let tmp = s.path(".shapes.vp.tmp");
        std::fs::write(&tmp, WATCH_PIPELINE.replace("coloured shapes", what)).expect("write");
        std::fs::rename(&tmp, s.path("shapes.vp")).expect("rename");
    };
    // Saves `what` once the run that is `runs` reruns in has started `first` (about a second),
    // then checks that the run stopped before `second` and that the next run completed.
    let save_during_first = |runs: usize, what: &str| {
        let started = Instant::now();
        while !log_text()
            .split("changed, rerunning")
            .nth(runs)
            .is_some_and(|run| run.contains("running `first`"))
        {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "`first` did not run:\n{}",
                log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        edit(what);
        let cancelled = loop {
            // The cancelled run's summary stays until the next run ends (debounce + a run).
            let found = summary().is_some_and(|v| {
                v["stages"].as_array().is_some_and(|a| {
                    a.iter().any(|st| {
                        st["name"] == "second"
                            && st["reason"]
                                .as_str()
                                .is_some_and(|r| r.starts_with("cancelled"))
                    })
                })
            });
            if found || started.elapsed() > Duration::from_secs(60) {
                break found;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        wait_idle("the run after the cancelled one");
        assert!(cancelled, "`second` was not cancelled:\n{}", log_text());
        assert_eq!(reruns(), runs + 1, "{}", log_text());
        let last = summary().expect("summary");
        for (name, st) in statuses(&last) {
            assert!(st == "ran" || st == "cached", "stage `{name}`: {st}");
        }
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // A save during the very first run is seen (the file is watched from the start) and
        // cancels what that run has not started.
        save_during_first(0, "early shapes");

        // 20 saves in 2 s, each a real change: at most two reruns (the burst, and one more if
        // a save landed just as the rerun began).
        let before = reruns();
        let started = Instant::now();
        for i in 0..20 {
            edit(&format!("shapes {i}"));
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("20 saves took {:.2} s", started.elapsed().as_secs_f64());
        wait_idle("the reruns after the burst");
        let burst = reruns() - before;
        assert!(
            (1..=2).contains(&burst),
            "{burst} reruns for one burst:\n{}",
            log_text()
        );

        // A save during a rerun: the rerun stops before its next stage.
        let runs = reruns();
        edit("circles");
        save_during_first(runs + 1, "round things");
        assert!(log_text().contains("a newer change arrived during the run"));
    }));
    child.kill().expect("kill watcher");
    let _ = child.wait();
    if let Err(panic) = result {
        eprintln!("watcher log:\n{}", log_text());
        std::panic::resume_unwind(panic);
    }
    // The watcher computed the last save: a fresh run finds everything cached.
    let (_, after) = s.run(&["run", "shapes.vp"]);
    for (name, st) in statuses(&after) {
        assert_eq!(st, "cached", "stage `{name}` after the watcher stopped");
    }
}

/// The no-change rerun over 10,000 images (and 1,000, to show it does not grow with the data),
/// measured through the real binary. Run with `--ignored --nocapture`.
#[test]
#[ignore = "benchmark: prints timings"]
fn bench_no_change_rerun() {
    for n in [1_000usize, 10_000] {
        let s = Scenario::new();
        let per_class = n / 2;
        for class in ["a", "b"] {
            let dir = s.path(&format!("photos/{class}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            for i in 0..per_class {
                let shade = (i % 251) as u8;
                let img =
                    image::RgbImage::from_pixel(16, 16, image::Rgb([shade, (i / 251) as u8, 7]));
                img.save(dir.join(format!("{i:05}.png"))).expect("png");
            }
        }
        s.write(
            "bench.vp",
            r#"
            pipeline bench { seed = 1 }
            dataset photos { source = folder("photos") label = "class" }
            split parts = stratified(photos, train: 0.9, test: 0.1, seed: 42)
            "#,
        );
        let started = Instant::now();
        let (out, first) = s.run(&["run", "bench.vp"]);
        let cold = started.elapsed().as_secs_f64();
        assert!(out.status.success());
        assert_eq!(status(&first, "photos"), "ran");
        let mut times = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            let (_, again) = s.run(&["run", "bench.vp"]);
            times.push(started.elapsed().as_secs_f64());
            assert!(statuses(&again).iter().all(|(_, st)| st == "cached"));
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{n} images: first run {cold:.2}s ({:.0} images/s), no-change rerun median {:.3}s (min {:.3}s, max {:.3}s)",
            n as f64 / cold,
            times[2],
            times[0],
            times[4]
        );
    }
}

/// Issue 13, item 18: every file in `examples/` runs offline as shipped, or says in its first
/// line (`// Needs: …`) what it needs. Each `.vp` runs in a temporary copy of the folder with
/// `HF_HUB_OFFLINE=1`; one that declares needs gets them from [`provide_example_needs`] (or is
/// skipped, saying why, when nothing here can provide them). Other files (the Rust benchmarks,
/// which need a real model config) must declare their needs.
#[test]
fn examples_run_offline_or_say_what_they_need() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut ran = 0;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&source)
        .expect("examples folder")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("file name");
        let text = std::fs::read_to_string(&path).expect("example");
        let first = text.lines().next().unwrap_or("");
        let needs = first
            .strip_prefix("// Needs: ")
            .or_else(|| first.strip_prefix("//! Needs: "));
        if !name.ends_with(".vp") {
            assert!(
                needs.is_some(),
                "`examples/{name}` does not say what it needs: {first}"
            );
            continue;
        }
        let s = Scenario::new();
        copy_tree(&source, s.dir.path());
        if let Some(needs) = needs
            && !provide_example_needs(name, &s)
        {
            eprintln!("skipping examples/{name}: it needs {needs}");
            continue;
        }
        let started = Instant::now();
        let mut args = vec!["run", name];
        args.extend(
            EXAMPLE_SHRINK
                .iter()
                .filter(|(n, _)| *n == name)
                .flat_map(|(_, a)| *a),
        );
        let (out, summary) = s.run(&args);
        eprintln!(
            "examples/{name} ran in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        assert!(
            out.status.success(),
            "examples/{name} failed:\n{}{}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        for (stage, st) in statuses(&summary) {
            assert_eq!(st, "ran", "examples/{name}: stage `{stage}`");
        }
        ran += 1;
    }
    assert!(ran >= 3, "only {ran} example pipelines ran");
}

/// `--set` overrides that keep this test quick; `tests/it/quickstart.rs` runs the quickstart
/// unchanged (and checks its numbers), so here it only has to run end to end offline.
const EXAMPLE_SHRINK: &[(&str, &[&str])] = &[(
    "quickstart.vp",
    &[
        "--set",
        "n_images=40",
        "--set",
        "n_eval=4",
        "--set",
        "max_steps=2",
    ],
)];

/// Provides what an example's `// Needs:` line asks for in the scenario folder; `false` when
/// this test does not know how.
fn provide_example_needs(name: &str, s: &Scenario) -> bool {
    match name {
        // A photo folder of 50 per class (its test split must hold the 20 it samples), and
        // `LiquidAI/LFM2-VL-450M` in the offline Hugging Face cache: a tiny random checkpoint.
        "folder_demo.vp" => {
            image_folder(&s.path("photos"), &["cat", "dog"], 50);
            data_support::put_hub_snapshot(
                &s.path("hf/hub"),
                "models--LiquidAI--LFM2-VL-450M",
                &data_support::tiny_checkpoint_files(),
            );
            true
        }
        _ => false,
    }
}

/// Copies the files of `from` (recursively) into `to`, leaving out what runs leave there (the
/// cache, `evals/`, hidden files).
fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read folder").flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') || name == "evals" {
            continue;
        }
        let target = to.join(&name);
        if entry.path().is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// `render` with the real LFM2-VL-450M chat template, tokenizer and processor on a real photo.
/// The shared checkpoint has no weights; the model stage only checks that a weights file exists
/// and `render` never loads weights, so an empty stand-in file is enough.
#[test]
fn render_with_the_real_lfm2_vl_processor() {
    let (Some(photos), Some(model)) = (
        crate::support::shared_path("data/cats_vs_dogs"),
        crate::support::shared_path("models/LFM2-VL-450M"),
    ) else {
        return;
    };
    let s = Scenario::new();
    let local = s.path("lfm2-vl");
    std::fs::create_dir_all(&local).expect("model folder");
    for entry in std::fs::read_dir(&model).expect("shared model").flatten() {
        std::os::unix::fs::symlink(entry.path(), local.join(entry.file_name())).expect("link");
    }
    std::fs::write(local.join("model.safetensors"), b"").expect("stand-in weights");
    s.write(
        "vet.vp",
        &format!(
            r#"
            pipeline vet {{ seed = 23 }}
            labels animals = ["cat", "dog"]
            dataset pets {{ source = folder("{}") label = "class" labels = animals }}
            prompt vet {{
              system = "You are a veterinarian."
              user = """
                What animal is in the picture?
                {{% for l in labels %}}- {{{{ l }}}}
                {{% endfor %}}Answer with one word.
                """
            }}
            model small = local("lfm2-vl")
            eval baseline {{ model = small  data = sample(pets, 4)  prompt = vet  labels = animals }}
            "#,
            photos.display()
        ),
    );
    let out = s
        .command(&[
            "render",
            "vet.vp",
            "baseline",
            "--row",
            "0",
            // The photos and the linked model files lie in ../shared, outside the pipeline's folder.
            "--allow-read",
            &photos.display().to_string(),
            "--allow-read",
            &model.display().to_string(),
        ])
        .output()
        .expect("spawn");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let text = stdout(&out);
    assert!(
        text.starts_with("<|startoftext|><|im_start|>system\nYou are a veterinarian.<|im_end|>\n<|im_start|>user\n<|image_start|>"),
        "{}",
        &text[..text.len().min(300)]
    );
    assert!(text.contains("<|image_end|>What animal is in the picture?\n- cat\n- dog\nAnswer with one word.<|im_end|>\n<|im_start|>assistant\n"));
    let tokens: usize = err
        .rsplit(", ")
        .next()
        .and_then(|t| t.trim().strip_suffix(" tokens"))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no token count in {err}"));
    // Every `<image>` is one token; the text around them adds a few dozen more.
    let image_tokens = text.matches("<image>").count();
    assert!(image_tokens >= 64, "{image_tokens} image tokens");
    assert!(
        tokens > image_tokens + 20 && tokens < image_tokens + 120,
        "{tokens} tokens"
    );
}
