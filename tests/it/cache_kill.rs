//! A writer process killed part-way (SIGKILL, no destructors) leaves no entry that a later
//! lookup trusts, releases the lock, and the next run recomputes a correct entry.
//!
//! The test re-runs its own binary with `KILL_CHILD_ENV` set; in that child, the helper test
//! `child_writer` takes the lock, starts an entry, writes half of its output, signals readiness
//! and sleeps until the parent kills it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vlmpipe::cache::{
    CacheError, CacheStore, Fingerprint, Lookup, MissReason, Verify, fingerprint,
};

const KILL_CHILD_ENV: &str = "VLMPIPE_TEST_KILL_CHILD_CACHE";

fn key() -> Fingerprint {
    fingerprint("dataset", &json!({ "source": "killed" }), &[], 1)
}

/// The stage output, written in chunks so the child can die between them.
fn write_output(path: &Path, chunks: usize, after_first: impl FnOnce()) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let mut after_first = Some(after_first);
    for i in 0..chunks {
        file.write_all(&vec![i as u8; 64 * 1024]).unwrap();
        file.flush().unwrap();
        if let Some(signal) = after_first.take() {
            signal();
        }
    }
}

#[test]
fn child_writer() {
    let Some(root) = std::env::var_os(KILL_CHILD_ENV) else {
        return; // Only does something when spawned by the kill test.
    };
    let root = std::path::PathBuf::from(root);
    let store = CacheStore::open(&root).unwrap();
    let lock = store.lock(Duration::from_secs(5)).unwrap();
    let writer = store.begin(&lock, &key(), "pets", "dataset").unwrap();
    let out = writer.path("images.bin").unwrap();
    write_output(&out, 1000, || {
        std::fs::write(root.join("child-ready"), b"").unwrap();
        // Sleep "mid-write" until killed; the parent never lets this finish.
        std::thread::sleep(Duration::from_secs(60));
    });
    writer.commit(json!({})).unwrap();
}

#[test]
fn killed_writer_leaves_no_trusted_entry_and_next_run_recomputes() {
    if std::env::var_os(KILL_CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    std::fs::create_dir_all(&root).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "cache_kill::child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(KILL_CHILD_ENV, &root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !root.join("child-ready").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "child never got ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let store = CacheStore::open(&root).unwrap();
    // While the child lives, the cache is locked and says by whom.
    match store.lock(Duration::from_millis(100)) {
        Err(CacheError::Locked { holder, .. }) => {
            assert!(holder.contains(&format!("pid {}", child.id())), "{holder}")
        }
        other => panic!("expected the child to hold the lock, got {other:?}"),
    }
    child.kill().unwrap(); // SIGKILL: no destructor, no cleanup.
    child.wait().unwrap();
    let partial_dirs = std::fs::read_dir(root.join("tmp")).unwrap().count();
    assert_eq!(partial_dirs, 1, "the killed writer left its temp folder");

    // Next run: the OS released the lock; the partial output is cleared and never trusted.
    let lock = store.lock(Duration::from_secs(5)).unwrap();
    assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
    assert!(matches!(
        store.lookup(&lock, &key(), Verify::Full).unwrap(),
        Lookup::Miss(MissReason::Absent)
    ));
    let writer = store.begin(&lock, &key(), "pets", "dataset").unwrap();
    write_output(&writer.path("images.bin").unwrap(), 4, || {});
    writer.commit(json!({ "complete": true })).unwrap();
    let Lookup::Hit(entry) = store.lookup(&lock, &key(), Verify::Full).unwrap() else {
        panic!("the recomputed entry must be a hit");
    };
    assert_eq!(
        entry.manifest().file("images.bin").unwrap().size,
        4 * 64 * 1024
    );
    assert_eq!(entry.manifest().metadata, json!({ "complete": true }));
}

const INGEST_CHILD_ENV: &str = "VLMPIPE_TEST_KILL_CHILD_INGEST";

fn synthetic_dataset() -> vlmpipe::stages::data::DatasetSpec {
    use vlmpipe::stages::data::{DatasetSpec, Shape, SourceSpec, SyntheticSpec};
    let mut spec = DatasetSpec::new(SourceSpec::Synthetic(SyntheticSpec {
        n: 1500,
        seed: 11,
        width: 192,
        height: 192,
        colors: vec!["red".to_owned(), "green".to_owned()],
        shapes: vec![Shape::Circle, Shape::Square, Shape::Triangle],
    }));
    spec.threads = 1;
    spec
}

fn ingest_key() -> Fingerprint {
    fingerprint(
        "dataset",
        &serde_json::to_value(synthetic_dataset()).unwrap(),
        &[],
        1,
    )
}

#[test]
fn child_ingest() {
    let Some(root) = std::env::var_os(INGEST_CHILD_ENV) else {
        return; // Only does something when spawned by the kill test.
    };
    let store = CacheStore::open(std::path::PathBuf::from(root)).unwrap();
    let lock = store.lock(Duration::from_secs(5)).unwrap();
    let writer = store
        .begin(&lock, &ingest_key(), "shapes", "dataset")
        .unwrap();
    let report = vlmpipe::stages::data::ingest(
        &synthetic_dataset(),
        writer.dir(),
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap();
    writer
        .commit(serde_json::to_value(report).unwrap())
        .unwrap();
}

#[test]
fn dataset_stage_killed_mid_ingest_is_recomputed_identically() {
    use vlmpipe::stages::data::{IMAGES_FILE, ROWS_FILE, ingest, read_rows};
    if std::env::var_os(INGEST_CHILD_ENV).is_some() || std::env::var_os(KILL_CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    std::fs::create_dir_all(&root).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cache_kill::child_ingest",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INGEST_CHILD_ENV, &root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill as soon as the image store has real data in it: the stage is part-way.
    let start = Instant::now();
    loop {
        let partial = std::fs::read_dir(root.join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::metadata(e.path().join(IMAGES_FILE)).is_ok_and(|m| m.len() > 4096));
        if partial {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "child never started writing"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !root.join("entries").join(ingest_key().as_str()).exists(),
        "the child finished before the kill; make the dataset bigger"
    );

    let store = CacheStore::open(&root).unwrap();
    let lock = store.lock(Duration::from_secs(5)).unwrap();
    assert!(matches!(
        store.lookup(&lock, &ingest_key(), Verify::Full).unwrap(),
        Lookup::Miss(MissReason::Absent)
    ));
    let writer = store
        .begin(&lock, &ingest_key(), "shapes", "dataset")
        .unwrap();
    let spec = synthetic_dataset();
    let report = ingest(&spec, writer.dir(), &indicatif::ProgressBar::hidden()).unwrap();
    writer
        .commit(serde_json::to_value(&report).unwrap())
        .unwrap();
    let Lookup::Hit(entry) = store.lookup(&lock, &ingest_key(), Verify::Full).unwrap() else {
        panic!("the recomputed entry must be a hit");
    };
    // The same stage run cleanly elsewhere gives the same rows and the same image store.
    let clean = tempfile::tempdir().unwrap();
    ingest(&spec, clean.path(), &indicatif::ProgressBar::hidden()).unwrap();
    assert_eq!(
        read_rows(&entry.path(ROWS_FILE)).unwrap(),
        read_rows(&clean.path().join(ROWS_FILE)).unwrap()
    );
    assert_eq!(
        std::fs::read(entry.path(IMAGES_FILE)).unwrap(),
        std::fs::read(clean.path().join(IMAGES_FILE)).unwrap()
    );
    assert_eq!(report.rows_kept, 1500);
}
