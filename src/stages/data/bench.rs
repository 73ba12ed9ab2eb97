//! Ingest throughput benchmark: images per second of a local image folder (`vlmpipe bench`).

use std::path::Path;
use std::time::Instant;

use super::{DataError, DatasetSpec, ImageCheck, IngestReport, SourceSpec, ingest};
use crate::file_error::FileError;

/// Result of [`bench_ingest_folder`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct IngestBench {
    pub images: usize,
    pub seconds: f64,
    pub images_per_sec: f64,
    pub threads: usize,
    pub check: ImageCheck,
    pub report: IngestReport,
}

/// Ingests the class-per-folder tree `dir` into a temporary folder (deleted afterwards) with
/// `threads` workers (0 = all cores) and reports the throughput.
pub fn bench_ingest_folder(
    dir: &Path,
    threads: usize,
    check: ImageCheck,
) -> Result<IngestBench, DataError> {
    let out = tempfile::tempdir().map_err(FileError::create(&std::env::temp_dir()))?;
    let mut spec = DatasetSpec::new(SourceSpec::Folder {
        dir: dir.to_path_buf(),
    });
    spec.threads = threads;
    spec.check = check;
    let start = Instant::now();
    let report = ingest(&spec, out.path(), &indicatif::ProgressBar::hidden())?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(IngestBench {
        images: report.rows_read,
        seconds,
        images_per_sec: report.rows_read as f64 / seconds.max(1e-9),
        threads,
        check,
        report,
    })
}
