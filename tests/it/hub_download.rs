//! Downloads from the Hub, against a fake Hub on the loopback interface (`hub_support`): models
//! and dataset splits land in an empty Hub cache in Python's layout, interrupted downloads
//! resume, errors name their cause, and everything downloaded is then found offline, by the
//! library and by `vlmpipe run` with the server gone.

use crate::data_support;
use crate::hub_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use hub_support::{FakeHub, FakeRepo};
use serde_json::Value;
use vlmpipe::hub::{Hub, HubConfig, HubError, HubRepo};

const BIN: &str = env!("CARGO_BIN_EXE_vlmpipe");
const MODEL_COMMIT: &str = "1111111111111111111111111111111111111111";
const DATA_COMMIT: &str = "2222222222222222222222222222222222222222";

fn hub(cache: &Path, endpoint: Option<String>, offline: bool) -> Hub {
    Hub::new(HubConfig {
        cache_dir: cache.to_path_buf(),
        offline,
        endpoint,
        token: None,
        progress: false,
    })
}

/// The reference checkpoint's files (Hub layout, one `model.safetensors`).
fn checkpoint_files() -> BTreeMap<String, Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference/checkpoints/tiny-thumb");
    std::fs::read_dir(&dir)
        .expect("tiny-thumb fixture")
        .filter_map(Result::ok)
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).expect("fixture file"))
        })
        .collect()
}

/// Two Parquet shards of a `train` split in the Hub's layout (`image` struct, int `labels`)
/// and a test split, plus a dataset card.
fn dataset_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for (name, first_shade) in [
        ("data/train-00000-of-00002.parquet", 0u8),
        ("data/train-00001-of-00002.parquet", 100),
        ("data/test-00000-of-00001.parquet", 200),
    ] {
        let rows: Vec<(Option<Vec<u8>>, Option<i64>)> = (0..4u8)
            .map(|i| {
                let shade = first_shade + 10 * i;
                (
                    Some(data_support::rgb_jpeg(24, 16, shade)),
                    Some(i64::from(i % 2)),
                )
            })
            .collect();
        let path = dir.join(name.replace('/', "_"));
        data_support::write_hub_parquet(&path, &rows);
        files.insert(name.to_owned(), std::fs::read(&path).expect("shard"));
    }
    files.insert("README.md".to_owned(), b"# a dataset card".to_vec());
    files
}

fn downloads_of(requests: &[String], file: &str) -> usize {
    requests
        .iter()
        .filter(|r| {
            let path = r.split(' ').nth(1).unwrap_or_default();
            path.contains("/resolve/") && path.ends_with(&format!("/{file}"))
        })
        .count()
}

#[test]
fn a_model_downloads_into_an_empty_cache_and_is_then_found_offline() {
    let files = checkpoint_files();
    let server = FakeHub::start(vec![FakeRepo::model(
        "LiquidAI/LFM2-VL-450M",
        MODEL_COMMIT,
        files.clone(),
    )]);
    let cache = tempfile::tempdir().expect("temp cache");
    let repo = HubRepo::model("LiquidAI/LFM2-VL-450M");

    let dir = hub(cache.path(), Some(server.endpoint()), false)
        .model_dir(&repo)
        .expect("download");

    // Python's layout: the snapshot of the commit the Hub named, `refs/main` pointing at it.
    let base = cache.path().join("models--LiquidAI--LFM2-VL-450M");
    assert_eq!(dir, base.join("snapshots").join(MODEL_COMMIT));
    assert_eq!(
        std::fs::read_to_string(base.join("refs/main")).expect("refs/main"),
        MODEL_COMMIT
    );
    assert!(
        !base.join("refs").join(MODEL_COMMIT).exists(),
        "no ref named after a commit"
    );
    for (name, bytes) in &files {
        assert_eq!(
            &std::fs::read(dir.join(name)).expect("downloaded file"),
            bytes,
            "`{name}`"
        );
    }
    vlmpipe::model::checkpoint::Checkpoint::open(&dir).expect("the download loads");

    // One listing, then each listed file once; nothing the repo does not list is asked for.
    let requests = server.requests();
    assert_eq!(requests.iter().filter(|r| r.contains("/api/")).count(), 1);
    for name in files.keys() {
        assert_eq!(
            downloads_of(&requests, name),
            2,
            "metadata + body of `{name}`"
        );
    }
    assert_eq!(downloads_of(&requests, "model.safetensors.index.json"), 0);

    // Cache first: online or offline, the next lookup asks the Hub nothing.
    let before = server.requests().len();
    for offline in [false, true] {
        let again = hub(cache.path(), Some(server.endpoint()), offline)
            .model_dir(&repo)
            .expect("cached");
        assert_eq!(again, dir);
    }
    assert_eq!(server.requests().len(), before);
}

