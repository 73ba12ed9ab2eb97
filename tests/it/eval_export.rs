//! The tutorial-format CSV read back with the csv crate: exact header, True/False, and image
//! cells that hold the original image files (issue 13, item 15), checked on in-memory records and
//! end to end through `vlmpipe run` on real photos and on a synthetic dataset.

use std::io::Cursor;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use image::{ImageFormat, RgbImage};
use vlmpipe::stages::eval::{CSV_HEADER, EvalError, EvalRecord, MapImageSource, write_csv_export};

use crate::support::{assert_json_close, offline_vlmpipe};

fn jpeg(width: u32, height: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 128]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg)
        .expect("encode jpeg");
    out
}

fn record(id: &str, truth: &str, raw: &str, parsed: Option<&str>) -> EvalRecord {
    let valid = parsed.is_some();
    EvalRecord {
        row_id: id.to_string(),
        image_id: format!("{id}.jpg"),
        ground_truth: truth.to_string(),
        raw_output: raw.to_string(),
        parsed_label: parsed.map(str::to_string),
        valid,
        correct: parsed == Some(truth),
        latency_ms: 1.0,
        batch_size: 1,
        tokens_generated: 1,
        class_probs: None,
    }
}

#[test]
fn csv_export_matches_the_tutorial_format() {
    let mut images = MapImageSource::new();
    images.insert("a.jpg", jpeg(37, 21));
    images.insert("b.jpg", jpeg(8, 64));
    images.insert("c.jpg", jpeg(5, 5));
    let records = [
        record("a", "cat", "cat", Some("cat")),
        record("b", "dog", "  Cat. ", Some("cat")),
        record("c", "dog", "a pug, \"probably\"\nor not", None),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("predictions.csv");
    write_csv_export(&path, &records, &images).expect("export");

    let mut reader = csv::Reader::from_path(&path).expect("open csv");
    let header: Vec<String> = reader
        .headers()
        .expect("header")
        .iter()
        .map(str::to_string)
        .collect();
    assert_eq!(header, CSV_HEADER);
    assert_eq!(
        header,
        ["image_base64", "ground_truth", "predicted", "correct"]
    );
    let rows: Vec<csv::StringRecord> = reader.records().collect::<Result<_, _>>().expect("rows");
    assert_eq!(rows.len(), 3);
    let expected = [
        ("cat", "cat", "True", (37, 21)),
        ("dog", "cat", "False", (8, 64)),
        // Invalid answers keep the raw output, quotes and newline included.
        ("dog", "a pug, \"probably\"\nor not", "False", (5, 5)),
    ];
    for (row, (truth, predicted, correct, size)) in rows.iter().zip(expected) {
        assert_eq!(&row[1], truth);
        assert_eq!(&row[2], predicted);
        assert_eq!(&row[3], correct);
        // The cell is the JPEG itself, not a re-encoding of its pixels.
        let bytes = STANDARD.decode(&row[0]).expect("base64");
        assert_eq!(bytes, jpeg(size.0, size.1));
    }
}

#[test]
fn csv_export_without_the_image_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("predictions.csv");
    let err = write_csv_export(
        &path,
        &[record("x", "cat", "cat", Some("cat"))],
        &MapImageSource::new(),
    )
    .expect_err("missing image");
    assert!(matches!(err, EvalError::MissingImage { .. }), "{err}");

    let mut images = MapImageSource::new();
    images.insert("x.jpg", b"not an image".to_vec());
    // Not an image format at all: the notebooks could not open it.
    let err = write_csv_export(&path, &[record("x", "cat", "cat", Some("cat"))], &images)
        .expect_err("undecodable image");
    assert!(matches!(err, EvalError::Image { .. }), "{err}");
}

