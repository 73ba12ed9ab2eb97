//! The `dataset` stage: typed plan parameters → a [`DatasetSpec`] → [`ingest`] into the entry.
//!
//! The entry holds exactly what `ingest` writes (`rows.parquet`, `images.parquet`,
//! `errors.parquet`, `filtered.parquet`). The fingerprint covers the canonical parameters plus
//! the source's current state: a stat of every local file ([`DatasetSpec::source_stamp`]), or
//! the Hub commit a `hf(...)` source resolves to, so an edited folder or a moved `main` reruns
//! the stage while a no-change rerun reads nothing but file metadata.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::exec::{Stage, StageContext, StageError, StageOutcome};
use crate::hub::{Hub, HubRepo};
use crate::plan::Node;
use crate::plan::params::{DataSource, DatasetParams, KeepFilter, MapKey, ParamValue};
use crate::stages::data::{
    DATA_CODE_VERSION, DatasetSpec, FilterSpec, ImageCheck, IngestReport, LabelSpec, Shape,
    SourceSpec, SyntheticSpec, ingest,
};
use crate::stages::lower::{LowerContext, LowerError};

/// Rejected rows named in a warning before it says "and N more".
const WARNING_EXAMPLES: usize = 5;

/// A `hf(...)` source, resolved to local Parquet files when the stage needs them.
#[derive(Clone, Debug)]
struct HfSource {
    hub: Hub,
    repo: HubRepo,
    split: String,
    config: Option<String>,
}

/// The configured dataset stage.
pub struct DatasetStage {
    params: Value,
    /// The spec to ingest; for a Hub source its `source` is replaced by the resolved files.
    spec: DatasetSpec,
    hf: Option<HfSource>,
}

