//! Row tables: the `rows.parquet` schema shared by datasets, split parts and samples.
//!
//! Columns: `row_id` (stable id of the sample), `image_id` (key into the dataset's image store),
//! `label` (class name), `label_index` (position of `label` in the class list), `image_error`
//! (why the row has no usable image, null otherwise: such a row has an empty `image_id`, and
//! travels through splits and samples so an eval reports it as an error row). The class list
//! travels in the file's key-value metadata (`vlmpipe.classes`, a JSON array) so every
//! downstream table knows the full label set even when a sample misses a class.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use super::DataError;
use crate::file_error::FileError;

const CLASSES_KEY: &str = "vlmpipe.classes";

/// One row of a row table.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct RowRecord {
    pub row_id: String,
    pub image_id: String,
    pub label: String,
    pub label_index: u32,
    /// Why the row's image could not be read (its `image_id` is then empty); `None` when usable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_error: Option<String>,
}

/// A row table with its class list.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RowTable {
    pub rows: Vec<RowRecord>,
    /// Every class of the dataset, in `label_index` order.
    pub classes: Vec<String>,
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("row_id", DataType::Utf8, false),
        Field::new("image_id", DataType::Utf8, false),
        Field::new("label", DataType::Utf8, false),
        Field::new("label_index", DataType::UInt32, false),
        Field::new("image_error", DataType::Utf8, true),
    ]))
}

/// Writes `table` to `path` as Parquet.
pub fn write_rows(path: &Path, table: &RowTable) -> Result<(), DataError> {
    let classes = serde_json::to_string(&table.classes)
        .map_err(|e| DataError::Param(format!("class list is not serialisable: {e}")))?;
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(vec![KeyValue::new(CLASSES_KEY.to_owned(), classes)]))
        .build();
    let file = File::create(path).map_err(FileError::create(path))?;
    let mut writer =
        ArrowWriter::try_new(file, schema(), Some(props)).map_err(DataError::parquet(path))?;
    // Chunked so a huge table never becomes one giant batch.
    for chunk in table.rows.chunks(65_536) {
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    chunk.iter().map(|r| r.row_id.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    chunk.iter().map(|r| r.image_id.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    chunk.iter().map(|r| r.label.as_str()),
                )),
                Arc::new(UInt32Array::from_iter_values(
                    chunk.iter().map(|r| r.label_index),
                )),
                Arc::new(StringArray::from_iter(
                    chunk.iter().map(|r| r.image_error.as_deref()),
                )),
            ],
        )
        .map_err(DataError::arrow(path))?;
        writer.write(&batch).map_err(DataError::parquet(path))?;
    }
    writer.close().map_err(DataError::parquet(path))?;
    Ok(())
}

/// Reads a row table written by [`write_rows`].
pub fn read_rows(path: &Path) -> Result<RowTable, DataError> {
    let file = File::open(path).map_err(FileError::read(path))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(DataError::parquet(path))?;
    let bad = |message: String| DataError::BadRowTable {
        path: path.to_path_buf(),
        message,
    };
    let classes_json = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == CLASSES_KEY))
        .and_then(|k| k.value.clone())
        .ok_or_else(|| bad(format!("no `{CLASSES_KEY}` metadata")))?;
    let classes: Vec<String> = serde_json::from_str(&classes_json).map_err(|e| {
        bad(format!(
            "`{CLASSES_KEY}` is not a JSON list of strings: {e}"
        ))
    })?;
    let reader = builder.build().map_err(DataError::parquet(path))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(DataError::arrow(path))?;
        let text = |name: &str| -> Result<&StringArray, DataError> {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| bad(format!("column `{name}` missing or not utf8")))
        };
        let (row_id, image_id, label) = (text("row_id")?, text("image_id")?, text("label")?);
        let index = batch
            .column_by_name("label_index")
            .and_then(|c| c.as_any().downcast_ref::<UInt32Array>())
            .ok_or_else(|| bad("column `label_index` missing or not uint32".to_owned()))?;
        let image_error = text("image_error")?;
        for i in 0..batch.num_rows() {
            if row_id.is_null(i) || image_id.is_null(i) || label.is_null(i) || index.is_null(i) {
                return Err(bad(format!("null value in row {i}")));
            }
            rows.push(RowRecord {
                row_id: row_id.value(i).to_owned(),
                image_id: image_id.value(i).to_owned(),
                label: label.value(i).to_owned(),
                label_index: index.value(i),
                image_error: (!image_error.is_null(i)).then(|| image_error.value(i).to_owned()),
            });
        }
    }
    Ok(RowTable { rows, classes })
}
