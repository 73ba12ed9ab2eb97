//! Dataset sources end to end: Hub-layout Parquet, binary columns, image folders (the real
//! photos when `../shared` is present), CSV, JSONL and synthetic data; label mappings, filters,
//! drops, bad images and the image store's deduplication.

use crate::data_support;

use std::collections::BTreeMap;
use std::path::Path;

use data_support::{
    gray_jpeg, read_text_table, rgb_jpeg, rgba_png, write_binary_parquet, write_hub_parquet,
};
use vlmpipe::stages::data::{
    DataError, DatasetSpec, ERRORS_FILE, FILTERED_FILE, FilterSpec, IMAGES_FILE, ImageStore,
    IngestReport, LabelSpec, ROWS_FILE, RowTable, Shape, SourceSpec, SyntheticSpec, ingest,
    read_rows,
};

fn run(spec: &DatasetSpec, out: &Path) -> Result<IngestReport, DataError> {
    ingest(spec, out, &indicatif::ProgressBar::hidden())
}

fn cat_dog() -> LabelSpec {
    LabelSpec::Mapped {
        column: "labels".to_owned(),
        mapping: BTreeMap::from([(0, "cat".to_owned()), (1, "dog".to_owned())]),
    }
}

/// The ids of the rows with an image (error rows stay in the table without one).
fn ids(table: &RowTable) -> Vec<&str> {
    table
        .rows
        .iter()
        .filter(|r| r.image_error.is_none())
        .map(|r| r.row_id.as_str())
        .collect()
}

/// The ids of the error rows, which have no image.
fn error_ids(table: &RowTable) -> Vec<&str> {
    table
        .rows
        .iter()
        .filter(|r| r.image_error.is_some())
        .inspect(|r| assert!(r.image_id.is_empty(), "{r:?}"))
        .map(|r| r.row_id.as_str())
        .collect()
}

