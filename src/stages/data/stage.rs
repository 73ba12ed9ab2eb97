//! The `dataset` stage: a [`DatasetSpec`] (built by lowering) → [`ingest`] into the entry.
//!
//! The entry holds exactly what `ingest` writes (`rows.parquet`, `images.parquet`,
//! `errors.parquet`, `filtered.parquet`). The fingerprint covers the canonical parameters plus
//! the source's current state: a stat of every local file ([`DatasetSpec::source_stamp`]), or
//! the Hub commit a `hf(...)` source resolves to, so an edited folder or a moved `main` reruns
//! the stage while a no-change rerun reads nothing but file metadata.

use serde_json::{Value, json};

use super::{DATA_CODE_VERSION, DatasetSpec, IngestReport, SourceSpec, ingest};
use crate::exec::{Stage, StageContext, StageError, StageOutcome};
use crate::hub::{Hub, HubRepo};

/// Rejected rows named in a warning before it says "and N more".
const WARNING_EXAMPLES: usize = 5;

/// A `hf(...)` source, resolved to local Parquet files when the stage needs them.
#[derive(Clone, Debug)]
pub struct HfSource {
    pub hub: Hub,
    pub repo: HubRepo,
    pub split: String,
    pub config: Option<String>,
}

/// What a `dataset` stage ingests.
#[derive(Clone, Debug)]
pub struct DatasetConfig {
    /// The node's canonical parameters.
    pub params: Value,
    /// The spec to ingest; for a Hub source its `source` is replaced by the resolved files.
    pub spec: DatasetSpec,
    /// The Hub source, when the dataset comes from the Hub.
    pub hf: Option<HfSource>,
}

/// The configured dataset stage.
pub struct DatasetStage {
    params: Value,
    spec: DatasetSpec,
    hf: Option<HfSource>,
}

impl DatasetStage {
    pub(crate) fn from_config(config: DatasetConfig) -> Self {
        Self {
            params: config.params,
            spec: config.spec,
            hf: config.hf,
        }
    }

    /// The spec with a Hub source resolved to its Parquet files (and the commit they came from).
    fn resolved(&self) -> Result<(DatasetSpec, Option<String>), StageError> {
        let Some(hf) = &self.hf else {
            return Ok((self.spec.clone(), None));
        };
        let files = hf
            .hub
            .dataset_split_files(&hf.repo, hf.config.as_deref(), &hf.split)?;
        let mut spec = self.spec.clone();
        spec.source = SourceSpec::Parquet { files: files.files };
        Ok((spec, Some(files.commit)))
    }
}

impl Stage for DatasetStage {
    fn kind(&self) -> &'static str {
        "dataset"
    }

    fn code_version(&self) -> u32 {
        DATA_CODE_VERSION
    }

    fn params(&self) -> Value {
        self.params.clone()
    }

    fn external_state(&self) -> Result<Value, StageError> {
        match &self.hf {
            // The commit pins the content; the local paths of the cached files do not matter.
            Some(hf) => {
                let files =
                    hf.hub
                        .dataset_split_files(&hf.repo, hf.config.as_deref(), &hf.split)?;
                Ok(json!({ "commit": files.commit, "files": files.repo_paths }))
            }
            None => Ok(self.spec.source_stamp()?),
        }
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let (spec, commit) = self.resolved()?;
        let bar = ctx.progress.bar(0, ctx.name);
        let report = ingest(&spec, ctx.out_dir, &bar)?;
        bar.finish_and_clear();
        let warnings = ingest_warnings(&report);
        let mut metadata = serde_json::to_value(&report)?;
        if let (Some(commit), Some(map)) = (commit, metadata.as_object_mut()) {
            map.insert("hub_commit".to_owned(), Value::String(commit));
        }
        Ok(StageOutcome { metadata, warnings })
    }
}

/// What a person should hear about an ingest: rejected images, skipped files and drop ids that
/// matched nothing.
pub fn ingest_warnings(report: &IngestReport) -> Vec<String> {
    let mut warnings = Vec::new();
    if report.errors > 0 {
        let examples: Vec<String> = report
            .error_examples
            .iter()
            .take(WARNING_EXAMPLES)
            .map(|(row, reason)| format!("`{row}` ({reason})"))
            .collect();
        let more = report.errors.saturating_sub(examples.len());
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        warnings.push(format!(
            "{} image{} could not be read and {} recorded in errors.parquet (an eval counts each as a wrong answer): {}{tail}",
            report.errors,
            if report.errors == 1 { "" } else { "s" },
            if report.errors == 1 { "is" } else { "are" },
            examples.join(", ")
        ));
    }
    if report.skipped_non_images > 0 {
        let n = report.skipped_non_images;
        let examples: Vec<String> = report
            .skipped_examples
            .iter()
            .take(WARNING_EXAMPLES)
            .map(|id| format!("`{id}`"))
            .collect();
        let more = n.saturating_sub(examples.len());
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        warnings.push(format!(
            "{n} {} skipped: {}{tail}",
            if n == 1 {
                "file that is not an image was"
            } else {
                "files that are not images were"
            },
            examples.join(", ")
        ));
    }
    if !report.unknown_drop_ids.is_empty() {
        warnings.push(format!(
            "`drop` lists ids that match no row: {}",
            report
                .unknown_drop_ids
                .iter()
                .map(|id| format!("`{id}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_name_rejected_rows() {
        let report = IngestReport {
            errors: 7,
            error_examples: (0..7)
                .map(|i| (format!("r{i}"), "truncated".to_owned()))
                .collect(),
            unknown_drop_ids: vec!["x:1".to_owned()],
            skipped_non_images: 1,
            skipped_examples: vec!["README.txt".to_owned()],
            ..IngestReport::default()
        };
        let warnings = ingest_warnings(&report);
        assert_eq!(warnings.len(), 3);
        assert!(
            warnings[0].starts_with("7 images could not be read"),
            "{}",
            warnings[0]
        );
        assert!(warnings[0].contains("`r0` (truncated)"));
        assert!(warnings[0].ends_with("and 2 more"), "{}", warnings[0]);
        assert_eq!(
            warnings[1],
            "1 file that is not an image was skipped: `README.txt`"
        );
        assert!(warnings[2].contains("`x:1`"));
    }
}
