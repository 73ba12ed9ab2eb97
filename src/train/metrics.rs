//! Per-step training metrics and their Parquet table (the report's loss curves).

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use serde::{Deserialize, Serialize};

use crate::file_error::FileError;
use crate::train::error::TrainError;
use crate::train::io::write_atomic;

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    /// 1-based optimizer step.
    pub step: u64,
    /// Fractional epochs of training data consumed after this step.
    pub epoch: f64,
    /// Mean loss of the step's micro-batches.
    pub train_loss: f64,
    /// Held-out loss, on the steps where it was computed.
    pub eval_loss: Option<f64>,
    /// Learning rate this step used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Wall-clock seconds since the run started (summed over resumed segments).
    pub seconds: f64,
}

/// Writes `rows` as Parquet (columns named like [`MetricRow`]'s fields), atomically.
pub(crate) fn write_metrics(path: &Path, rows: &[MetricRow]) -> Result<(), TrainError> {
    let err = |message: String| TrainError::Metrics {
        path: path.to_path_buf(),
        message,
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("step", DataType::UInt64, false),
        Field::new("epoch", DataType::Float64, false),
        Field::new("train_loss", DataType::Float64, false),
        Field::new("eval_loss", DataType::Float64, true),
        Field::new("lr", DataType::Float64, false),
        Field::new("grad_norm", DataType::Float64, false),
        Field::new("seconds", DataType::Float64, false),
    ]));
    let f64s = |f: fn(&MetricRow) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(
            rows.iter().map(|r| r.step).collect::<Vec<_>>(),
        )),
        f64s(|r| r.epoch),
        f64s(|r| r.train_loss),
        Arc::new(Float64Array::from(
            rows.iter().map(|r| r.eval_loss).collect::<Vec<_>>(),
        )),
        f64s(|r| r.lr),
        f64s(|r| r.grad_norm),
        f64s(|r| r.seconds),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| err(e.to_string()))?;
    let mut bytes = Vec::new();
    let mut writer =
        ArrowWriter::try_new(&mut bytes, schema, None).map_err(|e| err(e.to_string()))?;
    writer.write(&batch).map_err(|e| err(e.to_string()))?;
    writer.close().map_err(|e| err(e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Reads a table written by [`write_metrics`].
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRow>, TrainError> {
    use arrow::array::Array;
    let err = |message: String| TrainError::Metrics {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(path).map_err(FileError::read(path))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| err(e.to_string()))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| err(e.to_string()))?;
        let col = |name: &str| -> Result<&Float64Array, TrainError> {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<Float64Array>())
                .ok_or_else(|| err(format!("column `{name}` is missing")))
        };
        let step = batch
            .column_by_name("step")
            .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
            .ok_or_else(|| err("column `step` is missing".into()))?;
        let (epoch, train, eval, lr, norm, secs) = (
            col("epoch")?,
            col("train_loss")?,
            col("eval_loss")?,
            col("lr")?,
            col("grad_norm")?,
            col("seconds")?,
        );
        for i in 0..batch.num_rows() {
            rows.push(MetricRow {
                step: step.value(i),
                epoch: epoch.value(i),
                train_loss: train.value(i),
                eval_loss: (!eval.is_null(i)).then(|| eval.value(i)),
                lr: lr.value(i),
                grad_norm: norm.value(i),
                seconds: secs.value(i),
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_round_trip() -> Result<(), TrainError> {
        let dir = tempfile::tempdir().map_err(FileError::create(&std::env::temp_dir()))?;
        let rows = vec![
            MetricRow {
                step: 1,
                epoch: 0.5,
                train_loss: 2.0,
                eval_loss: None,
                lr: 1e-3,
                grad_norm: 0.3,
                seconds: 0.1,
            },
            MetricRow {
                step: 2,
                epoch: 1.0,
                train_loss: 1.0,
                eval_loss: Some(1.5),
                lr: 5e-4,
                grad_norm: 0.2,
                seconds: 0.2,
            },
        ];
        let path = dir.path().join("m.parquet");
        write_metrics(&path, &rows)?;
        assert_eq!(read_metrics(&path)?, rows);
        Ok(())
    }
}