#[test]
fn hub_layout_parquet_with_filters_drops_errors_and_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let same = rgb_jpeg(40, 30, 1);
    let mut truncated = rgb_jpeg(40, 30, 2);
    truncated.truncate(truncated.len() / 2);
    write_hub_parquet(
        &repo.join("data/train-00000-of-00002.parquet"),
        &[
            (Some(same.clone()), Some(0)),         // kept
            (Some(gray_jpeg(20, 20, 3)), Some(1)), // mode L: filtered
            (Some(truncated), Some(1)),            // error: truncated
            (None, Some(0)),                       // error: no bytes, path missing
        ],
    );
    write_hub_parquet(
        &repo.join("data/train-00001-of-00002.parquet"),
        &[
            (Some(rgb_jpeg(10, 10, 4)), Some(1)), // dropped explicitly
            (Some(same.clone()), Some(1)),        // kept, same bytes as row 0: stored once
            (Some(rgb_jpeg(600, 8, 5)), Some(0)), // longer than 500: filtered
            (Some(rgba_png(12, 9, 6)), Some(1)),  // RGBA: filtered
            (Some(rgb_jpeg(33, 44, 7)), Some(1)), // kept
        ],
    );
    // Another split in the same folder must not be read.
    write_hub_parquet(
        &repo.join("data/test-00000-of-00001.parquet"),
        &[(Some(same.clone()), Some(0))],
    );

    let mut spec = DatasetSpec::new(SourceSpec::ParquetDir {
        dir: repo.clone(),
        split: "train".to_owned(),
        config: None,
    });
    spec.label = cat_dog();
    spec.filters = FilterSpec {
        modes: Some(vec!["RGB".to_owned()]),
        max_image_size: Some(500),
        drop: vec!["train-00001-of-00002:0".to_owned(), "train-9:9".to_owned()],
        ..FilterSpec::default()
    };
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let report = run(&spec, &out).unwrap();

    let table = read_rows(&out.join(ROWS_FILE)).unwrap();
    assert_eq!(
        ids(&table),
        [
            "train-00000-of-00002:0",
            "train-00001-of-00002:1",
            "train-00001-of-00002:4"
        ]
    );
    assert_eq!(
        error_ids(&table),
        ["train-00000-of-00002:2", "train-00000-of-00002:3"]
    );
    let labels: Vec<(&str, u32)> = table
        .rows
        .iter()
        .filter(|r| r.image_error.is_none())
        .map(|r| (r.label.as_str(), r.label_index))
        .collect();
    assert_eq!(labels, [("cat", 0), ("dog", 1), ("dog", 1)]);
    assert_eq!(table.classes, ["cat", "dog"]);
    let with_images: Vec<_> = table
        .rows
        .iter()
        .filter(|r| r.image_error.is_none())
        .collect();
    assert_eq!(with_images[0].image_id, with_images[1].image_id);

    assert_eq!(report.rows_read, 9);
    assert_eq!(report.rows_kept, 3);
    assert_eq!((report.images_stored, report.duplicate_images), (2, 1));
    assert_eq!(report.errors, 2);
    assert_eq!(report.unknown_drop_ids, ["train-9:9"]);
    let filtered: Vec<(&str, usize)> = report
        .filtered
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(filtered, [("drop", 1), ("max_image_size", 1), ("mode", 2)]);
    assert_eq!(
        report.class_counts,
        BTreeMap::from([("cat".to_owned(), 1), ("dog".to_owned(), 2)])
    );

    let errors = read_text_table(&out.join(ERRORS_FILE));
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0][0], "train-00000-of-00002:2");
    assert!(errors[0][1].contains("truncated jpeg"), "{}", errors[0][1]);
    // A null `bytes` falls back to the struct's `path`, relative to the Parquet file.
    assert_eq!(errors[1][0], "train-00000-of-00002:3");
    assert!(errors[1][1].starts_with("cannot read") && errors[1][1].contains("3.jpg"));
    let filtered = read_text_table(&out.join(FILTERED_FILE));
    assert!(filtered.contains(&vec![
        "train-00000-of-00002:1".to_owned(),
        "mode".to_owned(),
        "mode L not in [RGB]".to_owned()
    ]));
    assert!(filtered.contains(&vec![
        "train-00001-of-00002:2".to_owned(),
        "max_image_size".to_owned(),
        "600x8 exceeds 500".to_owned()
    ]));

    let store = ImageStore::open(&out.join(IMAGES_FILE)).unwrap();
    assert_eq!(store.len(), 2);
    let image = store.get(&with_images[2].image_id).unwrap();
    assert_eq!(
        (
            image.width,
            image.height,
            image.mode.as_str(),
            image.format.as_str()
        ),
        (33, 44, "RGB", "jpeg")
    );
    assert_eq!(image.bytes, rgb_jpeg(33, 44, 7));
    assert_eq!(image.decode().unwrap().width(), 33);
    let both = store
        .get_many(&[&with_images[2].image_id, &with_images[0].image_id])
        .unwrap();
    assert_eq!(both[1].bytes, same);
}

#[test]
fn unmapped_and_missing_labels_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("train.parquet");
    write_hub_parquet(
        &file,
        &[
            (Some(rgb_jpeg(8, 8, 1)), Some(0)),
            (Some(rgb_jpeg(8, 8, 2)), Some(7)),
        ],
    );
    let mut spec = DatasetSpec::new(SourceSpec::Parquet {
        files: vec![file.clone()],
    });
    spec.label = cat_dog();
    let err = run(&spec, dir.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "row `train:1`: label value `7` is missing from the label mapping (mapped: 0 → cat, 1 → dog)"
    );
    write_hub_parquet(&file, &[(Some(rgb_jpeg(8, 8, 1)), None)]);
    let err = run(&spec, dir.path()).unwrap_err();
    assert!(
        matches!(err, DataError::MissingLabel { ref row_id } if row_id == "train:0"),
        "{err}"
    );
    spec.label = LabelSpec::Mapped {
        column: "nope".to_owned(),
        mapping: BTreeMap::new(),
    };
    let err = run(&spec, dir.path()).unwrap_err();
    assert!(
        err.to_string()
            .contains("has no column `nope` (columns: image, labels)"),
        "{err}"
    );
    spec.label = LabelSpec::FromSource;
    assert!(matches!(
        run(&spec, dir.path()).unwrap_err(),
        DataError::LabelColumnNeeded
    ));
}

