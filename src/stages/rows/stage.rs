//! The `split`, `sample` and `shuffle` stages: row tables in, row tables out.
//!
//! Each reads the rows of its source (`rows.parquet` of a dataset, sample or shuffle, or one
//! member file of a split) from the input its [`DataInput`] names, and writes row tables that
//! reference the root dataset's images by id; image bytes are never copied. A split writes one
//! file per member ([`part_file_name`]); a sample or shuffle writes `rows.parquet`. A shuffle is
//! a sample that keeps every row, so one stage type runs both.

use serde_json::{Value, json};

use crate::exec::{Stage, StageContext, StageError, StageOutcome};
use crate::stages::data::{
    DATA_CODE_VERSION, DataError, DataInput, ROWS_FILE, RowTable, SplitSpec, part_file_name,
    sample, shuffle, stratified_split, write_rows,
};

fn counts(table: &RowTable) -> Value {
    let mut per_class = std::collections::BTreeMap::<&str, usize>::new();
    for row in &table.rows {
        *per_class.entry(row.label.as_str()).or_default() += 1;
    }
    json!({ "rows": table.rows.len(), "class_counts": per_class })
}

/// How a split cuts its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SplitMethod {
    /// Each class cut in the parts' ratios (`stratified(...)`).
    Stratified,
    /// The rows cut regardless of labels (`random(...)`).
    Random,
}

/// What a `split` stage cuts, and how.
#[derive(Clone, Debug)]
pub(crate) struct SplitConfig {
    /// The node's canonical parameters.
    pub params: Value,
    pub source: DataInput,
    pub method: SplitMethod,
    pub spec: SplitSpec,
}

/// `split NAME = stratified(data, train: …, test: …, seed: …)` or `random(…)`.
pub(crate) struct SplitStage {
    config: SplitConfig,
}

impl SplitStage {
    pub(crate) fn from_config(config: SplitConfig) -> Self {
        Self { config }
    }
}

impl Stage for SplitStage {
    fn kind(&self) -> &'static str {
        "split"
    }

    fn code_version(&self) -> u32 {
        DATA_CODE_VERSION
    }

    fn params(&self) -> Value {
        self.config.params.clone()
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let config = &self.config;
        let table = config.source.read_rows(ctx)?;
        let parts = match config.method {
            SplitMethod::Stratified => stratified_split(&table, &config.spec)?,
            SplitMethod::Random => random_split(&table, &config.spec)?,
        };
        let mut metadata = serde_json::Map::new();
        let mut warnings = Vec::new();
        for (name, part) in &parts {
            write_rows(&ctx.out_path(&part_file_name(name)), part)?;
            if part.rows.is_empty() {
                warnings.push(format!("split member `{name}` is empty"));
            }
            metadata.insert(name.clone(), counts(part));
        }
        Ok(StageOutcome {
            metadata: Value::Object(metadata),
            warnings,
        })
    }
}

/// A split that ignores labels: the stratified cut over a single pseudo-class, labels restored.
fn random_split(table: &RowTable, spec: &SplitSpec) -> Result<Vec<(String, RowTable)>, DataError> {
    let mut flat = table.clone();
    let labels: std::collections::HashMap<String, (String, u32)> = table
        .rows
        .iter()
        .map(|r| (r.row_id.clone(), (r.label.clone(), r.label_index)))
        .collect();
    for row in &mut flat.rows {
        row.label = String::new();
        row.label_index = 0;
    }
    flat.classes = vec![String::new()];
    let mut parts = stratified_split(&flat, spec)?;
    for (_, part) in &mut parts {
        part.classes = table.classes.clone();
        for row in &mut part.rows {
            if let Some((label, index)) = labels.get(&row.row_id) {
                row.label = label.clone();
                row.label_index = *index;
            }
        }
    }
    Ok(parts)
}

/// What a `sample` or `shuffle` stage draws.
#[derive(Clone, Debug)]
pub(crate) struct SampleConfig {
    /// The node's canonical parameters.
    pub params: Value,
    pub source: DataInput,
    /// How many rows to keep; `None` keeps them all (`shuffle`).
    pub n: Option<u64>,
    pub seed: u64,
}

/// `sample(data, n, seed: s)`, or `shuffle(data, seed: s)`: the rows in a seeded order, the
/// first `n` of them for a sample.
pub(crate) struct SampleStage {
    config: SampleConfig,
}

impl SampleStage {
    pub(crate) fn from_config(config: SampleConfig) -> Self {
        Self { config }
    }
}

impl Stage for SampleStage {
    fn kind(&self) -> &'static str {
        match self.config.n {
            Some(_) => "sample",
            None => "shuffle",
        }
    }

    fn code_version(&self) -> u32 {
        DATA_CODE_VERSION
    }

    fn params(&self) -> Value {
        self.config.params.clone()
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let config = &self.config;
        let table = config.source.read_rows(ctx)?;
        let picked = match config.n {
            Some(n) => sample(
                &table,
                usize::try_from(n).unwrap_or(usize::MAX),
                config.seed,
            )?,
            None => shuffle(&table, config.seed),
        };
        write_rows(&ctx.out_path(ROWS_FILE), &picked)?;
        Ok(StageOutcome {
            metadata: counts(&picked),
            ..StageOutcome::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::data::{RowRecord, SplitPart};

    #[test]
    fn random_split_keeps_labels_and_covers_all_rows() {
        let table = RowTable {
            rows: (0..20)
                .map(|i| RowRecord {
                    row_id: format!("r{i:02}"),
                    image_id: format!("i{i}"),
                    label: if i < 15 { "a" } else { "b" }.to_owned(),
                    label_index: u32::from(i >= 15),
                    image_error: None,
                })
                .collect(),
            classes: vec!["a".to_owned(), "b".to_owned()],
        };
        let spec = SplitSpec {
            parts: vec![
                SplitPart {
                    name: "test".to_owned(),
                    ratio: 0.25,
                },
                SplitPart {
                    name: "train".to_owned(),
                    ratio: 0.75,
                },
            ],
            seed: 9,
        };
        let parts = random_split(&table, &spec).unwrap();
        assert_eq!(parts[0].1.rows.len(), 5);
        assert_eq!(parts[1].1.rows.len(), 15);
        let mut all: Vec<RowRecord> = parts.iter().flat_map(|p| p.1.rows.clone()).collect();
        all.sort_by(|a, b| a.row_id.cmp(&b.row_id));
        assert_eq!(all, table.rows);
        assert_eq!(parts[0].1.classes, table.classes);
        assert_eq!(random_split(&table, &spec).unwrap(), parts);
    }
}
