//! Reports of eval stages: one self-contained offline HTML file, SVG charts, stage comparisons and
//! terminal tables.
//!
//! A report is built from typed inputs ([`StageReport`]: a stage's records, metrics and optional
//! training curves) plus an [`ImageSource`] for thumbnails, so it needs no model and no cache.
//! **Architecture Invariant:** the HTML references nothing outside itself (no CDN, fonts or
//! requests); CSS, JS, SVG and images are inline, and every data-derived string is escaped.

mod compare;
mod escape;
mod html;
pub(crate) mod stage;
mod svg;
mod terminal;
mod thumbnail;

use std::path::Path;

pub use compare::{
    ChangeKind, ComparisonRow, OutcomeChange, changed_outcomes, comparison_rows, format_percent,
    shown_answer,
};
pub use escape::{html_escape, terminal_safe};
pub use html::{HtmlOptions, embedded_data, render_html};
pub use stage::{ComparedEval, ReportConfig, ReportStage};
pub use svg::{LineChart, Series, nice_ticks};
pub use terminal::{changed_listing, headline_table, misclassified_listing};
pub use thumbnail::{thumbnail_data_url, thumbnails};

use crate::stages::eval::{
    EvalError, EvalRecord, ImageSource, METRICS_FILE, Metrics, RECORDS_FILE, read_metrics_json,
    read_records_parquet,
};

/// Everything the report shows about one eval stage.
#[derive(Clone, Debug)]
pub struct StageReport {
    /// The stage name from the pipeline.
    pub name: String,
    /// The label set, in order (matches `metrics.confusion_matrix.labels`).
    pub labels: Vec<String>,
    /// Per-sample records.
    pub records: Vec<EvalRecord>,
    /// Metrics computed from `records`.
    pub metrics: Metrics,
    /// Loss curves of the fine-tune this stage evaluated (e.g. `train` and `eval` series of
    /// `(step, loss)`); empty for a base model.
    pub curves: Vec<Series>,
}

impl StageReport {
    /// Loads a stage from the folder its eval outputs were written to (`records.parquet` and
    /// `metrics.json`, see [`crate::stages::eval::write_eval_outputs`]); curves start empty.
    pub fn load(name: impl Into<String>, dir: &Path) -> Result<Self, ReportError> {
        let table = read_records_parquet(&dir.join(RECORDS_FILE))?;
        let metrics = read_metrics_json(&dir.join(METRICS_FILE))?;
        Ok(Self {
            name: name.into(),
            labels: table.labels,
            records: table.records,
            metrics,
            curves: Vec::new(),
        })
    }
}

/// A report: one stage, or several compared side by side (the first is the baseline).
#[derive(Clone, Debug)]
pub struct ReportInput {
    /// Page title (the pipeline or report stage name).
    pub title: String,
    /// The stages, baseline first.
    pub stages: Vec<StageReport>,
}

/// Errors of the report layer.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A report needs at least one stage.
    #[error("a report needs at least one eval stage")]
    NoStages,
    /// A stage's labels disagree with its metrics (a wiring bug upstream).
    #[error("stage `{stage}`: its labels do not match its confusion matrix")]
    LabelMismatch { stage: String },
    /// Reading a stage's eval outputs.
    #[error(transparent)]
    Eval(#[from] EvalError),
    /// Writing the file.
    #[error(transparent)]
    File(#[from] crate::file_error::FileError),
    /// Serialising the embedded data.
    #[error("cannot serialise the report data")]
    Json(#[from] serde_json::Error),
}

/// Renders `input` and writes it to `path`.
pub fn write_html(
    path: &Path,
    input: &ReportInput,
    images: &dyn ImageSource,
    options: &HtmlOptions,
) -> Result<(), ReportError> {
    let html = render_html(input, images, options)?;
    std::fs::write(path, html).map_err(|e| crate::file_error::FileError::write(path)(e).into())
}