#[test]
fn binary_column_with_string_labels_and_a_class_list() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shard.parquet");
    write_binary_parquet(
        &file,
        &[(rgb_jpeg(8, 8, 1), "dog"), (rgb_jpeg(8, 8, 2), "cat")],
    );
    let mut spec = DatasetSpec::new(SourceSpec::Parquet { files: vec![file] });
    spec.image_column = "img".to_owned();
    spec.label = LabelSpec::Names {
        column: "class".to_owned(),
    };
    spec.classes = Some(vec!["dog".to_owned(), "cat".to_owned()]);
    run(&spec, dir.path()).unwrap();
    let table = read_rows(&dir.path().join(ROWS_FILE)).unwrap();
    let got: Vec<(&str, u32)> = table
        .rows
        .iter()
        .map(|r| (r.label.as_str(), r.label_index))
        .collect();
    assert_eq!(got, [("dog", 0), ("cat", 1)]);
    spec.classes = Some(vec!["dog".to_owned()]);
    let err = run(&spec, dir.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "row `shard:1`: label `cat` is not one of the classes (dog)"
    );
}

#[test]
fn image_folder_with_junk_and_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    for class in ["cat", "dog"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
    }
    std::fs::write(root.join("cat/b.jpg"), rgb_jpeg(10, 12, 1)).unwrap();
    std::fs::write(root.join("cat/a.PNG"), rgba_png(5, 5, 1)).unwrap();
    std::fs::write(root.join("dog/x.jpg"), b"this is not a jpeg").unwrap();
    std::fs::write(root.join("dog/notes.txt"), b"ignored").unwrap();
    std::fs::write(root.join("README.jpg"), rgb_jpeg(4, 4, 9)).unwrap(); // not in a class folder
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let report = run(&DatasetSpec::new(SourceSpec::Folder { dir: root }), &out).unwrap();
    let table = read_rows(&out.join(ROWS_FILE)).unwrap();
    assert_eq!(ids(&table), ["cat/a.PNG", "cat/b.jpg"]);
    assert_eq!(report.classes, ["cat"]);
    // `dog/x.jpg` is the only image of `dog`: no class to count it in, so only an error.
    assert!(error_ids(&table).is_empty());
    assert_eq!(
        report.error_examples,
        [(
            "dog/x.jpg".to_owned(),
            "unrecognised image format".to_owned()
        )]
    );
}

#[test]
fn real_photos_folder() {
    let Some(photos) = crate::support::shared_path("data/cats_vs_dogs") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut spec = DatasetSpec::new(SourceSpec::Folder { dir: photos });
    spec.filters.modes = Some(vec!["RGB".to_owned()]);
    let report = run(&spec, dir.path()).unwrap();
    assert_eq!(
        (report.rows_read, report.rows_kept, report.errors),
        (300, 300, 0)
    );
    assert_eq!(
        report.class_counts,
        BTreeMap::from([("cat".to_owned(), 150), ("dog".to_owned(), 150)])
    );
    let table = read_rows(&dir.path().join(ROWS_FILE)).unwrap();
    assert_eq!(table.rows[0].row_id, "cat/0001.jpg");
    let store = ImageStore::open(&dir.path().join(IMAGES_FILE)).unwrap();
    // PROVENANCE.md: the smallest images are cat/0001 (50x49) and dog/0002 (42x62).
    let cat = store.get(&table.rows[0].image_id).unwrap();
    assert_eq!((cat.width, cat.height), (50, 49));
    let dog = table
        .rows
        .iter()
        .find(|r| r.row_id == "dog/0002.jpg")
        .unwrap();
    let dog = store.get(&dog.image_id).unwrap();
    assert_eq!((dog.width, dog.height), (42, 62));
    // Header sizes agree with a full decode.
    assert_eq!(dog.decode().unwrap().height(), 62);
}