#[test]
fn eval_outputs_are_written_under_fixed_names_and_read_back() {
    use vlmpipe::stages::eval::{
        MetricsOptions, compute_metrics, read_metrics_json, read_records_parquet,
        write_eval_outputs,
    };
    let labels = vec!["cat".to_string(), "dog".to_string()];
    let records = vec![
        record("a", "cat", "cat", Some("cat")),
        record("b", "dog", "pug", None),
    ];
    let metrics = compute_metrics(&records, &labels, &MetricsOptions::default()).expect("metrics");
    let dir = tempfile::tempdir().expect("tempdir");
    // A plain closure is an image source: the lead plugs the dataset's image store in this way.
    let images = |id: &str| (id.ends_with(".jpg")).then(|| jpeg(4, 3));
    let files = write_eval_outputs(dir.path(), &labels, &records, &metrics, &images)
        .expect("write outputs");
    let names: Vec<String> = files
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .collect();
    assert_eq!(
        names,
        ["records.parquet", "metrics.json", "predictions.csv"]
    );
    let table = read_records_parquet(&files[0]).expect("records");
    assert_eq!((table.labels, table.records), (labels, records));
    assert_json_close(&read_metrics_json(&files[1]).expect("metrics"), &metrics);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[1]).expect("read")).expect("json");
    for key in ["accuracy", "invalid_rate", "per_class", "confusion_matrix"] {
        assert!(json.get(key).is_some(), "metrics.json lacks `{key}`");
    }
}

