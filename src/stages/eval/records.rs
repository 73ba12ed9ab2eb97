//! Per-sample evaluation records and their Parquet form.
//!
//! One row per evaluated sample. The label list travels in the Parquet schema metadata
//! (`vlmpipe.labels`, a JSON array) because `class_probs` is positional and means nothing without it.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float32Builder, Float64Array, ListBuilder, RecordBatch,
    StringArray, UInt32Array,
};
use arrow::datatypes::{DataType, Field, Float32Type, Float64Type, Schema, UInt32Type};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use super::EvalError;
use crate::file_error::FileError;

/// Schema metadata key holding the label list as a JSON array of strings.
const LABELS_KEY: &str = "vlmpipe.labels";

/// The outcome of evaluating one sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Stable id of the dataset row (matches records across stages in comparisons).
    pub row_id: String,
    /// Key of the image in the dataset's image store (see [`super::ImageSource`]); empty when the
    /// sample's image could not be read or decoded (an error row), so nothing shows its content.
    pub image_id: String,
    /// The true label; must be in the label set.
    pub ground_truth: String,
    /// The model's text, verbatim.
    pub raw_output: String,
    /// The label parsed from `raw_output`, when parsing found one.
    pub parsed_label: Option<String>,
    /// Whether `parsed_label` is in the label set.
    pub valid: bool,
    /// `valid && parsed_label == ground_truth`.
    pub correct: bool,
    /// What this sample cost, in milliseconds: its own preparation (image decoding, chat
    /// template, image processing, tokenising, vision tower, timed alone) plus its own label scoring, or its
    /// equal share of the batched generation it took part in. With `batch_size` 1 it is the
    /// sample's own wall time from prompt to answer.
    pub latency_ms: f64,
    /// How many samples shared this sample's model call: the generation batch (1 when it ran
    /// alone, as label scoring always does); 0 when the model never ran for it (its image or
    /// prompt failed).
    pub batch_size: u32,
    /// Tokens the model generated for this sample.
    pub tokens_generated: u32,
    /// With label scoring: the probability of every class, aligned with the label list.
    pub class_probs: Option<Vec<f32>>,
}

/// Records read back from Parquet, with the label list they were written with.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordTable {
    /// The label set, in the order `class_probs` uses.
    pub labels: Vec<String>,
    /// The rows, in file order.
    pub records: Vec<EvalRecord>,
}

/// The Arrow schema of a records file for `labels`.
pub fn records_schema(labels: &[String]) -> Schema {
    let fields = vec![
        Field::new("row_id", DataType::Utf8, false),
        Field::new("image_id", DataType::Utf8, false),
        Field::new("ground_truth", DataType::Utf8, false),
        Field::new("raw_output", DataType::Utf8, false),
        Field::new("parsed_label", DataType::Utf8, true),
        Field::new("valid", DataType::Boolean, false),
        Field::new("correct", DataType::Boolean, false),
        Field::new("latency_ms", DataType::Float64, false),
        Field::new("batch_size", DataType::UInt32, false),
        Field::new("tokens_generated", DataType::UInt32, false),
        Field::new_list(
            "class_probs",
            Field::new_list_field(DataType::Float32, true),
            true,
        ),
    ];
    // Serialising a Vec<String> cannot fail; fall back to an empty list rather than panic.
    let labels_json = serde_json::to_string(labels).unwrap_or_else(|_| "[]".to_string());
    Schema::new_with_metadata(fields, [(LABELS_KEY, labels_json)])
}

/// Writes `records` (with their label list) to a zstd-compressed Parquet file at `path`.
pub fn write_records_parquet(
    path: &Path,
    labels: &[String],
    records: &[EvalRecord],
) -> Result<(), EvalError> {
    let schema = Arc::new(records_schema(labels));
    let schema_err = |reason: String| EvalError::Schema {
        path: path.to_path_buf(),
        reason,
    };
    let mut probs = ListBuilder::new(Float32Builder::new())
        .with_field(Arc::new(Field::new_list_field(DataType::Float32, true)));
    for record in records {
        match &record.class_probs {
            Some(values) => {
                probs.values().append_slice(values);
                probs.append(true);
            }
            None => probs.append(false),
        }
    }
    let strings = |get: fn(&EvalRecord) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(records.iter().map(get)))
    };
    let columns: Vec<ArrayRef> = vec![
        strings(|r| &r.row_id),
        strings(|r| &r.image_id),
        strings(|r| &r.ground_truth),
        strings(|r| &r.raw_output),
        Arc::new(StringArray::from_iter(
            records.iter().map(|r| r.parsed_label.as_deref()),
        )),
        Arc::new(BooleanArray::from_iter(
            records.iter().map(|r| Some(r.valid)),
        )),
        Arc::new(BooleanArray::from_iter(
            records.iter().map(|r| Some(r.correct)),
        )),
        Arc::new(Float64Array::from_iter_values(
            records.iter().map(|r| r.latency_ms),
        )),
        Arc::new(UInt32Array::from_iter_values(
            records.iter().map(|r| r.batch_size),
        )),
        Arc::new(UInt32Array::from_iter_values(
            records.iter().map(|r| r.tokens_generated),
        )),
        Arc::new(probs.finish()),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| schema_err(format!("cannot build record batch: {e}")))?;
    let file = File::create(path).map_err(FileError::create(path))?;
    let parquet_err = |source| EvalError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(props)).map_err(parquet_err)?;
    writer.write(&batch).map_err(parquet_err)?;
    writer.close().map_err(parquet_err)?;
    Ok(())
}

