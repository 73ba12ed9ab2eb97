//! Evaluation outputs: per-sample records, metrics and exports.
//!
//! Everything here starts from [`EvalRecord`]s, so it is testable without a model: the part of the
//! eval stage that runs the model produces records and hands them to [`compute_metrics`],
//! [`write_records_parquet`] and [`write_csv_export`]. Images never live in the records; they come
//! through an [`ImageSource`] keyed by `image_id`.

mod error;
mod export;
mod image_source;
mod metrics;
mod outputs;
mod records;
pub mod run;
pub(crate) mod stage;

pub use error::EvalError;
pub use export::{CSV_HEADER, write_csv_export};
pub use image_source::{ImageSource, MapImageSource, NoImages};
pub use metrics::{
    Averages, Calibration, CalibrationBin, ClassMetrics, ClassRecall, ConfusionMatrix,
    INVALID_COLUMN, Metrics, MetricsOptions, TopK, compute_metrics,
};
pub use outputs::{
    METRICS_FILE, PREDICTIONS_CSV_FILE, RECORDS_FILE, REPORT_FILE, read_metrics_json,
    write_eval_outputs, write_metrics_json,
};
pub use records::{
    EvalRecord, RecordTable, read_records_parquet, records_schema, write_records_parquet,
};
