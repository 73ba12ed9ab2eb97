//! Shuffles, samples and stratified splits: exact per-class counts, determinism (golden row ids
//! for fixed seeds), independence from input order.

use std::collections::BTreeSet;

use vlmpipe::stages::data::{
    DataError, DatasetSpec, ROWS_FILE, RowRecord, RowTable, SourceSpec, SplitPart, SplitSpec,
    ingest, read_rows, sample, shuffle, stratified_split, write_rows,
};

fn table(counts: &[(&str, usize)]) -> RowTable {
    let mut rows = Vec::new();
    for (index, (class, n)) in counts.iter().enumerate() {
        for i in 0..*n {
            rows.push(RowRecord {
                row_id: format!("{class}/{i:03}"),
                image_id: format!("img-{class}-{i}"),
                label: (*class).to_owned(),
                label_index: index as u32,
                image_error: None,
            });
        }
    }
    RowTable {
        rows,
        classes: counts.iter().map(|c| c.0.to_owned()).collect(),
    }
}

fn spec(parts: &[(&str, f64)], seed: u64) -> SplitSpec {
    SplitSpec {
        parts: parts
            .iter()
            .map(|(n, r)| SplitPart {
                name: (*n).to_owned(),
                ratio: *r,
            })
            .collect(),
        seed,
    }
}

fn count(t: &RowTable, class: &str) -> usize {
    t.rows.iter().filter(|r| r.label == class).count()
}

#[test]
fn stratified_counts_are_exact_per_class() {
    let input = table(&[("cat", 50), ("dog", 30), ("bird", 3)]);
    let parts = stratified_split(
        &input,
        &spec(&[("train", 0.8), ("validation", 0.1), ("test", 0.1)], 42),
    )
    .unwrap();
    let names: Vec<&str> = parts.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["train", "validation", "test"]);
    let counts: Vec<[usize; 3]> = parts
        .iter()
        .map(|(_, t)| [count(t, "cat"), count(t, "dog"), count(t, "bird")])
        .collect();
    assert_eq!(counts, [[40, 24, 3], [5, 3, 0], [5, 3, 0]]);
    // Disjoint, complete, each part sorted by row id, classes carried along.
    let mut all = BTreeSet::new();
    for (_, part) in &parts {
        assert!(part.rows.windows(2).all(|w| w[0].row_id < w[1].row_id));
        assert_eq!(part.classes, input.classes);
        for row in &part.rows {
            assert!(all.insert(row.row_id.clone()));
        }
    }
    assert_eq!(all.len(), 83);
}

#[test]
fn split_is_deterministic_and_ignores_input_order() {
    let input = table(&[("cat", 20), ("dog", 20)]);
    let split = spec(&[("train", 0.9), ("test", 0.1)], 42);
    let a = stratified_split(&input, &split).unwrap();
    let mut reversed = input.clone();
    reversed.rows.reverse();
    assert_eq!(a, stratified_split(&reversed, &split).unwrap());
    let test: Vec<&str> = a[1].1.rows.iter().map(|r| r.row_id.as_str()).collect();
    // Golden: SplitMix64(42), classes in list order; changing this breaks users' splits.
    assert_eq!(test, GOLDEN_TEST_IDS);
    let other = stratified_split(&input, &spec(&[("train", 0.9), ("test", 0.1)], 43)).unwrap();
    assert_ne!(a, other);
}

const GOLDEN_TEST_IDS: [&str; 4] = ["cat/003", "cat/014", "dog/013", "dog/018"];

#[test]
fn sample_and_shuffle() {
    let input = table(&[("cat", 30), ("dog", 10)]);
    let s10 = sample(&input, 10, 23).unwrap();
    let s20 = sample(&input, 20, 23).unwrap();
    assert_eq!(
        s10.rows[..],
        s20.rows[..10],
        "a smaller sample is a prefix of a larger one"
    );
    assert_eq!(s10, sample(&input, 10, 23).unwrap());
    assert_ne!(s10, sample(&input, 10, 24).unwrap());
    let golden: Vec<&str> = s10.rows.iter().take(5).map(|r| r.row_id.as_str()).collect();
    assert_eq!(golden, GOLDEN_SAMPLE_IDS);
    assert!(matches!(
        sample(&input, 41, 1),
        Err(DataError::SampleTooLarge {
            requested: 41,
            available: 40
        })
    ));
    assert_eq!(sample(&input, 40, 1).unwrap().rows.len(), 40);
    let shuffled = shuffle(&input, 7);
    let mut ids: Vec<&str> = shuffled.rows.iter().map(|r| r.row_id.as_str()).collect();
    assert_ne!(
        ids,
        input
            .rows
            .iter()
            .map(|r| r.row_id.as_str())
            .collect::<Vec<_>>()
    );
    ids.sort();
    assert_eq!(
        ids,
        input
            .rows
            .iter()
            .map(|r| r.row_id.as_str())
            .collect::<Vec<_>>()
    );
}

const GOLDEN_SAMPLE_IDS: [&str; 5] = ["cat/029", "cat/003", "cat/004", "dog/002", "cat/007"];

#[test]
fn row_tables_round_trip_through_parquet() {
    let input = table(&[("cat", 3), ("dog", 2)]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.parquet");
    write_rows(&path, &input).unwrap();
    assert_eq!(read_rows(&path).unwrap(), input);
    std::fs::write(&path, b"PAR1 not really").unwrap();
    assert!(read_rows(&path).is_err());
}

#[test]
fn real_photos_split_90_10() {
    let Some(photos) = crate::support::shared_path("data/cats_vs_dogs") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    ingest(
        &DatasetSpec::new(SourceSpec::Folder { dir: photos }),
        dir.path(),
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap();
    let rows = read_rows(&dir.path().join(ROWS_FILE)).unwrap();
    let parts = stratified_split(&rows, &spec(&[("train", 0.9), ("test", 0.1)], 42)).unwrap();
    let test = &parts[1].1;
    assert_eq!((count(test, "cat"), count(test, "dog")), (15, 15));
    assert_eq!(
        (count(&parts[0].1, "cat"), count(&parts[0].1, "dog")),
        (135, 135)
    );
    let first: Vec<&str> = test
        .rows
        .iter()
        .take(3)
        .map(|r| r.row_id.as_str())
        .collect();
    assert_eq!(first, GOLDEN_PHOTO_TEST_IDS);
}

const GOLDEN_PHOTO_TEST_IDS: [&str; 3] = ["cat/0006.jpg", "cat/0024.jpg", "cat/0029.jpg"];
