//! The checked, typed plan: a DAG of stages with canonical parameters.
//!
//! [`load_pipeline`] reads a pipeline file and its imports, checks them, and returns the
//! [`Plan`] (when there is no error) with every diagnostic. The executor and the stages consume
//! the plan only; they never see syntax.
//!
//! **Architecture Invariant:** nodes are stored in topological order (every input before its
//! users), and a plan exists only when checking found no error.

pub(crate) mod analyzer;
pub mod graph;
pub mod params;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::dsl::diagnostic::Diagnostic;
use crate::dsl::loader;
use crate::dsl::render;
use crate::dsl::span::{SourceMap, Span};
use crate::read_policy::ReadPolicy;
pub use params::NodeParams;
use params::ParamValue;

/// Index of a node in [`Plan::nodes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NodeId(pub usize);

/// What a node computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    Labels,
    Dataset,
    Split,
    Sample,
    Shuffle,
    Prompt,
    Model,
    Grammar,
    Eval,
    Finetune,
    Export,
    Report,
}

impl NodeKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NodeKind::Labels => "labels",
            NodeKind::Dataset => "dataset",
            NodeKind::Split => "split",
            NodeKind::Sample => "sample",
            NodeKind::Shuffle => "shuffle",
            NodeKind::Prompt => "prompt",
            NodeKind::Model => "model",
            NodeKind::Grammar => "grammar",
            NodeKind::Eval => "eval",
            NodeKind::Finetune => "finetune",
            NodeKind::Export => "export",
            NodeKind::Report => "report",
        }
    }
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl NodeParams {
    pub(crate) fn kind(&self) -> NodeKind {
        match self {
            NodeParams::Labels(_) => NodeKind::Labels,
            NodeParams::Dataset(_) => NodeKind::Dataset,
            NodeParams::Split(_) => NodeKind::Split,
            NodeParams::Sample(_) => NodeKind::Sample,
            NodeParams::Shuffle(_) => NodeKind::Shuffle,
            NodeParams::Prompt(_) => NodeKind::Prompt,
            NodeParams::Model(_) => NodeKind::Model,
            NodeParams::Grammar(_) => NodeKind::Grammar,
            NodeParams::Eval(_) => NodeKind::Eval,
            NodeParams::Finetune(_) => NodeKind::Finetune,
            NodeParams::Export(_) => NodeKind::Export,
            NodeParams::Report(_) => NodeKind::Report,
        }
    }
}

/// One stage of the plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Node {
    pub id: NodeId,
    /// The declared name, or a stable generated one for anonymous nodes
    /// (`sample(pets_split.test,100,23)`).
    pub name: String,
    pub params: NodeParams,
    /// Nodes this one reads, without duplicates, in the order the parameters name them.
    pub inputs: Vec<NodeId>,
    /// Where it is declared (for messages).
    pub span: Span,
    /// True for nodes written inline (`sample(...)` in a field) rather than declared.
    pub anonymous: bool,
}

impl Node {
    pub fn kind(&self) -> NodeKind {
        self.params.kind()
    }

    /// The parameters as JSON with sorted keys: equal for pipelines that differ only in
    /// formatting or comments, different when a value changes. Fingerprints hash this.
    pub fn canonical_params(&self) -> Value {
        sort_keys(serde_json::to_value(&self.params).unwrap_or(Value::Null))
    }
}

pub(crate) use crate::cache::sort_keys;

/// A stage name the pipeline does not have (`--only`, `--force`, `render STAGE`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct UnknownStage {
    pub name: String,
    pub pipeline: String,
    /// The closest name, as a suggestion (`did you mean `…`?`).
    pub hint: Option<String>,
}

impl fmt::Display for UnknownStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.hint {
            Some(hint) => write!(f, "unknown stage `{}`: {hint}", self.name),
            None => write!(
                f,
                "unknown stage `{}` in pipeline `{}`",
                self.name, self.pipeline
            ),
        }
    }
}

/// Plan-level settings from `pipeline NAME { ... }` and the params.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PipelineSettings {
    /// The `pipeline` name, or the file stem when there is no `pipeline` declaration.
    pub name: String,
    /// Default seed of seeded operations that do not name one.
    pub seed: u64,
    /// Every param after `--set` overrides.
    pub params: BTreeMap<String, ParamValue>,
    /// `executor slurm { ... }` of the root file: how the pipeline runs, never what it computes,
    /// so never serialised (nothing of it reaches a stage or a fingerprint).
    #[serde(skip)]
    pub executor: Option<ExecutorSettings>,
}