/// Reads a records file written by [`write_records_parquet`].
pub fn read_records_parquet(path: &Path) -> Result<RecordTable, EvalError> {
    let file = File::open(path).map_err(FileError::read(path))?;
    let parquet_err = |source| EvalError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let schema_err = |reason: String| EvalError::Schema {
        path: path.to_path_buf(),
        reason,
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_err)?;
    let labels: Vec<String> = match builder.schema().metadata().get(LABELS_KEY) {
        Some(json) => serde_json::from_str(json).map_err(|e| {
            schema_err(format!("metadata `{LABELS_KEY}` is not a string list: {e}"))
        })?,
        None => return Err(schema_err(format!("metadata `{LABELS_KEY}` is missing"))),
    };
    let reader = builder.build().map_err(parquet_err)?;
    let mut records = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| schema_err(format!("cannot decode a batch: {e}")))?;
        read_batch(&batch, &mut records).map_err(schema_err)?;
    }
    Ok(RecordTable { labels, records })
}

/// Appends the rows of one batch to `out`; errors name the offending column.
fn read_batch(batch: &RecordBatch, out: &mut Vec<EvalRecord>) -> Result<(), String> {
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| format!("column `{name}` is missing"))
    };
    let string = |name: &str| {
        column(name)?
            .as_string_opt::<i32>()
            .ok_or_else(|| format!("column `{name}` is not utf8"))
    };
    let boolean = |name: &str| {
        column(name)?
            .as_boolean_opt()
            .ok_or_else(|| format!("column `{name}` is not boolean"))
    };
    let row_id = string("row_id")?;
    let image_id = string("image_id")?;
    let ground_truth = string("ground_truth")?;
    let raw_output = string("raw_output")?;
    let parsed_label = string("parsed_label")?;
    let valid = boolean("valid")?;
    let correct = boolean("correct")?;
    let latency = column("latency_ms")?
        .as_primitive_opt::<Float64Type>()
        .ok_or("column `latency_ms` is not float64")?;
    let batch_size = column("batch_size")?
        .as_primitive_opt::<UInt32Type>()
        .ok_or("column `batch_size` is not uint32")?;
    let tokens = column("tokens_generated")?
        .as_primitive_opt::<UInt32Type>()
        .ok_or("column `tokens_generated` is not uint32")?;
    let probs = column("class_probs")?
        .as_list_opt::<i32>()
        .ok_or("column `class_probs` is not a list")?;
    for i in 0..batch.num_rows() {
        let class_probs = if probs.is_null(i) {
            None
        } else {
            let values = probs.value(i);
            let values = values
                .as_primitive_opt::<Float32Type>()
                .ok_or("column `class_probs` does not hold float32")?;
            Some(values.iter().map(|v| v.unwrap_or(f32::NAN)).collect())
        };
        out.push(EvalRecord {
            row_id: row_id.value(i).to_string(),
            image_id: image_id.value(i).to_string(),
            ground_truth: ground_truth.value(i).to_string(),
            raw_output: raw_output.value(i).to_string(),
            parsed_label: (!parsed_label.is_null(i)).then(|| parsed_label.value(i).to_string()),
            valid: valid.value(i),
            correct: correct.value(i),
            latency_ms: latency.value(i),
            batch_size: batch_size.value(i),
            tokens_generated: tokens.value(i),
            class_probs,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file_error::FileAction;

    fn record(i: usize, probs: Option<Vec<f32>>, parsed: Option<&str>) -> EvalRecord {
        EvalRecord {
            row_id: format!("r{i}"),
            image_id: format!("img/{i}.jpg"),
            ground_truth: if i.is_multiple_of(2) { "cat" } else { "dog" }.to_string(),
            raw_output: format!("answer \"{i}\" with ünïcode"),
            parsed_label: parsed.map(str::to_string),
            valid: parsed.is_some(),
            correct: parsed == Some("cat") && i.is_multiple_of(2),
            latency_ms: 12.5 + i as f64,
            batch_size: i as u32,
            tokens_generated: i as u32,
            class_probs: probs,
        }
    }

    #[test]
    fn parquet_round_trip_keeps_every_field_and_the_labels() {
        let labels = vec!["cat".to_string(), "dog".to_string()];
        let records = vec![
            record(0, Some(vec![0.75, 0.25]), Some("cat")),
            record(1, None, None),
            record(2, Some(vec![]), Some("dog")),
            record(3, Some(vec![0.5, 0.5]), Some("cat")),
        ];
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.parquet");
        write_records_parquet(&path, &labels, &records).expect("write");
        let table = read_records_parquet(&path).expect("read");
        assert_eq!(table.labels, labels);
        assert_eq!(table.records, records);
    }

    #[test]
    fn empty_record_set_round_trips() {
        let labels = vec!["only".to_string()];
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.parquet");
        write_records_parquet(&path, &labels, &[]).expect("write");
        let table = read_records_parquet(&path).expect("read");
        assert_eq!(table.labels, labels);
        assert!(table.records.is_empty());
    }

    #[test]
    fn reading_a_missing_file_is_an_io_error() {
        let err = read_records_parquet(Path::new("/nonexistent/records.parquet"))
            .expect_err("missing file");
        assert!(
            matches!(&err, EvalError::File(e) if e.action == FileAction::Read),
            "{err}"
        );
    }
}
