//! The `report` stage: one HTML page comparing eval stages (metrics side by side, samples whose
//! outcome changed), plus the comparison's headline table in its metadata.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::{HtmlOptions, ReportInput, StageReport, headline_table, write_html};
use crate::exec::{Export, MissingInput, Stage, StageContext, StageError, StageOutcome};
use crate::stages::data::{IMAGES_FILE, ImageStore};
use crate::stages::eval::REPORT_FILE;

/// Bumped when the report's output for the same inputs changes.
// 2: thumbnails are decoded as the model decodes (the pixel cap checked from the header, EXIF
//    orientation); an image over the cap is an error placeholder.
// 3: the comparison shows each model's size on disk and wrong answers that changed.
const REPORT_CODE_VERSION: u32 = 3;

/// One eval a report compares: its name, its input slot and the slot of its dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComparedEval {
    pub name: String,
    pub slot: usize,
    pub dataset_slot: usize,
}

/// What a `report` stage compares.
#[derive(Clone, Debug)]
pub struct ReportConfig {
    /// The node's canonical parameters.
    pub params: Value,
    pub title: String,
    /// The evals, baseline first.
    pub compared: Vec<ComparedEval>,
    /// Where the export goes (`evals/<pipeline>/<stage>/`).
    pub export_dir: PathBuf,
}

/// A configured report stage.
pub struct ReportStage {
    canonical: Value,
    title: String,
    compared: Vec<ComparedEval>,
    /// Compared evals that have no entry in this run, with why: set only on the partial stage
    /// built by [`Stage::without_inputs`], and part of its parameters.
    missing: Vec<(String, String)>,
    export_dir: PathBuf,
}

impl ReportStage {
    pub(crate) fn from_config(config: ReportConfig) -> Self {
        Self {
            canonical: config.params,
            title: config.title,
            compared: config.compared,
            missing: Vec::new(),
            export_dir: config.export_dir,
        }
    }
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
        Export::all(&[REPORT_FILE], &self.export_dir)
    }

    fn without_inputs(&self, missing: &[MissingInput]) -> Option<Box<dyn Stage>> {
        let reason_of = |slot: usize| missing.iter().find(|m| m.slot == slot);
        // Inputs keep their order with the missing ones removed.
        let remap = |slot: usize| slot - missing.iter().filter(|m| m.slot < slot).count();
        let mut compared = Vec::new();
        let mut absent = self.missing.clone();
        for eval in &self.compared {
            match reason_of(eval.slot).or_else(|| reason_of(eval.dataset_slot)) {
                Some(m) => absent.push((eval.name.clone(), m.reason.to_string())),
                None => compared.push(ComparedEval {
                    name: eval.name.clone(),
                    slot: remap(eval.slot),
                    dataset_slot: remap(eval.dataset_slot),
                }),
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
        for eval in &self.compared {
            stages.push(StageReport::load(
                eval.name.clone(),
                ctx.input(eval.slot)?.dir(),
            )?);
            stores.push(ImageStore::open(
                &ctx.input(eval.dataset_slot)?.path(IMAGES_FILE),
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
