//! The cache store: commit and lookup, corruption detection, fast vs full verification, `ls`,
//! `gc`, and lock contention.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::time::Duration;

use serde_json::json;
use vlmpipe::cache::{
    CacheError, CacheStore, Fingerprint, GcPolicy, Lookup, MissReason, SMALL_FILE_BYTES, Verify,
    fingerprint,
};

fn fp(name: &str) -> Fingerprint {
    fingerprint("test", &json!({ "name": name }), &[], 1)
}

/// Commits an entry with a small `rows.txt` and, when `big`, a file above the small-file limit.
fn commit(store: &CacheStore, lock: &vlmpipe::cache::CacheLock, key: &Fingerprint, big: bool) {
    let mut writer = store.begin(lock, key, "stage", "test").unwrap();
    std::fs::write(writer.path("rows.txt").unwrap(), b"hello rows").unwrap();
    if big {
        let data = vec![7u8; SMALL_FILE_BYTES as usize + 4096];
        std::fs::write(writer.path("images.bin").unwrap(), data).unwrap();
    }
    writer.set_inputs(vec![]);
    writer.commit(json!({ "rows": 1 })).unwrap();
}

fn is_hit(lookup: Lookup) -> bool {
    matches!(lookup, Lookup::Hit(_))
}

#[test]
fn commit_then_lookup_hits_with_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let lock = store.lock(Duration::ZERO).unwrap();
    let key = fp("a");
    assert!(matches!(
        store.lookup(&lock, &key, Verify::Fast).unwrap(),
        Lookup::Miss(MissReason::Absent)
    ));
    commit(&store, &lock, &key, false);
    let Lookup::Hit(entry) = store.lookup(&lock, &key, Verify::Full).unwrap() else {
        panic!("expected a hit");
    };
    assert_eq!(entry.manifest().stage, "stage");
    assert_eq!(entry.manifest().metadata, json!({ "rows": 1 }));
    assert_eq!(entry.manifest().file("rows.txt").unwrap().size, 10);
    assert_eq!(
        std::fs::read(entry.path("rows.txt")).unwrap(),
        b"hello rows"
    );
    // Nothing is left in tmp/ after a commit.
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[test]
fn parquet_files_get_row_counts() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let lock = store.lock(Duration::ZERO).unwrap();
    let key = fp("rows");
    let writer = store.begin(&lock, &key, "pets", "dataset").unwrap();
    let table = vlmpipe::stages::data::RowTable {
        rows: (0..5)
            .map(|i| vlmpipe::stages::data::RowRecord {
                row_id: format!("r{i}"),
                image_id: "x".to_owned(),
                label: "cat".to_owned(),
                label_index: 0,
                image_error: None,
            })
            .collect(),
        classes: vec!["cat".to_owned()],
    };
    vlmpipe::stages::data::write_rows(&writer.path("rows.parquet").unwrap(), &table).unwrap();
    let entry = writer.commit(json!(null)).unwrap();
    assert_eq!(entry.manifest().file("rows.parquet").unwrap().rows, Some(5));
}

#[test]
fn corrupt_entries_are_misses_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let lock = store.lock(Duration::ZERO).unwrap();
    type Damage = fn(&std::path::Path);
    let damages: [(&str, Damage); 5] = [
        ("truncated big file", |d| {
            let f = OpenOptions::new()
                .write(true)
                .open(d.join("images.bin"))
                .unwrap();
            f.set_len(100).unwrap();
        }),
        ("flipped byte in small file", |d| {
            let mut f = OpenOptions::new()
                .write(true)
                .open(d.join("rows.txt"))
                .unwrap();
            f.seek(SeekFrom::Start(0)).unwrap();
            f.write_all(b"J").unwrap();
        }),
        ("missing file", |d| {
            std::fs::remove_file(d.join("rows.txt")).unwrap()
        }),
        ("garbage manifest", |d| {
            std::fs::write(d.join("manifest.json"), "{not json").unwrap()
        }),
        ("no manifest", |d| {
            std::fs::remove_file(d.join("manifest.json")).unwrap()
        }),
    ];
    for (what, damage) in damages {
        let key = fp(what);
        commit(&store, &lock, &key, true);
        damage(&dir.path().join("entries").join(key.as_str()));
        match store.lookup(&lock, &key, Verify::Fast).unwrap() {
            Lookup::Miss(MissReason::Corrupt(reason)) => assert!(!reason.is_empty(), "{what}"),
            other => panic!("{what}: expected a corrupt miss, got {other:?}"),
        }
        assert!(
            !dir.path().join("entries").join(key.as_str()).exists(),
            "{what}"
        );
        // The recomputed entry then takes its place.
        commit(&store, &lock, &key, true);
        assert!(
            is_hit(store.lookup(&lock, &key, Verify::Full).unwrap()),
            "{what}"
        );
    }
}

