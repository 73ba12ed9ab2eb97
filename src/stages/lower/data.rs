//! The data stages' configuration: `dataset` (a source, labels and filters become a
//! [`DatasetSpec`]), `split`, `sample` and `shuffle` (where their rows are, and the cut).

use std::collections::BTreeMap;

use crate::hub::HubRepo;
use crate::plan::params::{
    DataSource, DatasetParams, KeepFilter, MapKey, ParamValue, SampleParams, ShuffleParams,
    SplitMethod as PlanSplitMethod, SplitParams,
};
use crate::plan::{Node, Plan};
use crate::stages::data::{
    DatasetConfig, DatasetSpec, FilterSpec, HfSource, ImageCheck, LabelSpec, Shape, SourceSpec,
    SplitPart, SplitSpec, SyntheticSpec,
};
use crate::stages::rows::{SampleConfig, SplitConfig, SplitMethod};

use super::{InputPositions, LowerContext, LowerError};

/// Why a dataset declaration the checker accepted cannot be ingested.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DatasetConfigError {
    #[error(
        "label mapping key `{0}` is not an integer; map integer label values, or drop the \
         mapping when the column already holds class names"
    )]
    MappingKey(String),
    #[error("unknown synthetic dataset kind `{0}` (known: `shapes`)")]
    SyntheticKind(String),
    #[error("synthetic `n` = {0} is too large")]
    TooMany(u64),
    #[error("synthetic `{key}` = {value} is out of range")]
    OutOfRange { key: String, value: i64 },
    #[error("unknown shape `{0}` (known: circle, square, triangle)")]
    Shape(String),
    #[error(
        "synthetic option `{key}` = {value} is not known or has the wrong type (options: width, \
         height, size (integers), colors, shapes (comma-separated strings))"
    )]
    SyntheticOption { key: String, value: String },
    #[error("{0}")]
    Synthetic(String),
}

/// The `dataset` stage of `node`.
pub(super) fn dataset_config(
    node: &Node,
    params: &DatasetParams,
    ctx: &LowerContext<'_>,
) -> Result<DatasetConfig, LowerError> {
    let invalid = |source: DatasetConfigError| LowerError::Dataset {
        stage: node.name.clone(),
        source,
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
            SourceSpec::Synthetic(synthetic_spec(kind, *n, *seed, options).map_err(invalid)?),
            None,
        ),
    };
    let names_its_labels = matches!(
        params.source,
        DataSource::Folder { .. } | DataSource::Synthetic { .. }
    );
    let label = label_spec(params, names_its_labels).map_err(invalid)?;
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
    Ok(DatasetConfig {
        params: node.canonical_params(),
        spec,
        hf,
        shards: params.shards.map(|n| n as usize),
    })
}

/// The `split` stage of `node`.
pub(super) fn split_config(
    node: &Node,
    params: &SplitParams,
    plan: &Plan,
    positions: &InputPositions,
) -> Result<SplitConfig, LowerError> {
    // Parts in a fixed order (the plan keeps ratios in a sorted map), so the cut is stable.
    let parts = params
        .ratios
        .iter()
        .map(|(name, ratio)| SplitPart {
            name: name.clone(),
            ratio: *ratio,
        })
        .collect();
    Ok(SplitConfig {
        params: node.canonical_params(),
        source: positions.data_input(&params.source, plan)?,
        method: match params.method {
            PlanSplitMethod::Stratified => SplitMethod::Stratified,
            PlanSplitMethod::Random => SplitMethod::Random,
        },
        spec: SplitSpec {
            parts,
            seed: params.seed,
        },
    })
}

/// The `sample` stage of `node`.
pub(super) fn sample_config(
    node: &Node,
    params: &SampleParams,
    plan: &Plan,
    positions: &InputPositions,
) -> Result<SampleConfig, LowerError> {
    Ok(SampleConfig {
        params: node.canonical_params(),
        source: positions.data_input(&params.source, plan)?,
        n: Some(params.n),
        seed: params.seed,
    })
}

/// The `shuffle` stage of `node`: a sample that keeps every row.
pub(super) fn shuffle_config(
    node: &Node,
    params: &ShuffleParams,
    plan: &Plan,
    positions: &InputPositions,
) -> Result<SampleConfig, LowerError> {
    Ok(SampleConfig {
        params: node.canonical_params(),
        source: positions.data_input(&params.source, plan)?,
        n: None,
        seed: params.seed,
    })
}

/// The data layer's label spec for the plan's label field.
fn label_spec(
    params: &DatasetParams,
    names_its_labels: bool,
) -> Result<LabelSpec, DatasetConfigError> {
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
            MapKey::Str(s) => s
                .trim()
                .parse::<i64>()
                .map_err(|_| DatasetConfigError::MappingKey(s.clone()))?,
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
) -> Result<SyntheticSpec, DatasetConfigError> {
    if kind != "shapes" {
        return Err(DatasetConfigError::SyntheticKind(kind.to_owned()));
    }
    let mut spec = SyntheticSpec {
        n: usize::try_from(n).map_err(|_| DatasetConfigError::TooMany(n))?,
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
                    .map(|s| Shape::parse(s).ok_or_else(|| DatasetConfigError::Shape(s.clone())))
                    .collect::<Result<_, _>>()?;
            }
            (key, value) => {
                return Err(DatasetConfigError::SyntheticOption {
                    key: key.to_owned(),
                    value: value.to_string(),
                });
            }
        }
    }
    spec.validate()
        .map_err(|e| DatasetConfigError::Synthetic(e.to_string()))?;
    Ok(spec)
}

fn size_option(key: &str, value: i64) -> Result<u32, DatasetConfigError> {
    u32::try_from(value).map_err(|_| DatasetConfigError::OutOfRange {
        key: key.to_owned(),
        value,
    })
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
        assert_eq!(err, DatasetConfigError::Shape("hexagon".to_owned()));
        assert!(err.to_string().contains("unknown shape `hexagon`"), "{err}");
        let err = synthetic_spec("noise", 10, 4, &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("`noise`"), "{err}");
        let mut bad = BTreeMap::new();
        bad.insert("depth".to_owned(), ParamValue::Int(3));
        assert!(matches!(
            synthetic_spec("shapes", 10, 4, &bad),
            Err(DatasetConfigError::SyntheticOption { .. })
        ));
    }
}