/// `executor slurm { ... }`: the Slurm settings a pipeline file carries (each also a flag and a
/// profile field; flags win over the file, the file over the profile).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExecutorSettings {
    /// `active = true` runs on Slurm without `--executor slurm`; `false` runs locally whatever
    /// the profile says; unset leaves the choice to the flag and the profile.
    pub active: Option<bool>,
    pub partition: Option<String>,
    pub gpus_per_task: Option<u32>,
    pub cpus_per_task: Option<u32>,
    pub max_parallel: Option<u32>,
    pub sbatch_args: Vec<String>,
    pub max_retries: Option<u32>,
    /// Seconds.
    pub probe_timeout: Option<f64>,
    /// Seconds.
    pub poll_interval: Option<f64>,
}

/// The checked pipeline.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub settings: PipelineSettings,
    /// In topological order.
    pub nodes: Vec<Node>,
    /// Every file the pipeline reads (itself, imports, templates, schemas, local data paths):
    /// what watch mode watches.
    pub files: Vec<PathBuf>,
    /// Where the stages may read (the pipeline's folder, the Hub cache, `--allow-read`): the
    /// user's consent for this run, never part of a fingerprint.
    #[serde(skip)]
    pub reads: ReadPolicy,
}

impl Plan {
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id.0)
    }

    pub fn find(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node a user names on the command line (`--only`, `--force`, `render STAGE`), or a
    /// message saying it does not exist, with the closest name as a suggestion.
    pub fn lookup_stage(&self, name: &str) -> Result<NodeId, UnknownStage> {
        if let Some(node) = self.find(name) {
            return Ok(node.id);
        }
        let names = self
            .nodes
            .iter()
            .filter(|n| !n.anonymous)
            .map(|n| n.name.as_str());
        Err(UnknownStage {
            name: name.to_owned(),
            pipeline: self.settings.name.clone(),
            hint: crate::dsl::diagnostic::did_you_mean(name, names),
        })
    }

    /// Nodes in dependency order (inputs first).
    pub(crate) fn topological(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter()
    }

    /// `targets` and everything they read, transitively, in topological order (for `--only`).
    pub fn inputs_of(&self, targets: &[NodeId]) -> Vec<NodeId> {
        let mut wanted = vec![false; self.nodes.len()];
        let mut stack: Vec<NodeId> = targets.to_vec();
        while let Some(id) = stack.pop() {
            let Some(slot) = wanted.get_mut(id.0) else {
                continue;
            };
            if *slot {
                continue;
            }
            *slot = true;
            if let Some(node) = self.node(id) {
                stack.extend(node.inputs.iter().copied());
            }
        }
        (0..self.nodes.len())
            .filter(|i| wanted[*i])
            .map(NodeId)
            .collect()
    }

    /// Nodes that read `id` directly.
    pub(crate) fn users_of(&self, id: NodeId) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.inputs.contains(&id))
            .map(|n| n.id)
            .collect()
    }
}

/// What checking a pipeline produced: the plan when there is no error, all diagnostics of all
/// files, and the sources to render them with.
#[derive(Debug)]
pub struct CheckResult {
    pub plan: Option<Plan>,
    pub diagnostics: Vec<Diagnostic>,
    pub sources: SourceMap,
}

impl CheckResult {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Reads, parses and checks the pipeline at `path`; `overrides` are `--set name=value` pairs.
/// It may read inside its own folder and the Hub cache only (see [`load_pipeline_with`]).
pub fn load_pipeline(path: &Path, overrides: &[(String, String)]) -> CheckResult {
    load_pipeline_with(path, overrides, &ReadPolicy::for_pipeline(path, &[]))
}

/// Like [`load_pipeline`], reading what `reads` allows (`--allow-read`); the plan keeps the
/// policy for the stages that read at run time.
pub fn load_pipeline_with(
    path: &Path,
    overrides: &[(String, String)],
    reads: &ReadPolicy,
) -> CheckResult {
    analyzer::check(loader::load(path, reads), path, overrides, reads)
}

/// Like [`load_pipeline`] for text already in memory, as if it were the file at `path`.
pub fn check_source(path: &Path, text: &str, overrides: &[(String, String)]) -> CheckResult {
    let reads = ReadPolicy::for_pipeline(path, &[]);
    analyzer::check(
        loader::load_text(path, text, &reads),
        path,
        overrides,
        &reads,
    )
}

/// The diagnostics as text for a terminal.
pub fn render_diagnostics(result: &CheckResult, color: bool) -> String {
    render::render_text(&result.diagnostics, &result.sources, color)
}

/// The diagnostics as a JSON array.
pub fn render_json(result: &CheckResult) -> Value {
    render::render_json(&result.diagnostics, &result.sources)
}
