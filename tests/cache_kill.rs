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
        .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
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