#[test]
fn fast_lookup_trusts_untouched_big_files_until_verify_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let lock = store.lock(Duration::ZERO).unwrap();
    let key = fp("big");
    commit(&store, &lock, &key, true);
    let big = dir
        .path()
        .join("entries")
        .join(key.as_str())
        .join("images.bin");
    // Same size, same mtime, different bytes: only a full verify can see it.
    let mtime = std::fs::metadata(&big).unwrap().modified().unwrap();
    let mut f = OpenOptions::new().write(true).open(&big).unwrap();
    f.seek(SeekFrom::Start(10)).unwrap();
    f.write_all(b"XYZ").unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    assert!(is_hit(store.lookup(&lock, &key, Verify::Fast).unwrap()));
    let report = store.verify_all(&lock).unwrap();
    assert_eq!(report.len(), 1);
    assert!(report[0].problem.as_deref().unwrap().contains("checksum"));
    assert!(report[0].removed);
    // Issue 13 item 3: once verify found it bad, no lookup trusts it, fast ones included.
    assert!(matches!(
        store.lookup(&lock, &key, Verify::Fast).unwrap(),
        Lookup::Miss(MissReason::Absent)
    ));
    assert!(store.verify_all(&lock).unwrap().is_empty());
}

#[test]
fn touched_big_file_is_rehashed_and_mtime_refreshed() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let lock = store.lock(Duration::ZERO).unwrap();
    let key = fp("touched");
    commit(&store, &lock, &key, true);
    let big = dir
        .path()
        .join("entries")
        .join(key.as_str())
        .join("images.bin");
    let later = std::time::SystemTime::now() + Duration::from_secs(5);
    OpenOptions::new()
        .write(true)
        .open(&big)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let Lookup::Hit(entry) = store.lookup(&lock, &key, Verify::Fast).unwrap() else {
        panic!("same content, new mtime: still a hit");
    };
    let recorded = entry.manifest().file("images.bin").unwrap().mtime_ns;
    let now = std::fs::metadata(&big).unwrap().modified().unwrap();
    let now_ns = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    assert_eq!(recorded, now_ns);
}

#[test]
fn ls_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let lock = store.lock(Duration::ZERO).unwrap();
    let (a, b, c) = (fp("a"), fp("b"), fp("c"));
    commit(&store, &lock, &a, false);
    let mut writer = store.begin(&lock, &b, "split", "split").unwrap();
    std::fs::write(writer.path("train.txt").unwrap(), b"x").unwrap();
    writer.set_inputs(vec![a.clone()]);
    writer.commit(json!({})).unwrap();
    commit(&store, &lock, &c, false);
    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|e| e.manifest.is_some() && e.bytes() > 0));

    // Keeping `b` keeps its input `a`; `c` goes.
    let report = store
        .gc(&lock, &GcPolicy::KeepReachable(vec![b.clone()]))
        .unwrap();
    assert_eq!(report.removed, vec![c.to_string()]);
    assert_eq!(report.kept, 2);
    let report = store
        .gc(&lock, &GcPolicy::OlderThan(Duration::from_secs(3600)))
        .unwrap();
    assert!(report.removed.is_empty());
    let report = store
        .gc(&lock, &GcPolicy::OlderThan(Duration::ZERO))
        .unwrap();
    assert_eq!((report.kept, report.removed.len()), (0, 2));
}

#[test]
fn a_second_holder_waits_then_fails_with_the_holder_named() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let first = store.lock(Duration::ZERO).unwrap();
    let started = std::time::Instant::now();
    match store.lock(Duration::from_millis(200)) {
        Err(CacheError::Locked { holder, .. }) => {
            assert!(
                holder.contains(&format!("pid {}", std::process::id())),
                "{holder}"
            );
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(200));
    drop(first);
    let second = store.lock(Duration::ZERO).unwrap();
    // A lock of another cache is refused by this store.
    let other_dir = tempfile::tempdir().unwrap();
    let other = CacheStore::open(other_dir.path()).unwrap();
    assert!(matches!(
        other.lookup(&second, &fp("x"), Verify::Fast),
        Err(CacheError::WrongLock { .. })
    ));
}

#[test]
fn dropped_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let lock = store.lock(Duration::ZERO).unwrap();
    let key = fp("dropped");
    let writer = store.begin(&lock, &key, "s", "k").unwrap();
    std::fs::write(writer.path("rows.txt").unwrap(), b"partial").unwrap();
    assert!(writer.path("../escape").is_err());
    drop(writer);
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    assert!(matches!(
        store.lookup(&lock, &key, Verify::Fast).unwrap(),
        Lookup::Miss(MissReason::Absent)
    ));
}

#[test]
fn nested_output_files_are_tracked_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let lock = store.lock(Duration::ZERO).unwrap();
    let key = fp("nested");
    let writer = store.begin(&lock, &key, "tuned", "finetune").unwrap();
    std::fs::write(
        writer.path("checkpoints/step-100/adapter.bin").unwrap(),
        b"w",
    )
    .unwrap();
    std::fs::write(writer.path("summary.json").unwrap(), b"{}").unwrap();
    for bad in ["", "/abs", "a/../b", "manifest.json", "a//b", "./a"] {
        assert!(writer.path(bad).is_err(), "{bad:?}");
    }
    let entry = writer.commit(json!({})).unwrap();
    let names: Vec<&str> = entry
        .manifest()
        .files
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(names, ["checkpoints/step-100/adapter.bin", "summary.json"]);
    std::fs::write(entry.path("checkpoints/step-100/adapter.bin"), b"W").unwrap();
    assert!(matches!(
        store.lookup(&lock, &key, Verify::Fast).unwrap(),
        Lookup::Miss(MissReason::Corrupt(_))
    ));
}