#[test]
fn a_sharded_model_downloads_every_shard_of_one_commit() {
    let mut files = checkpoint_files();
    files.remove("model.safetensors");
    let shards = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let index = serde_json::json!({
        "metadata": { "total_size": 8 },
        "weight_map": { "a.weight": shards[0], "b.weight": shards[1], "c.weight": shards[0] },
    });
    files.insert(
        "model.safetensors.index.json".to_owned(),
        index.to_string().into_bytes(),
    );
    for (i, shard) in shards.iter().enumerate() {
        files.insert((*shard).to_owned(), vec![i as u8; 4]);
    }
    let server = FakeHub::start(vec![FakeRepo::model("org/sharded", MODEL_COMMIT, files)]);
    let cache = tempfile::tempdir().expect("temp cache");

    let dir = hub(cache.path(), Some(server.endpoint()), false)
        .model_dir(&HubRepo::model("org/sharded"))
        .expect("download");
    for (i, shard) in shards.iter().enumerate() {
        assert_eq!(
            std::fs::read(dir.join(shard)).expect("shard"),
            vec![i as u8; 4]
        );
    }
    let requests = server.requests();
    assert_eq!(downloads_of(&requests, "model.safetensors"), 0);
    // Every file by the listed commit, not by a branch that could move in between.
    assert!(
        requests
            .iter()
            .filter(|r| r.contains("/resolve/"))
            .all(|r| r.contains(&format!("/resolve/{MODEL_COMMIT}/"))),
        "{requests:#?}"
    );
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let files = checkpoint_files();
    let weights = files["model.safetensors"].clone();
    let cut = weights.len() / 3;
    let server = FakeHub::start(vec![FakeRepo::model("org/flaky", MODEL_COMMIT, files)]);
    server.break_next_download("model.safetensors", cut);
    let cache = tempfile::tempdir().expect("temp cache");

    let dir = hub(cache.path(), Some(server.endpoint()), false)
        .model_dir(&HubRepo::model("org/flaky"))
        .expect("download resumed");

    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).expect("weights"),
        weights
    );
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.ends_with(&format!("/model.safetensors bytes={cut}-"))),
        "the retry asks for the rest only: {requests:#?}"
    );
}

#[test]
fn a_dataset_split_downloads_and_is_then_found_offline() {
    let work = tempfile::tempdir().expect("temp folder");
    let files = dataset_files(work.path());
    let server = FakeHub::start(vec![FakeRepo::dataset(
        "microsoft/cats_vs_dogs",
        DATA_COMMIT,
        files.clone(),
    )]);
    let cache = work.path().join("hub");
    let repo = HubRepo::dataset("microsoft/cats_vs_dogs");

    let online = hub(&cache, Some(server.endpoint()), false)
        .dataset_split_files(&repo, None, "train")
        .expect("download");
    assert_eq!(online.commit, DATA_COMMIT);
    assert_eq!(
        online.repo_paths,
        [
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet"
        ]
    );
    for (path, repo_path) in online.files.iter().zip(&online.repo_paths) {
        assert_eq!(&std::fs::read(path).expect("shard"), &files[repo_path]);
    }
    let requests = server.requests();
    assert_eq!(downloads_of(&requests, "test-00000-of-00001.parquet"), 0);
    assert_eq!(downloads_of(&requests, "README.md"), 0);

    // The network unplugged: the same split, the same commit, from the cache.
    drop(server);
    let offline = hub(&cache, None, true)
        .dataset_split_files(&repo, None, "train")
        .expect("offline after a download");
    assert_eq!(offline.commit, online.commit);
    assert_eq!(offline.files, online.files);
}

