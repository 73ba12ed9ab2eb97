//! Errors of the evaluation layer.

use crate::file_error::FileError;
use std::path::PathBuf;

/// What can go wrong when computing metrics or writing and reading evaluation outputs.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Metrics of zero samples would be all NaN; we refuse rather than print zeros that look real.
    #[error("no evaluation records: metrics need at least one sample")]
    Empty,
    /// The label set is empty or repeats a label.
    #[error("invalid label set: {reason}")]
    LabelSet { reason: String },
    /// A record's ground truth is not in the label set.
    #[error("row `{row_id}`: ground truth `{label}` is not in the label set ({labels})")]
    UnknownGroundTruth {
        row_id: String,
        label: String,
        labels: String,
    },
    /// A record is marked valid but its parsed label is missing or outside the label set.
    #[error("row `{row_id}`: marked valid but parsed label {parsed:?} is not in the label set")]
    InvalidParsedLabel {
        row_id: String,
        parsed: Option<String>,
    },
    /// `correct` disagrees with `valid && parsed_label == ground_truth`.
    #[error(
        "row `{row_id}`: `correct` is {correct} but the parsed label and ground truth say otherwise"
    )]
    InconsistentCorrect { row_id: String, correct: bool },
    /// `class_probs` has the wrong length or holds values that are not probabilities.
    #[error("row `{row_id}`: class probabilities {reason}")]
    BadProbabilities { row_id: String, reason: String },
    /// The class chosen for `recall_of` is not a label.
    #[error("`recall_of` class `{label}` is not in the label set ({labels})")]
    UnknownRecallClass { label: String, labels: String },
    /// File IO.
    #[error(transparent)]
    File(#[from] FileError),
    /// Parquet encoding or decoding.
    #[error("parquet error in `{path}`")]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// Arrow array construction or a column of an unexpected type.
    #[error("records file `{path}`: {reason}")]
    Schema { path: PathBuf, reason: String },
    /// CSV writing.
    #[error("cannot write CSV `{path}`")]
    Csv {
        path: PathBuf,
        #[source]
        source: csv::Error,
    },
    /// An image from the image source is not in an image format.
    #[error("image `{image_id}` is not an image file")]
    Image {
        image_id: String,
        #[source]
        source: image::ImageError,
    },
    /// The image source has no image for a record.
    #[error("image `{image_id}` is missing from the image source")]
    MissingImage { image_id: String },
}
