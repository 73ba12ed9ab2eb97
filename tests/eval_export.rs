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
