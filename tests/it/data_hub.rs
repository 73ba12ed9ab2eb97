//! Hub resolution against a fake Hub cache in a temp folder (Python's layout: refs, snapshots
//! of symlinks into blobs), offline: dataset split files, model folders, clear errors.

use crate::data_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use data_support::{rgb_jpeg, write_hub_parquet};
use vlmpipe::hub::{Hub, HubConfig, HubError, HubRepo};
use vlmpipe::stages::data::{DatasetSpec, LabelSpec, ROWS_FILE, SourceSpec, ingest, read_rows};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn offline_hub(cache: &Path) -> Hub {
    Hub::new(HubConfig {
        cache_dir: cache.to_path_buf(),
        offline: true,
        endpoint: None,
        token: None,
        progress: false,
    })
}

/// Puts `content` at `rel` in the snapshot of `repo_folder`, as a symlink into `blobs/` like
/// `huggingface_hub` does.
fn put(cache: &Path, repo_folder: &str, rel: &str, write: impl FnOnce(&Path)) -> PathBuf {
    let base = cache.join(repo_folder);
    let blob = base
        .join("blobs")
        .join(format!("blob-{}", rel.replace('/', "_")));
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    write(&blob);
    let link = base.join("snapshots").join(COMMIT).join(rel);
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&blob, &link).unwrap();
    std::fs::create_dir_all(base.join("refs")).unwrap();
    std::fs::write(base.join("refs/main"), COMMIT).unwrap();
    link
}

#[test]
fn dataset_split_files_from_the_cache_offline() {
    let dir = tempfile::tempdir().unwrap();
    let folder = "datasets--microsoft--cats_vs_dogs";
    for (rel, label) in [
        ("data/train-00001-of-00002.parquet", 1),
        ("data/train-00000-of-00002.parquet", 0),
        ("data/test-00000-of-00001.parquet", 0),
    ] {
        put(dir.path(), folder, rel, |p| {
            write_hub_parquet(p, &[(Some(rgb_jpeg(8, 8, label as u8)), Some(label))])
        });
    }
    put(dir.path(), folder, "README.md", |p| {
        std::fs::write(p, "# card").unwrap()
    });
    let hub = offline_hub(dir.path());
    let repo = HubRepo::dataset("microsoft/cats_vs_dogs");
    let files = hub.dataset_split_files(&repo, None, "train").unwrap();
    assert_eq!(files.commit, COMMIT);
    assert_eq!(
        files.repo_paths,
        [
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet"
        ]
    );
    // The same revision pinned by commit resolves to the same snapshot.
    let pinned = hub
        .dataset_split_files(&repo.clone().at(COMMIT), None, "train")
        .unwrap();
    assert_eq!(pinned.files, files.files);

    let mut spec = DatasetSpec::new(SourceSpec::Parquet { files: files.files });
    spec.label = LabelSpec::Mapped {
        column: "labels".to_owned(),
        mapping: BTreeMap::from([(0, "cat".to_owned()), (1, "dog".to_owned())]),
    };
    let out = tempfile::tempdir().unwrap();
    ingest(&spec, out.path(), &indicatif::ProgressBar::hidden()).unwrap();
    let rows = read_rows(&out.path().join(ROWS_FILE)).unwrap();
    let got: Vec<(&str, &str)> = rows
        .rows
        .iter()
        .map(|r| (r.row_id.as_str(), r.label.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("train-00000-of-00002:0", "cat"),
            ("train-00001-of-00002:0", "dog")
        ]
    );

    match hub.dataset_split_files(&repo, None, "validation") {
        Err(e @ HubError::NoSplitFiles { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("split `validation`")
                    && msg.contains("data/test-00000-of-00001.parquet"),
                "{msg}"
            );
        }
        other => panic!("expected NoSplitFiles, got {other:?}"),
    }
}

#[test]
fn offline_and_missing_names_the_repo_and_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let hub = offline_hub(dir.path());
    let err = hub
        .dataset_split_files(
            &HubRepo::dataset("Bingsu/Human_Action_Recognition"),
            None,
            "train",
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, HubError::OfflineMissing { .. }));
    assert!(
        msg.contains("`Bingsu/Human_Action_Recognition`") && msg.contains("HF_HUB_OFFLINE"),
        "{msg}"
    );
    let err = hub
        .file(
            &HubRepo::model("LiquidAI/LFM2-VL-450M").at("v2"),
            "config.json",
        )
        .unwrap_err();
    assert!(err.to_string().contains("revision `v2`"), "{err}");
}

#[test]
fn model_dir_needs_config_tokenizer_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let folder = "models--LiquidAI--LFM2-VL-450M";
    for name in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        put(dir.path(), folder, name, |p| {
            std::fs::write(p, "{}").unwrap()
        });
    }
    let hub = offline_hub(dir.path());
    let repo = HubRepo::model("LiquidAI/LFM2-VL-450M");
    let err = hub.model_dir(&repo).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    put(dir.path(), folder, "model.safetensors.index.json", |p| {
        std::fs::write(p, r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#).unwrap()
    });
    put(
        dir.path(),
        folder,
        "model-00001-of-00002.safetensors",
        |p| std::fs::write(p, "x").unwrap(),
    );
    let err = hub.model_dir(&repo).unwrap_err();
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
    put(
        dir.path(),
        folder,
        "model-00002-of-00002.safetensors",
        |p| std::fs::write(p, "y").unwrap(),
    );
    let snapshot = hub.model_dir(&repo).unwrap();
    assert_eq!(
        snapshot,
        dir.path().join(folder).join("snapshots").join(COMMIT)
    );
    assert!(snapshot.join("config.json").is_file());
}

#[test]
fn falls_back_to_the_parquet_conversion_branch() {
    let dir = tempfile::tempdir().unwrap();
    let folder = "datasets--someone--jpeg_only";
    // `main` holds loose JPEGs and no Parquet.
    put(dir.path(), folder, "train/cat/1.jpg", |p| {
        std::fs::write(p, rgb_jpeg(8, 8, 1)).unwrap()
    });
    // The Hub's conversion branch, cached as Python caches it: refs/refs/convert/parquet.
    let converted = "fedcba9876543210fedcba9876543210fedcba98";
    let base = dir.path().join(folder);
    std::fs::create_dir_all(base.join("refs/refs/convert")).unwrap();
    std::fs::write(base.join("refs/refs/convert/parquet"), converted).unwrap();
    let shard = base
        .join("snapshots")
        .join(converted)
        .join("default/train/0000.parquet");
    write_hub_parquet(&shard, &[(Some(rgb_jpeg(8, 8, 2)), Some(0))]);

    let hub = offline_hub(dir.path());
    let files = hub
        .dataset_split_files(&HubRepo::dataset("someone/jpeg_only"), None, "train")
        .unwrap();
    assert_eq!(files.commit, converted);
    assert_eq!(files.repo_paths, ["default/train/0000.parquet"]);
}