#[test]
fn csv_and_jsonl_with_relative_paths() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("img")).unwrap();
    std::fs::write(dir.path().join("img/1.jpg"), rgb_jpeg(9, 9, 1)).unwrap();
    std::fs::write(dir.path().join("img/2.jpg"), rgb_jpeg(9, 9, 2)).unwrap();
    std::fs::write(
        dir.path().join("list.csv"),
        "file,label\nimg/1.jpg,1\nimg/2.jpg,0\nimg/missing.jpg,0\n",
    )
    .unwrap();
    let mut spec = DatasetSpec::new(SourceSpec::Csv {
        path: dir.path().join("list.csv"),
    });
    spec.image_column = "file".to_owned();
    spec.label = LabelSpec::Mapped {
        column: "label".to_owned(),
        mapping: BTreeMap::from([(0, "cat".to_owned()), (1, "dog".to_owned())]),
    };
    let out = dir.path().join("csv-out");
    std::fs::create_dir_all(&out).unwrap();
    let report = run(&spec, &out).unwrap();
    let table = read_rows(&out.join(ROWS_FILE)).unwrap();
    let got: Vec<(&str, &str)> = table
        .rows
        .iter()
        .filter(|r| r.image_error.is_none())
        .map(|r| (r.row_id.as_str(), r.label.as_str()))
        .collect();
    assert_eq!(got, [("list:0", "dog"), ("list:1", "cat")]);
    assert_eq!(error_ids(&table), ["list:2"]);
    assert_eq!(report.errors, 1);
    assert!(
        report.error_examples[0].1.starts_with("cannot read"),
        "{:?}",
        report.error_examples
    );

    std::fs::write(
        dir.path().join("list.jsonl"),
        "{\"path\": \"img/2.jpg\", \"y\": \"zebra\"}\n\n{\"path\": \"img/1.jpg\", \"y\": \"horse\"}\n",
    )
    .unwrap();
    let mut spec = DatasetSpec::new(SourceSpec::Jsonl {
        path: dir.path().join("list.jsonl"),
    });
    spec.image_column = "path".to_owned();
    spec.label = LabelSpec::Names {
        column: "y".to_owned(),
    };
    let out = dir.path().join("jsonl-out");
    std::fs::create_dir_all(&out).unwrap();
    let report = run(&spec, &out).unwrap();
    let table = read_rows(&out.join(ROWS_FILE)).unwrap();
    assert_eq!(ids(&table), ["list:0", "list:1"]);
    assert_eq!(report.classes, ["horse", "zebra"]);
    assert_eq!(table.rows[0].label_index, 1);

    std::fs::write(dir.path().join("bad.jsonl"), "{\"path\": 1\n").unwrap();
    let spec = DatasetSpec {
        source: SourceSpec::Jsonl {
            path: dir.path().join("bad.jsonl"),
        },
        ..spec
    };
    assert!(run(&spec, &out).unwrap_err().to_string().contains("line 1"));
}

#[test]
fn synthetic_shapes_are_balanced_and_deterministic() {
    let synthetic = SyntheticSpec {
        n: 24,
        seed: 5,
        width: 48,
        height: 40,
        colors: vec!["red".to_owned(), "blue".to_owned(), "yellow".to_owned()],
        shapes: vec![Shape::Circle, Shape::Square],
    };
    let dir = tempfile::tempdir().unwrap();
    let mut tables = Vec::new();
    for run_no in 0..2 {
        let out = dir.path().join(format!("run{run_no}"));
        std::fs::create_dir_all(&out).unwrap();
        let mut spec = DatasetSpec::new(SourceSpec::Synthetic(synthetic.clone()));
        spec.threads = run_no + 1; // the thread count must not change the output
        let report = run(&spec, &out).unwrap();
        assert_eq!(report.classes.len(), 6);
        assert!(report.class_counts.values().all(|&c| c == 4));
        assert_eq!(report.images_stored, 24);
        tables.push(read_rows(&out.join(ROWS_FILE)).unwrap());
    }
    assert_eq!(tables[0], tables[1]);
    assert_eq!(tables[0].rows[3].row_id, "synthetic:000003");
    assert_eq!(tables[0].rows[3].label, "blue square");
}

#[test]
fn source_stamp_changes_when_local_data_changes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.jpg"), rgb_jpeg(9, 9, 1)).unwrap();
    std::fs::write(dir.path().join("list.csv"), "file,label\na.jpg,cat\n").unwrap();
    let mut spec = DatasetSpec::new(SourceSpec::Csv {
        path: dir.path().join("list.csv"),
    });
    spec.image_column = "file".to_owned();
    spec.label = LabelSpec::Names {
        column: "label".to_owned(),
    };
    let before = spec.source_stamp().unwrap();
    assert_eq!(before, spec.source_stamp().unwrap());
    // A referenced image changes: same name, new content and size.
    std::fs::write(dir.path().join("a.jpg"), rgb_jpeg(19, 9, 1)).unwrap();
    assert_ne!(before, spec.source_stamp().unwrap());

    let synthetic = DatasetSpec::new(SourceSpec::Synthetic(SyntheticSpec::default()));
    assert_eq!(synthetic.source.row_count_hint(), Some(400));
}
