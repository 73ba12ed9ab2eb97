//! Ingest and no-change-rerun measurements over a generated 10,000-image folder.
//!
//! Benchmarks, not timed tests: ignored by default, run with
//! `cargo test --release --test it data_bench -- --ignored --nocapture` (or the dev profile).

use std::time::{Duration, Instant};

use serde_json::json;
use vlmpipe::cache::{CacheStore, Lookup, Verify, fingerprint};
use vlmpipe::stages::data::{
    DATA_CODE_VERSION, DatasetSpec, ImageCheck, Shape, SourceSpec, SyntheticSpec,
    bench_ingest_folder, ingest,
};

/// Writes `n` synthetic PNGs into `<dir>/<class>/<i>.png`.
fn make_folder(dir: &std::path::Path, n: usize) {
    let spec = SyntheticSpec {
        n,
        seed: 9,
        width: 160,
        height: 120,
        colors: vec!["red".to_owned(), "blue".to_owned()],
        shapes: vec![Shape::Circle, Shape::Triangle],
    };
    for i in 0..n {
        let class = spec.class_of(i).replace(' ', "_");
        let folder = dir.join(class);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join(format!("{i:05}.png")), spec.render(i).unwrap()).unwrap();
    }
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn ingest_throughput_and_no_change_rerun() {
    for n in [1_000usize, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        make_folder(&images, n);
        for threads in [1, 2] {
            let bench = bench_ingest_folder(&images, threads, ImageCheck::Header).unwrap();
            eprintln!(
                "ingest {n} images, {threads} thread(s), header check: {:.2} s, {:.0} images/s",
                bench.seconds, bench.images_per_sec
            );
        }
        let full = bench_ingest_folder(&images, 2, ImageCheck::Full).unwrap();
        eprintln!(
            "ingest {n} images, 2 threads, full decode: {:.2} s, {:.0} images/s",
            full.seconds, full.images_per_sec
        );

        // First run: compute and commit the dataset entry.
        let store = CacheStore::open(dir.path().join("cache")).unwrap();
        let spec = DatasetSpec::new(SourceSpec::Folder {
            dir: images.clone(),
        });
        let key_of = |spec: &DatasetSpec| {
            let params = json!({ "spec": spec, "stamp": spec.source_stamp().unwrap() });
            fingerprint("dataset", &params, &[], DATA_CODE_VERSION)
        };
        {
            let lock = store.lock(Duration::ZERO).unwrap();
            let key = key_of(&spec);
            let writer = store.begin(&lock, &key, "pets", "dataset").unwrap();
            let report = ingest(&spec, writer.dir(), &indicatif::ProgressBar::hidden()).unwrap();
            writer
                .commit(serde_json::to_value(report).unwrap())
                .unwrap();
        }
        // No-change rerun: stamp the source, fingerprint, lock, verify the entry.
        let start = Instant::now();
        let lock = store.lock(Duration::ZERO).unwrap();
        let key = key_of(&spec);
        let stamped = start.elapsed();
        let hit = matches!(
            store.lookup(&lock, &key, Verify::Fast).unwrap(),
            Lookup::Hit(_)
        );
        let total = start.elapsed();
        assert!(hit);
        eprintln!(
            "no-change rerun over {n} images: {:.1} ms total ({:.1} ms stamping the folder, {:.1} ms lookup)",
            total.as_secs_f64() * 1e3,
            stamped.as_secs_f64() * 1e3,
            (total - stamped).as_secs_f64() * 1e3
        );
        assert!(total < Duration::from_secs(1));
    }
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn ingest_throughput_real_photos() {
    let Some(photos) = crate::support::shared_path("data/cats_vs_dogs") else {
        return;
    };
    for (threads, check) in [
        (1, ImageCheck::Header),
        (2, ImageCheck::Header),
        (2, ImageCheck::Full),
    ] {
        // Best of 3: the first pass also warms the page cache.
        let best = (0..3)
            .map(|_| bench_ingest_folder(&photos, threads, check).unwrap())
            .max_by(|a, b| a.images_per_sec.total_cmp(&b.images_per_sec))
            .unwrap();
        assert_eq!(best.images, 300);
        eprintln!(
            "ingest 300 real JPEGs, {threads} thread(s), {check:?}: {:.3} s, {:.0} images/s",
            best.seconds, best.images_per_sec
        );
    }
}
