//! The files an eval stage leaves behind, under fixed names, so the executor, the run summary and
//! `vlmpipe report`/`show` agree on where to look.

use std::path::{Path, PathBuf};

use super::{EvalError, EvalRecord, ImageSource, Metrics, write_csv_export, write_records_parquet};
use crate::file_error::FileError;

/// Per-sample records (see [`super::write_records_parquet`]).
pub const RECORDS_FILE: &str = "records.parquet";
/// Metrics as JSON (see [`Metrics`]).
pub const METRICS_FILE: &str = "metrics.json";
/// The tutorial-format CSV (see [`super::write_csv_export`]).
pub const PREDICTIONS_CSV_FILE: &str = "predictions.csv";
/// The stage's own HTML report (written by `stages::report`).
pub const REPORT_FILE: &str = "report.html";

/// Writes `metrics` as pretty JSON to `path`.
pub fn write_metrics_json(path: &Path, metrics: &Metrics) -> Result<(), EvalError> {
    let json = serde_json::to_string_pretty(metrics).map_err(|e| EvalError::Schema {
        path: path.to_path_buf(),
        reason: format!("cannot serialise metrics: {e}"),
    })?;
    std::fs::write(path, json + "\n").map_err(FileError::write(path))?;
    Ok(())
}

/// Reads a `metrics.json` written by [`write_metrics_json`].
pub fn read_metrics_json(path: &Path) -> Result<Metrics, EvalError> {
    let text = std::fs::read_to_string(path).map_err(FileError::read(path))?;
    serde_json::from_str(&text).map_err(|e| EvalError::Schema {
        path: path.to_path_buf(),
        reason: format!("not a metrics file: {e}"),
    })
}

/// Writes records, metrics and the CSV into `dir` under the fixed names and returns their paths
/// in that order (for the run summary's list of outputs). The HTML report is separate because it
/// belongs to the report layer.
pub fn write_eval_outputs(
    dir: &Path,
    labels: &[String],
    records: &[EvalRecord],
    metrics: &Metrics,
    images: &dyn ImageSource,
) -> Result<Vec<PathBuf>, EvalError> {
    let records_path = dir.join(RECORDS_FILE);
    let metrics_path = dir.join(METRICS_FILE);
    let csv_path = dir.join(PREDICTIONS_CSV_FILE);
    write_records_parquet(&records_path, labels, records)?;
    write_metrics_json(&metrics_path, metrics)?;
    write_csv_export(&csv_path, records, images)?;
    Ok(vec![records_path, metrics_path, csv_path])
}