/// Runs `vlmpipe run pipe.vp` in `dir` offline with the cache and evals inside it; returns the
/// run summary.
fn run_pipeline(dir: &Path, pipeline: &str) -> serde_json::Value {
    std::fs::write(dir.join("pipe.vp"), pipeline).expect("write pipeline");
    let out = offline_vlmpipe(dir)
        .args([
            "run",
            "pipe.vp",
            "--quiet",
            "--summary-json",
            "summary.json",
        ])
        .args(["--cache-dir", "cache", "--evals-dir", "evals"])
        .output()
        .expect("spawn vlmpipe");
    assert!(
        out.status.success(),
        "vlmpipe run failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(dir.join("summary.json")).expect("summary"))
        .expect("summary json")
}

/// `(image bytes, ground truth)` of every row of a `predictions.csv`.
fn csv_images(path: &Path) -> Vec<(Vec<u8>, String)> {
    let mut reader = csv::Reader::from_path(path).expect("open csv");
    reader
        .records()
        .map(|row| {
            let row = row.expect("csv row");
            (STANDARD.decode(&row[0]).expect("base64"), row[1].to_owned())
        })
        .collect()
}

/// A tiny random model answering about every row of `data`: the CSV's images are what matters.
fn eval_pipeline(labels: &str, dataset: &str) -> String {
    format!(
        r#"
pipeline csv_images {{ seed = 1 }}
labels animals = {labels}
{dataset}
prompt ask {{ user = "Cat or dog?" }}
model tiny = init(preset: "tiny", seed: 1)
eval look {{ model = tiny  data = pics  prompt = ask  labels = animals  max_new_tokens = 2  batch_size = 3 }}
"#
    )
}

/// Real photos (issue 13, item 15): every `image_base64` cell decodes to exactly the bytes of
/// the photo it stands for (the JPEG file, not a PNG re-encoding of the `image` crate's pixels).
#[test]
fn predictions_csv_embeds_the_original_photo_files() {
    let Some(shared) = crate::support::shared_path("data/cats_vs_dogs") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut originals = Vec::new();
    for class in ["cat", "dog"] {
        let folder = dir.path().join("photos").join(class);
        std::fs::create_dir_all(&folder).expect("mkdir");
        for name in ["0001.jpg", "0002.jpg", "0003.jpg"] {
            let bytes = std::fs::read(shared.join(class).join(name)).expect("shared photo");
            std::fs::write(folder.join(name), &bytes).expect("copy photo");
            originals.push((bytes, class.to_owned()));
        }
    }
    run_pipeline(
        dir.path(),
        &eval_pipeline(
            r#"["cat", "dog"]"#,
            r#"dataset pics { source = folder("photos")  label = "class"  labels = animals }"#,
        ),
    );
    let csv_path = dir.path().join("evals/look/predictions.csv");
    let mut cells = csv_images(&csv_path);
    let csv_size = std::fs::metadata(&csv_path).expect("csv").len() as usize;
    cells.sort();
    originals.sort();
    assert_eq!(cells.len(), originals.len());
    for ((got, got_class), (want, want_class)) in cells.iter().zip(&originals) {
        assert_eq!(got_class, want_class);
        assert!(got == want, "a CSV image is not its original file");
    }
    // Base64 of the JPEGs plus short text columns: about 4/3 of the photos, not 7x.
    let photo_bytes: usize = originals.iter().map(|(b, _)| b.len()).sum();
    assert!(
        csv_size < photo_bytes * 3 / 2,
        "{csv_size} bytes of CSV for {photo_bytes} bytes of photos"
    );
}

/// A synthetic dataset: each row's cell is the image store's entry for that row's `image_id`,
/// i.e. the exact bytes the eval decoded for the model.
#[test]
fn predictions_csv_embeds_the_bytes_the_model_read() {
    use vlmpipe::stages::data::ImageStore;
    use vlmpipe::stages::eval::read_records_parquet;
    let dir = tempfile::tempdir().expect("tempdir");
    let summary = run_pipeline(
        dir.path(),
        &eval_pipeline(
            r#"["red circle", "blue circle"]"#,
            r#"dataset pics {
  source = synthetic(kind: "shapes", n: 8, seed: 1, size: 32, colors: "red,blue", shapes: "circle")
  label = "class"
  labels = animals
}"#,
        ),
    );
    let images_path = summary["stages"]
        .as_array()
        .and_then(|stages| stages.iter().find(|s| s["name"] == "pics"))
        .and_then(|s| s["outputs"].as_array())
        .and_then(|o| {
            o.iter()
                .filter_map(serde_json::Value::as_str)
                .find(|p| p.ends_with("/images.parquet"))
        })
        .map(std::path::PathBuf::from)
        .expect("the dataset's images.parquet");
    let store = ImageStore::open(&images_path).expect("image store");
    let records = read_records_parquet(&dir.path().join("evals/look/records.parquet"))
        .expect("records")
        .records;
    let cells = csv_images(&dir.path().join("evals/look/predictions.csv"));
    assert_eq!(cells.len(), 8);
    assert_eq!(cells.len(), records.len());
    for ((bytes, truth), record) in cells.iter().zip(&records) {
        assert_eq!(truth, &record.ground_truth);
        let stored = store.get(&record.image_id).expect("stored image");
        assert!(
            bytes == &stored.bytes,
            "row `{}`: the CSV image differs from the bytes the model decoded",
            record.row_id
        );
    }
}

