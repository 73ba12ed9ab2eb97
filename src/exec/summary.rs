//! The run summary: what happened to every stage, for people and for `--summary-json`.

use std::path::PathBuf;

use serde::Serialize;

use crate::dsl::render::escape_control;

/// What happened to a stage in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    /// Computed in this run.
    Ran,
    /// A verified cache entry was reused.
    Cached,
    /// The stage returned an error.
    Failed,
    /// Not run: an input failed, `--only` left it out, or the run was interrupted.
    Skipped,
    /// `--dry-run`: the stage would run.
    WouldRun,
}

impl StageStatus {
    /// The word used in the terminal table.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StageStatus::Ran => "ran",
            StageStatus::Cached => "cached",
            StageStatus::Failed => "failed",
            StageStatus::Skipped => "skipped",
            StageStatus::WouldRun => "would run",
        }
    }
}

/// One stage's line of the summary.
#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    /// Stage name in the pipeline.
    pub name: String,
    /// Stage kind.
    pub kind: String,
    /// What happened.
    pub status: StageStatus,
    /// The stage's fingerprint (empty when it could not be computed).
    pub fingerprint: String,
    /// Wall-clock seconds spent on the stage in this run (lookup included).
    pub seconds: f64,
    /// Files in the cache entry, then exports outside the cache.
    pub outputs: Vec<PathBuf>,
    /// Why the stage ran, was skipped or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Warnings the stage recorded (rejected rows and the like).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// A sharded stage that ran: which shards it computed and which it found cached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<super::shards::ShardCounts>,
    /// A stage that ran as one job of a cluster engine instead of in this process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elsewhere: Option<Elsewhere>,
}

/// Where a whole stage ran when not in this process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Elsewhere {
    /// The launcher (`slurm`).
    pub launcher: String,
    /// The ids of the jobs submitted for it (a resubmission adds one).
    pub jobs: Vec<String>,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    /// Every stage of the graph, in execution order.
    pub stages: Vec<StageReport>,
    /// Total wall-clock seconds.
    pub seconds: f64,
    /// True when no stage failed.
    pub success: bool,
    /// True for `--dry-run`.
    pub dry_run: bool,
}

impl RunSummary {
    /// The report of stage `name`.
    pub(crate) fn stage(&self, name: &str) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// A terminal table: one line per stage.
    pub fn render_table(&self) -> String {
        let name_width = self
            .stages
            .iter()
            .map(|s| s.name.len())
            .max()
            .unwrap_or(4)
            .max(5);
        let kind_width = self
            .stages
            .iter()
            .map(|s| s.kind.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let mut out = String::new();
        for stage in &self.stages {
            let mut line = format!(
                "{:<name_width$}  {:<kind_width$}  {:<9}  {:>8.2}s",
                stage.name,
                stage.kind,
                stage.status.as_str(),
                stage.seconds,
            );
            if let Some(reason) = &stage.reason {
                line.push_str("  ");
                // A reason quotes stage errors, which quote pipeline text: no terminal escapes.
                line.push_str(&escape_control(reason));
            }
            out.push_str(line.trim_end());
            out.push('\n');
            for warning in &stage.warnings {
                let warning = escape_control(warning);
                out.push_str(&format!("{:name_width$}  warning: {warning}\n", ""));
            }
        }
        let count = |status| self.stages.iter().filter(|s| s.status == status).count();
        if self.dry_run {
            out.push_str(&format!(
                "dry run, nothing ran: {} would run, {} cached, {} failed, {} skipped in {:.2}s\n",
                count(StageStatus::WouldRun),
                count(StageStatus::Cached),
                count(StageStatus::Failed),
                count(StageStatus::Skipped),
                self.seconds
            ));
        } else {
            out.push_str(&format!(
                "{} ran, {} cached, {} failed, {} skipped in {:.2}s\n",
                count(StageStatus::Ran),
                count(StageStatus::Cached),
                count(StageStatus::Failed),
                count(StageStatus::Skipped),
                self.seconds
            ));
        }
        out
    }
}
