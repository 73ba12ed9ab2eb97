//! Fixtures shared by the data and cache integration tests: encoded images and Parquet files in
//! the Hugging Face Hub layout, built in temp folders (nothing is copied from `../shared`).

#![allow(dead_code)]

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, StructArray};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use image::{DynamicImage, ImageFormat};
use parquet::arrow::ArrowWriter;

/// An encoded solid-colour RGB image; `shade` makes the bytes distinct.
pub fn rgb_jpeg(w: u32, h: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([shade, 255 - shade, 90]));
    encode(DynamicImage::ImageRgb8(img), ImageFormat::Jpeg)
}

/// An encoded grayscale JPEG (PIL mode `L`).
pub fn gray_jpeg(w: u32, h: u32, shade: u8) -> Vec<u8> {
    let img = image::GrayImage::from_pixel(w, h, image::Luma([shade]));
    encode(DynamicImage::ImageLuma8(img), ImageFormat::Jpeg)
}

/// An encoded RGBA PNG (PIL mode `RGBA`).
pub fn rgba_png(w: u32, h: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbaImage::from_pixel(w, h, image::Rgba([shade, 10, 20, 128]));
    encode(DynamicImage::ImageRgba8(img), ImageFormat::Png)
}

pub fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format)
        .expect("encoding a test image");
    out.into_inner()
}

/// Writes a Parquet file shaped like a Hub image dataset: `image` struct {bytes, path} and an
/// int64 `labels` column. `None` bytes make a null image; `None` label a null label.
pub fn write_hub_parquet(path: &Path, rows: &[(Option<Vec<u8>>, Option<i64>)]) {
    let struct_fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", DataType::Struct(struct_fields.clone()), true),
        Field::new("labels", DataType::Int64, true),
    ]));
    let bytes: BinaryArray = rows.iter().map(|r| r.0.as_deref()).collect();
    let paths: StringArray = rows
        .iter()
        .enumerate()
        .map(|(i, _)| Some(format!("{i}.jpg")))
        .collect();
    let image = StructArray::new(
        struct_fields,
        vec![Arc::new(bytes) as ArrayRef, Arc::new(paths) as ArrayRef],
        None,
    );
    let labels: Int64Array = rows.iter().map(|r| r.1).collect();
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(image), Arc::new(labels)])
        .expect("test batch");
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("test folder");
    }
    let file = std::fs::File::create(path).expect("test parquet file");
    let mut writer = ArrowWriter::try_new(file, schema, None).expect("parquet writer");
    writer.write(&batch).expect("parquet write");
    writer.close().expect("parquet close");
}

/// Writes a Parquet file with a plain binary `img` column and a string `class` column.
pub fn write_binary_parquet(path: &Path, rows: &[(Vec<u8>, &str)]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("img", DataType::Binary, false),
        Field::new("class", DataType::Utf8, false),
    ]));
    let bytes: BinaryArray = rows.iter().map(|r| Some(r.0.as_slice())).collect();
    let class: StringArray = rows.iter().map(|r| Some(r.1)).collect();
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(bytes), Arc::new(class)])
        .expect("test batch");
    let file = std::fs::File::create(path).expect("test parquet file");
    let mut writer = ArrowWriter::try_new(file, schema, None).expect("parquet writer");
    writer.write(&batch).expect("parquet write");
    writer.close().expect("parquet close");
}

/// Reads an all-utf8 table (errors, filtered) as rows of strings.
pub fn read_text_table(path: &Path) -> Vec<Vec<String>> {
    let file = std::fs::File::open(path).expect("table file");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("parquet")
        .build()
        .expect("reader");
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.expect("batch");
        for i in 0..batch.num_rows() {
            rows.push(
                batch
                    .columns()
                    .iter()
                    .map(|c| {
                        c.as_any()
                            .downcast_ref::<StringArray>()
                            .expect("utf8 column")
                            .value(i)
                            .to_owned()
                    })
                    .collect(),
            );
        }
    }
    rows
}

/// A commit hash for snapshots in a Hub cache built on disk (any 40 hex digits).
pub const HUB_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Puts `files` into `hub/<folder>/snapshots/HUB_COMMIT/` (e.g. folder
/// `models--LiquidAI--LFM2-VL-450M`) and points `refs/main` at it, as `huggingface_hub` does.
pub fn put_hub_snapshot(hub: &Path, folder: &str, files: &[(String, Vec<u8>)]) {
    let base = hub.join(folder);
    let snapshot = base.join("snapshots").join(HUB_COMMIT);
    for (rel, bytes) in files {
        let path = snapshot.join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("snapshot folder");
        std::fs::write(path, bytes).expect("snapshot file");
    }
    std::fs::create_dir_all(base.join("refs")).expect("refs");
    std::fs::write(base.join("refs/main"), HUB_COMMIT).expect("refs/main");
}

/// The `tiny-thumb` reference checkpoint's files (random weights, LFM2-VL-450M's processor
/// settings), as a model repo holds them.
pub fn tiny_checkpoint_files() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference/checkpoints/tiny-thumb");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("tiny-thumb fixture")
        .filter_map(Result::ok)
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("fixture file"),
            )
        })
        .collect();
    files.sort();
    files
}