impl DatasetStage {
    pub fn new(
        node: &Node,
        params: &DatasetParams,
        ctx: &LowerContext<'_>,
    ) -> Result<Self, LowerError> {
        let unsupported = |message: String| LowerError::Unsupported {
            stage: node.name.clone(),
            message,
        };
        let (source, hf) = match &params.source {
            DataSource::Hf {
                repo,
                split,
                revision,
                config,
            } => {
                let repo = HubRepo::dataset(repo).at(revision.as_deref().unwrap_or("main"));
                let hf = HfSource {
                    hub: ctx.hub.clone(),
                    repo,
                    split: split.clone(),
                    config: config.clone(),
                };
                (SourceSpec::Parquet { files: Vec::new() }, Some(hf))
            }
            DataSource::Parquet { path } => {
                let source = if path.resolved.is_dir() {
                    // A local copy of a Hub dataset repo: its `train` split, as `hf(...)` defaults.
                    SourceSpec::ParquetDir {
                        dir: path.resolved.clone(),
                        split: "train".to_owned(),
                        config: None,
                    }
                } else {
                    SourceSpec::Parquet {
                        files: vec![path.resolved.clone()],
                    }
                };
                (source, None)
            }
            DataSource::Folder { path } => (
                SourceSpec::Folder {
                    dir: path.resolved.clone(),
                },
                None,
            ),
            DataSource::Csv { path } => (
                SourceSpec::Csv {
                    path: path.resolved.clone(),
                },
                None,
            ),
            DataSource::Jsonl { path } => (
                SourceSpec::Jsonl {
                    path: path.resolved.clone(),
                },
                None,
            ),
            DataSource::Synthetic {
                kind,
                n,
                seed,
                options,
            } => (
                SourceSpec::Synthetic(
                    synthetic_spec(kind, *n, *seed, options).map_err(unsupported)?,
                ),
                None,
            ),
        };
        let names_its_labels = matches!(
            params.source,
            DataSource::Folder { .. } | DataSource::Synthetic { .. }
        );
        let label = label_spec(params, names_its_labels).map_err(unsupported)?;
        let spec = DatasetSpec {
            source,
            image_column: params.image.clone(),
            label,
            classes: params.labels.as_ref().map(|l| l.values.clone()),
            filters: FilterSpec {
                modes: match params.keep {
                    KeepFilter::All => None,
                    KeepFilter::RgbOnly => Some(vec!["RGB".to_owned()]),
                },
                max_image_size: params.max_image_size,
                max_image_pixels: params.max_image_pixels,
                drop: params.drop.clone(),
            },
            check: ImageCheck::Header,
            threads: ctx.threads,
            // The Hub cache this run reads `hf(...)` sources from (the plan's is the environment's).
            reads: Some(ctx.plan.reads.clone().allowing(&ctx.hub.config().cache_dir)),
        };
        Ok(Self {
            params: node.canonical_params(),
            spec,
            hf,
        })
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

/// What a person should hear about an ingest: rejected images and drop ids that matched nothing.
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
            "{} image{} could not be read and {} recorded in errors.parquet: {}{tail}",
            report.errors,
            if report.errors == 1 { "" } else { "s" },
            if report.errors == 1 { "is" } else { "are" },
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

/// The data layer's label spec for the plan's label field.
fn label_spec(params: &DatasetParams, names_its_labels: bool) -> Result<LabelSpec, String> {
    let column = params.label.column.clone();
    let Some(mapping) = &params.label.mapping else {
        return Ok(if names_its_labels {
            LabelSpec::FromSource
        } else {
            LabelSpec::Names { column }
        });
    };
    let mut ints = BTreeMap::new();
    for entry in mapping {
        // Integer-looking string keys (`"0": "cat"`) map integer columns and folders `0/`, `1/`.
        let key = match &entry.key {
            MapKey::Int(i) => *i,
            MapKey::Str(s) => s.trim().parse::<i64>().map_err(|_| {
                format!(
                    "label mapping key `{s}` is not an integer; map integer label values, or \
                     drop the mapping when the column already holds class names"
                )
            })?,
        };
        ints.insert(key, entry.label.clone());
    }
    Ok(LabelSpec::Mapped {
        column,
        mapping: ints,
    })
}

/// `synthetic(kind: "shapes", n, seed, width:, height:, colors: "red,blue", shapes: "circle,square")`.
fn synthetic_spec(
    kind: &str,
    n: u64,
    seed: u64,
    options: &BTreeMap<String, ParamValue>,
) -> Result<SyntheticSpec, String> {
    if kind != "shapes" {
        return Err(format!(
            "unknown synthetic dataset kind `{kind}` (known: `shapes`)"
        ));
    }
    let mut spec = SyntheticSpec {
        n: usize::try_from(n).map_err(|_| format!("synthetic `n` = {n} is too large"))?,
        seed,
        ..SyntheticSpec::default()
    };
    for (key, value) in options {
        match (key.as_str(), value) {
            ("width", ParamValue::Int(w)) => spec.width = size_option(key, *w)?,
            ("height", ParamValue::Int(h)) => spec.height = size_option(key, *h)?,
            ("size", ParamValue::Int(s)) => {
                spec.width = size_option(key, *s)?;
                spec.height = spec.width;
            }
            ("colors", ParamValue::Str(list)) => spec.colors = split_list(list),
            ("shapes", ParamValue::Str(list)) => {
                spec.shapes = split_list(list)
                    .iter()
                    .map(|s| {
                        Shape::parse(s).ok_or_else(|| {
                            format!("unknown shape `{s}` (known: circle, square, triangle)")
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
            (key, value) => {
                return Err(format!(
                    "synthetic option `{key}` = {value} is not known or has the wrong type \
                     (options: width, height, size (integers), colors, shapes (comma-separated strings))"
                ));
            }
        }
    }
    spec.validate().map_err(|e| e.to_string())?;
    Ok(spec)
}

fn size_option(key: &str, value: i64) -> Result<u32, String> {
    u32::try_from(value).map_err(|_| format!("synthetic `{key}` = {value} is out of range"))
}

fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_options_are_typed_and_checked() {
        let mut options = BTreeMap::new();
        options.insert("size".to_owned(), ParamValue::Int(32));
        options.insert(
            "colors".to_owned(),
            ParamValue::Str("red, green".to_owned()),
        );
        options.insert("shapes".to_owned(), ParamValue::Str("triangle".to_owned()));
        let spec = synthetic_spec("shapes", 10, 4, &options).unwrap();
        assert_eq!(
            (spec.width, spec.height, spec.n, spec.seed),
            (32, 32, 10, 4)
        );
        assert_eq!(spec.classes(), ["red triangle", "green triangle"]);

        options.insert("shapes".to_owned(), ParamValue::Str("hexagon".to_owned()));
        let err = synthetic_spec("shapes", 10, 4, &options).unwrap_err();
        assert!(err.contains("unknown shape `hexagon`"), "{err}");
        let err = synthetic_spec("noise", 10, 4, &BTreeMap::new()).unwrap_err();
        assert!(err.contains("`noise`"), "{err}");
        let mut bad = BTreeMap::new();
        bad.insert("depth".to_owned(), ParamValue::Int(3));
        assert!(synthetic_spec("shapes", 10, 4, &bad).is_err());
    }

    #[test]
    fn warnings_name_rejected_rows() {
        let report = IngestReport {
            errors: 7,
            error_examples: (0..7)
                .map(|i| (format!("r{i}"), "truncated".to_owned()))
                .collect(),
            unknown_drop_ids: vec!["x:1".to_owned()],
            ..IngestReport::default()
        };
        let warnings = ingest_warnings(&report);
        assert_eq!(warnings.len(), 2);
        assert!(
            warnings[0].starts_with("7 images could not be read"),
            "{}",
            warnings[0]
        );
        assert!(warnings[0].contains("`r0` (truncated)"));
        assert!(warnings[0].ends_with("and 2 more"), "{}", warnings[0]);
        assert!(warnings[1].contains("`x:1`"));
    }
}