#[test]
fn errors_name_their_cause() {
    let mut no_tokenizer = checkpoint_files();
    no_tokenizer.remove("tokenizer.json");
    let mut no_weights = checkpoint_files();
    no_weights.remove("model.safetensors");
    let server = FakeHub::start(vec![
        FakeRepo::model("org/no-tokenizer", MODEL_COMMIT, no_tokenizer),
        FakeRepo::model("org/no-weights", MODEL_COMMIT, no_weights),
    ]);
    let cache = tempfile::tempdir().expect("temp cache");
    let online = hub(cache.path(), Some(server.endpoint()), false);

    let err = online
        .model_dir(&HubRepo::model("org/no-tokenizer"))
        .expect_err("no tokenizer");
    assert!(
        matches!(&err, HubError::MissingModelFile { file, .. } if file == "tokenizer.json"),
        "{err}"
    );
    let err = online
        .model_dir(&HubRepo::model("org/no-weights"))
        .expect_err("no weights");
    assert_eq!(
        err.to_string(),
        "model repo `org/no-weights` has no `model.safetensors`"
    );

    let err = online
        .model_dir(&HubRepo::model("org/typo").at("v2"))
        .expect_err("unknown repo");
    assert_eq!(
        err.to_string(),
        "model repo `org/typo` (revision `v2`) was not found on the Hub; check the id and the revision, and set `HF_TOKEN` for a private or gated repo"
    );

    // Nobody listening: a network failure, not a missing file.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let err = hub(
        cache.path(),
        Some(format!("http://127.0.0.1:{closed_port}")),
        false,
    )
    .model_dir(&HubRepo::model("org/elsewhere"))
    .expect_err("no server");
    assert!(matches!(err, HubError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("HF_HUB_OFFLINE=1"), "{err}");
    assert!(err.to_string().contains("org/elsewhere"), "{err}");
}

fn run_pipeline(dir: &Path, cache_dir: &str, env: &[(&str, String)]) -> Value {
    let summary_path = dir.join(format!("{cache_dir}.json"));
    let mut command = Command::new(BIN);
    command
        .arg("run")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pipelines/cats_vs_dogs.vp"))
        .args(["--only", "base_450m", "--set", "n_eval=3"])
        .args(["--set", "max_new_tokens=4", "--quiet"])
        .arg("--cache-dir")
        .arg(dir.join(cache_dir))
        .arg("--evals-dir")
        .arg(dir.join("evals"))
        .arg("--summary-json")
        .arg(&summary_path)
        .current_dir(dir)
        .env_remove("VLMPIPE_CACHE")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_HOME", dir.join("hf"))
        .env("NO_COLOR", "1");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("spawn vlmpipe");
    assert!(
        output.status.success(),
        "vlmpipe run failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&std::fs::read(&summary_path).expect("summary")).expect("json")
}

fn statuses(summary: &Value) -> BTreeMap<String, String> {
    summary["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_owned(),
                s["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// `cats_vs_dogs.vp` unchanged, first with an empty Hub cache and the fake Hub as `HF_ENDPOINT`,
/// then with the server gone and `HF_HUB_OFFLINE=1` against a fresh vlmpipe cache: the model and
/// the dataset come from the Hub cache the first run filled.
#[test]
fn a_pipeline_downloads_once_then_runs_with_the_network_unplugged() {
    let dir = tempfile::tempdir().expect("temp folder");
    let server = FakeHub::start(vec![
        FakeRepo::model("LiquidAI/LFM2-VL-450M", MODEL_COMMIT, checkpoint_files()),
        FakeRepo::dataset(
            "microsoft/cats_vs_dogs",
            DATA_COMMIT,
            dataset_files(dir.path()),
        ),
    ]);

    let first = run_pipeline(dir.path(), "online", &[("HF_ENDPOINT", server.endpoint())]);
    let ran = statuses(&first);
    for stage in ["pets", "lfm2_vl_450m", "base_450m"] {
        assert_eq!(ran[stage], "ran", "{ran:?}");
    }
    assert!(
        !ran.contains_key("lfm2_vl_1_6b") || ran["lfm2_vl_1_6b"] == "skipped",
        "--only fetches nothing it does not need: {ran:?}"
    );
    assert!(
        server
            .requests()
            .iter()
            .all(|r| !r.contains("LFM2-VL-1.6B")),
        "the 1.6B model is not part of `base_450m`"
    );
    drop(server);

    let second = run_pipeline(dir.path(), "offline", &[("HF_HUB_OFFLINE", "1".to_owned())]);
    let ran = statuses(&second);
    for stage in ["pets", "lfm2_vl_450m", "base_450m"] {
        assert_eq!(ran[stage], "ran", "{ran:?}");
    }
    // The same inputs, so the same fingerprints as the online run.
    let fingerprints = |summary: &Value| -> BTreeMap<String, String> {
        summary["stages"]
            .as_array()
            .expect("stages")
            .iter()
            .filter(|s| s["status"] == "ran")
            .map(|s| {
                (
                    s["name"].as_str().unwrap_or_default().to_owned(),
                    s["fingerprint"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(fingerprints(&first), fingerprints(&second));
}
