//! The `report` stage: one HTML page comparing eval stages (metrics side by side, samples whose
//! outcome changed), plus the comparison's headline table in its metadata.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::{HtmlOptions, ReportInput, StageReport, headline_table, write_html};
use crate::exec::{Export, MissingInput, Stage, StageContext, StageError, StageOutcome};
use crate::plan::{Node, NodeParams, Plan};
use crate::stages::data::{IMAGES_FILE, ImageStore};
use crate::stages::eval::REPORT_FILE;
use crate::stages::eval::stage::export_files;
use crate::stages::lower::{InputPositions, LowerContext, LowerError, root_dataset};

const REPORT_CODE_VERSION: u32 = 1;

/// A configured report stage.
pub struct ReportStage {
    canonical: Value,
    title: String,
    /// (eval name, its input slot, the slot of its dataset).
    compared: Vec<(String, usize, usize)>,
    /// Compared evals that have no entry in this run, with why: set only on the partial stage
    /// built by [`Stage::without_inputs`], and part of its parameters.
    missing: Vec<(String, String)>,
    export_dir: PathBuf,
}

/// Builds the report stage of `node` (the lowering hook).
pub fn lower_report(
    node: &Node,
    plan: &Plan,
    ctx: &LowerContext<'_>,
    inputs: &InputPositions,
) -> Result<Box<dyn Stage>, LowerError> {
    let unsupported = |message: String| LowerError::Unsupported {
        stage: node.name.clone(),
        message,
    };
    let NodeParams::Report(params) = &node.params else {
        return Err(unsupported("not a report node".to_owned()));
    };
    let mut compared = Vec::with_capacity(params.compare.len());
    for eval in &params.compare {
        let Some(NodeParams::Eval(eval_params)) = plan.node(eval.id).map(|n| &n.params) else {
            return Err(unsupported(format!("`{}` is not an eval stage", eval.name)));
        };
        let dataset = root_dataset(&eval_params.data, plan);
        compared.push((
            eval.name.clone(),
            inputs.input_index(eval.id)?,
            inputs.input_index(dataset)?,
        ));
    }
    Ok(Box::new(ReportStage {
        canonical: node.canonical_params(),
        title: params
            .title
            .clone()
            .unwrap_or_else(|| format!("{} — {}", plan.settings.name, node.name)),
        compared,
        missing: Vec::new(),
        export_dir: ctx.evals_dir.join(&node.name),
    }))
}

impl Stage for ReportStage {
    fn kind(&self) -> &'static str {
        "report"
    }

    fn code_version(&self) -> u32 {
        REPORT_CODE_VERSION
    }

    fn params(&self) -> Value {
        if self.missing.is_empty() {
            return self.canonical.clone();
        }
        // A partial report is keyed by what it lacks, so it is never served as the complete one.
        json!({ "report": self.canonical, "missing": self.missing })
    }

    fn exports(&self) -> Vec<Export> {
        export_files(&[REPORT_FILE], &self.export_dir)
    }

    fn without_inputs(&self, missing: &[MissingInput]) -> Option<Box<dyn Stage>> {
        let reason_of = |slot: usize| missing.iter().find(|m| m.slot == slot);
        // Inputs keep their order with the missing ones removed.
        let remap = |slot: usize| slot - missing.iter().filter(|m| m.slot < slot).count();
        let mut compared = Vec::new();
        let mut absent = self.missing.clone();
        for (name, slot, dataset_slot) in &self.compared {
            match reason_of(*slot).or_else(|| reason_of(*dataset_slot)) {
                Some(m) => absent.push((name.clone(), m.reason.clone())),
                None => compared.push((name.clone(), remap(*slot), remap(*dataset_slot))),
            }
        }
        if compared.is_empty() {
            return None;
        }
        Some(Box::new(ReportStage {
            canonical: self.canonical.clone(),
            title: self.title.clone(),
            compared,
            missing: absent,
            export_dir: self.export_dir.clone(),
        }))
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let mut stages = Vec::with_capacity(self.compared.len());
        let mut stores = Vec::new();
        for (name, slot, dataset_slot) in &self.compared {
            stages.push(StageReport::load(name.clone(), ctx.inputs[*slot].dir())?);
            stores.push(ImageStore::open(
                &ctx.inputs[*dataset_slot].path(IMAGES_FILE),
            )?);
        }
        // Image ids are content hashes, so the first store holding an id has the right bytes.
        let images = |id: &str| {
            stores
                .iter()
                .find_map(|store| store.get(id).ok().map(|stored| stored.bytes))
        };
        let table: Vec<(&str, &crate::stages::eval::Metrics)> = stages
            .iter()
            .map(|s| (s.name.as_str(), &s.metrics))
            .collect();
        let headline = headline_table(&table);
        let input = ReportInput {
            title: self.title.clone(),
            stages,
        };
        let options = HtmlOptions {
            missing: self.missing.clone(),
            ..HtmlOptions::default()
        };
        write_html(&ctx.out_path(REPORT_FILE), &input, &images, &options)?;
        let warnings = self
            .missing
            .iter()
            .map(|(name, reason)| format!("`{name}` is not in the report: {reason}"))
            .collect();
        Ok(StageOutcome {
            metadata: json!({ "headline": headline, "missing": self.missing }),
            warnings,
        })
    }
}