/// Issue 13, item 16: `latency_ms` is each sample's own cost, not its batch's average, and
/// `batch_size` says how many samples shared the generation; the metrics' percentiles come
/// from those per-sample values.
#[test]
fn records_hold_per_sample_latency_and_the_batch_size() {
    use vlmpipe::stages::eval::{read_metrics_json, read_records_parquet};
    let dir = tempfile::tempdir().expect("tempdir");
    // 8 rows in batches of 3: 3, 3, 2.
    let summary = run_pipeline(
        dir.path(),
        &eval_pipeline(
            r#"["red circle", "blue circle"]"#,
            r#"dataset pics {
  source = synthetic(kind: "shapes", n: 8, seed: 1, size: 32, colors: "red,blue", shapes: "circle")
  label = "class"
  labels = animals
}"#,
        ),
    );
    let records = read_records_parquet(&dir.path().join("evals/look/records.parquet"))
        .expect("records")
        .records;
    let sizes: Vec<u32> = records.iter().map(|r| r.batch_size).collect();
    assert_eq!(sizes, [3, 3, 3, 3, 3, 3, 2, 2]);
    for batch in records.chunks(3) {
        let first = batch[0].latency_ms;
        assert!(
            batch.iter().any(|r| r.latency_ms != first),
            "every sample of a batch has latency {first} ms: a batch average, not a cost"
        );
        assert!(batch.iter().all(|r| r.latency_ms > 0.0));
    }
    // The costs add up to no more than the eval's own wall time.
    let total_ms: f64 = records.iter().map(|r| r.latency_ms).sum();
    let stage_s = summary["stages"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "look"))
        .and_then(|s| s["seconds"].as_f64())
        .expect("eval seconds");
    assert!(total_ms <= stage_s * 1000.0, "{total_ms} ms > {stage_s} s");
    let metrics = read_metrics_json(&dir.path().join("evals/look/metrics.json")).expect("metrics");
    let mut latencies: Vec<f64> = records.iter().map(|r| r.latency_ms).collect();
    latencies.sort_by(f64::total_cmp);
    assert!(
        metrics.latency_ms_p50 >= latencies[0] && metrics.latency_ms_p50 <= latencies[7],
        "p50 {} outside the samples' latencies {latencies:?}",
        metrics.latency_ms_p50
    );
    assert!(metrics.latency_ms_p95 >= metrics.latency_ms_p50);
}

/// The rows of the first Markdown table after `heading` in `text`: its cells, trimmed, with
/// backticks removed; the header and separator rows left out.
fn markdown_table(text: &str, heading: &str) -> Vec<Vec<String>> {
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("no `{heading}` in docs/records.md"));
    text[start..]
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2)
        .map(|line| {
            line.trim_matches('|')
                .split(" | ")
                .map(|cell| cell.trim().replace('`', ""))
                .collect()
        })
        .collect()
}

/// Issue 13, item 17: `docs/records.md` documents exactly the columns (names, types, nullability,
/// in order) and the schema metadata keys that `records.parquet` has.
#[test]
fn records_doc_matches_the_written_schema() {
    use vlmpipe::stages::eval::records_schema;
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/records.md"))
            .expect("docs/records.md");
    let schema = records_schema(&["a".to_owned(), "b".to_owned()]);
    let actual: Vec<Vec<String>> = schema
        .fields()
        .iter()
        .map(|f| {
            vec![
                f.name().clone(),
                arrow_type_name(f.data_type()),
                if f.is_nullable() { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    let documented: Vec<Vec<String>> = markdown_table(&doc, "## `records.parquet`")
        .into_iter()
        .map(|row| row.into_iter().take(3).collect())
        .collect();
    assert_eq!(
        documented, actual,
        "docs/records.md disagrees with records_schema"
    );
    let mut keys: Vec<String> = schema.metadata().keys().cloned().collect();
    keys.sort();
    let documented_keys: Vec<String> = markdown_table(&doc, "Schema metadata:")
        .into_iter()
        .map(|row| row[0].clone())
        .collect();
    assert_eq!(documented_keys, keys);
    // The CSV section names the exact header.
    assert!(
        doc.contains(&CSV_HEADER.join(", ")),
        "predictions.csv header"
    );
}

/// The name docs/records.md uses for an Arrow type.
fn arrow_type_name(t: &arrow::datatypes::DataType) -> String {
    use arrow::datatypes::DataType;
    match t {
        DataType::Utf8 => "utf8".to_owned(),
        DataType::Boolean => "bool".to_owned(),
        DataType::Float32 => "float32".to_owned(),
        DataType::Float64 => "float64".to_owned(),
        DataType::UInt32 => "uint32".to_owned(),
        DataType::List(item) => format!("list<{}>", arrow_type_name(item.data_type())),
        other => panic!("name the type {other:?} here and in docs/records.md"),
    }
}
