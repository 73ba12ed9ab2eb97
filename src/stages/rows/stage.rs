//! The `split`, `sample` and `shuffle` stages: row tables in, row tables out.
//!
//! Each reads the rows of its source (`rows.parquet` of a dataset, sample or shuffle, or one
//! member file of a split) from its first exec input and writes row tables that reference the
//! root dataset's images by id; image bytes are never copied. A split writes one file per member
//! ([`part_file_name`]); a sample or shuffle writes `rows.parquet`.

use serde_json::{Value, json};

use crate::exec::{Stage, StageContext, StageError, StageOutcome};
use crate::plan::params::{SampleParams, ShuffleParams, SplitMethod, SplitParams};
use crate::plan::{Node, Plan};
use crate::stages::data::{
    DATA_CODE_VERSION, DataError, ROWS_FILE, RowTable, SplitPart, SplitSpec, part_file_name,
    read_rows, sample, shuffle, stratified_split, write_rows,
};
use crate::stages::lower::{InputPositions, LowerError, data_file};

/// Where a stage's source rows are: the input slot and the file within that entry.
#[derive(Clone, Debug)]
struct RowSource {
    slot: usize,
    file: String,
}

impl RowSource {
    fn new(
        data: &crate::plan::params::DataRef,
        plan: &Plan,
        positions: &InputPositions,
    ) -> Result<Self, LowerError> {
        Ok(Self {
            slot: positions.input_index(data.node.id)?,
            file: data_file(data, plan),
        })
    }

    fn read(&self, ctx: &StageContext<'_>) -> Result<RowTable, StageError> {
        let entry = ctx.inputs.get(self.slot).ok_or_else(|| {
            format!(
                "stage `{}` has no input #{} (a lowering bug)",
                ctx.name, self.slot
            )
        })?;
        Ok(read_rows(&entry.path(&self.file))?)
    }
}

fn counts(table: &RowTable) -> Value {
    let mut per_class = std::collections::BTreeMap::<&str, usize>::new();
    for row in &table.rows {
        *per_class.entry(row.label.as_str()).or_default() += 1;
    }
    json!({ "rows": table.rows.len(), "class_counts": per_class })
}

/// `split NAME = stratified(data, train: …, test: …, seed: …)` or `random(…)`.
pub struct SplitStage {
    params: Value,
    source: RowSource,
    method: SplitMethod,
    spec: SplitSpec,
}

impl SplitStage {
    pub fn new(
        node: &Node,
        params: &SplitParams,
        plan: &Plan,
        positions: &InputPositions,
    ) -> Result<Self, LowerError> {
        // Parts in a fixed order (the plan keeps ratios in a sorted map), so the cut is stable.
        let parts = params
            .ratios
            .iter()
            .map(|(name, ratio)| SplitPart {
                name: name.clone(),
                ratio: *ratio,
            })
            .collect();
        Ok(Self {
            params: node.canonical_params(),
            source: RowSource::new(&params.source, plan, positions)?,
            method: params.method,
            spec: SplitSpec {
                parts,
                seed: params.seed,
            },
        })
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
        self.params.clone()
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let table = self.source.read(ctx)?;
        let parts = match self.method {
            SplitMethod::Stratified => stratified_split(&table, &self.spec)?,
            SplitMethod::Random => random_split(&table, &self.spec)?,
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

/// `sample(data, n, seed: s)`.
pub struct SampleStage {
    params: Value,
    source: RowSource,
    n: u64,
    seed: u64,
}

impl SampleStage {
    pub fn new(
        node: &Node,
        params: &SampleParams,
        plan: &Plan,
        positions: &InputPositions,
    ) -> Result<Self, LowerError> {
        Ok(Self {
            params: node.canonical_params(),
            source: RowSource::new(&params.source, plan, positions)?,
            n: params.n,
            seed: params.seed,
        })
    }
}

impl Stage for SampleStage {
    fn kind(&self) -> &'static str {
        "sample"
    }

    fn code_version(&self) -> u32 {
        DATA_CODE_VERSION
    }

    fn params(&self) -> Value {
        self.params.clone()
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let table = self.source.read(ctx)?;
        let n = usize::try_from(self.n).unwrap_or(usize::MAX);
        let picked = sample(&table, n, self.seed)?;
        write_rows(&ctx.out_path(ROWS_FILE), &picked)?;
        Ok(StageOutcome {
            metadata: counts(&picked),
            ..StageOutcome::default()
        })
    }
}

/// `shuffle(data, seed: s)`.
pub struct ShuffleStage {
    params: Value,
    source: RowSource,
    seed: u64,
}

impl ShuffleStage {
    pub fn new(
        node: &Node,
        params: &ShuffleParams,
        plan: &Plan,
        positions: &InputPositions,
    ) -> Result<Self, LowerError> {
        Ok(Self {
            params: node.canonical_params(),
            source: RowSource::new(&params.source, plan, positions)?,
            seed: params.seed,
        })
    }
}

impl Stage for ShuffleStage {
    fn kind(&self) -> &'static str {
        "shuffle"
    }

    fn code_version(&self) -> u32 {
        DATA_CODE_VERSION
    }

    fn params(&self) -> Value {
        self.params.clone()
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let table = self.source.read(ctx)?;
        let shuffled = shuffle(&table, self.seed);
        write_rows(&ctx.out_path(ROWS_FILE), &shuffled)?;
        Ok(StageOutcome {
            metadata: counts(&shuffled),
            ..StageOutcome::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::data::RowRecord;

    #[test]
    fn random_split_keeps_labels_and_covers_all_rows() {
        let table = RowTable {
            rows: (0..20)
                .map(|i| RowRecord {
                    row_id: format!("r{i:02}"),
                    image_id: format!("i{i}"),
                    label: if i < 15 { "a" } else { "b" }.to_owned(),
                    label_index: u32::from(i >= 15),
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
