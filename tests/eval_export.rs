//! The tutorial-format CSV read back with the csv crate: exact header, True/False, PNG cells.

use std::io::Cursor;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use image::{ImageFormat, RgbImage};
use vlmpipe::stages::eval::{CSV_HEADER, EvalError, EvalRecord, MapImageSource, write_csv_export};

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
        let png = STANDARD.decode(&row[0]).expect("base64");
        assert_eq!(image::guess_format(&png).expect("format"), ImageFormat::Png);
        let decoded = image::load_from_memory(&png).expect("decode png");
        assert_eq!((decoded.width(), decoded.height()), size);
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

/// Equality of two serialisable values up to 1e-12 relative error in floats: serde_json's default
/// parser may differ from the written decimal in the last bit.
fn assert_json_close<T: serde::Serialize>(a: &T, b: &T) {
    fn walk(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
        use serde_json::Value;
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => {
                let (x, y) = (
                    x.as_f64().unwrap_or(f64::NAN),
                    y.as_f64().unwrap_or(f64::NAN),
                );
                assert!(
                    (x - y).abs() <= 1e-12 * x.abs().max(1.0),
                    "{at}: {x} != {y}"
                );
            }
            (Value::Array(x), Value::Array(y)) => {
                assert_eq!(x.len(), y.len(), "{at}: lengths");
                for (i, (x, y)) in x.iter().zip(y).enumerate() {
                    walk(x, y, &format!("{at}[{i}]"));
                }
            }
            (Value::Object(x), Value::Object(y)) => {
                assert_eq!(x.len(), y.len(), "{at}: keys");
                for (k, x) in x {
                    walk(x, &y[k], &format!("{at}.{k}"));
                }
            }
            _ => assert_eq!(a, b, "{at}"),
        }
    }
    let a = serde_json::to_value(a).expect("serialise");
    let b = serde_json::to_value(b).expect("serialise");
    walk(&a, &b, "$");
}
