//! Data stages: sources → a dataset (rows + one image store), filters, splits, samples.
//!
//! A dataset stage reads a [`SourceSpec`] and writes four Parquet files into a folder (a cache
//! entry's temp folder, given by the executor):
//!
//! ```text
//! rows.parquet      row_id, image_id, label, label_index, image_error   (the table everything
//!                   downstream uses; a row whose image failed has no image_id and its reason)
//! images.parquet    image_id, bytes, width, height, mode, format   (each distinct image once)
//! errors.parquet    row_id, reason      (unreadable or missing images; never silently lost)
//! filtered.parquet  row_id, filter, detail   (rows removed by `keep`, `max_image_size`, `drop`)
//! ```
//!
//! Splits, shuffles and samples are row tables (the `rows.parquet` schema) that reference images
//! by `image_id`; image bytes are never copied. Readers fetch images from the dataset's
//! `images.parquet` through [`ImageStore`].
//!
//! **Architecture Invariant**: nothing here knows the DSL or the cache; inputs are typed specs and
//! paths, outputs are Parquet files and reports. Only the stage side (`stage.rs`, the `dataset`
//! stage, and `input.rs`, where other stages' rows are) sees the executor's [`crate::exec`] types.

mod bench;
mod image_probe;
mod image_store;
mod ingest;
mod input;
mod rows;
mod shard;
mod source;
mod split;
mod stage;
mod synthetic;

pub use crate::rng::SplitMix64;
pub use bench::{IngestBench, bench_ingest_folder};
pub use image_probe::{ImageCheck, ImageInfo, probe_image};
pub use image_store::{ImageStore, StoredImage};
pub use ingest::{DatasetSpec, FilterSpec, IngestReport, ingest};
pub use input::DataInput;
pub use rows::{RowRecord, RowTable, read_rows, write_rows};
pub(crate) use shard::{ShardIngest, ShardPart, ingest_shard, merge_shards};
pub use source::{LabelSpec, SourceSpec};
pub use split::{SplitPart, SplitSpec, part_file_name, sample, shuffle, stratified_split};
pub use stage::{DatasetConfig, DatasetStage, HfSource, ingest_warnings};
pub use synthetic::{Shape, SyntheticSpec};

use crate::file_error::FileError;
use std::path::PathBuf;

/// Rows of a dataset (and of every split part or sample).
pub const ROWS_FILE: &str = "rows.parquet";
/// The image store of a dataset.
pub const IMAGES_FILE: &str = "images.parquet";
/// Rows whose image could not be read or decoded (they are in `rows.parquet` too, without an
/// image).
pub const ERRORS_FILE: &str = "errors.parquet";
/// Rows removed by a filter.
pub const FILTERED_FILE: &str = "filtered.parquet";

/// Version of the data stages' output; part of their fingerprints (bump when outputs change).
// 2: folder entries that cannot be read (dangling links, loops) are error rows, not a failed
//    stage; a full check decodes as the model does, with the pixel cap.
// 3: image paths outside what the read policy allows (a pipeline's folder, the Hub cache,
//    `--allow-read`) are error rows, not read.
// 4: rows whose image fails at ingest stay in `rows.parquet` (no image, `image_error` says
//    why), so splits carry them and an eval reports each as an error row; FIFOs and other
//    non-regular files named like images are error rows; skipped non-images are counted.
pub const DATA_CODE_VERSION: u32 = 4;

/// Errors of the data stages. Bad images are not errors (they go to `errors.parquet`).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("cannot read or write Parquet `{path}`: {source}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("Arrow error on `{path}`: {source}")]
    Arrow {
        path: PathBuf,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error("`{path}` has no column `{column}` (columns: {available})")]
    MissingColumn {
        path: PathBuf,
        column: String,
        available: String,
    },
    #[error("column `{column}` of `{path}` has type {found}, expected {expected}")]
    ColumnType {
        path: PathBuf,
        column: String,
        found: String,
        expected: String,
    },
    #[error(
        "row `{row_id}`: label value `{value}` is missing from the label mapping (mapped: {known})"
    )]
    UnmappedLabel {
        row_id: String,
        value: String,
        known: String,
    },
    #[error("row `{row_id}`: label `{label}` is not one of the classes ({known})")]
    UnknownClass {
        row_id: String,
        label: String,
        known: String,
    },
    #[error("row `{row_id}`: the label is empty or null")]
    MissingLabel { row_id: String },
    #[error("row `{row_id}`: label `{value}` is not an integer, but the label has an int mapping")]
    LabelNotInt { row_id: String, value: String },
    #[error("{what} `{path}`: {message}")]
    BadSource {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error(
        "the source needs a label column (`label = \"column\"`); only folders and synthetic data name their own labels"
    )]
    LabelColumnNeeded,
    #[error("invalid parameter: {0}")]
    Param(String),
    #[error("sample of {requested} rows requested, but the input has only {available}")]
    SampleTooLarge { requested: usize, available: usize },
    #[error("image `{image_id}` is not in the image store `{path}`")]
    ImageNotFound { image_id: String, path: PathBuf },
    #[error("image `{image_id}` does not decode: {reason}")]
    Decode { image_id: String, reason: String },
    #[error("`{path}` is not a vlmpipe row table: {message}")]
    BadRowTable { path: PathBuf, message: String },
}

impl DataError {
    pub(crate) fn parquet(
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(parquet::errors::ParquetError) -> Self {
        let path = path.into();
        move |source| DataError::Parquet { path, source }
    }

    pub(crate) fn arrow(path: impl Into<PathBuf>) -> impl FnOnce(arrow::error::ArrowError) -> Self {
        let path = path.into();
        move |source| DataError::Arrow { path, source }
    }
}
