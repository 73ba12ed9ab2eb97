//! Lowering: a checked [`Plan`] becomes the [`ExecGraph`] the executor runs.
//!
//! Every plan node becomes one exec node with the same name, in the plan's topological order.
//! A node's exec inputs are its plan inputs in the same order, then, for nodes that read data
//! (`split`, `sample`, `shuffle`, `eval`, `finetune`), the root dataset node of each data chain
//! they read, appended when not already present, so a stage can open the dataset's
//! `images.parquet` (splits and samples only reference images by id).
//!
//! **API Boundary**: stage kinds are built from typed plan parameters here; the executor never
//! sees the plan and the plan never sees stages.

use std::path::PathBuf;

use crate::exec::{ExecGraph, ExecNode, Stage};
use crate::hub::Hub;
use crate::plan::params::DataRef;
use crate::plan::{Node, NodeId, NodeParams, Plan};
use crate::stages::data::{ROWS_FILE, part_file_name};

/// What lowering needs besides the plan: where things live on this machine.
pub struct LowerContext<'a> {
    pub plan: &'a Plan,
    /// The folder of the root pipeline file.
    pub pipeline_dir: PathBuf,
    /// Where eval and report stages write their exports (`evals/<pipeline>/` by default).
    pub evals_dir: PathBuf,
    /// Hugging Face Hub access (cache first, honours `HF_HUB_OFFLINE`).
    pub hub: Hub,
    /// Worker threads for ingest (0 = the machine's parallelism); never part of a fingerprint.
    pub threads: usize,
    /// Where eval and finetune stages load models; never part of a fingerprint, so switching
    /// device reuses the cache.
    pub device: candle_core::Device,
}

/// Why a plan could not be lowered (a plan bug or a source the stages cannot read).
#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    /// A stage reads a node that is not among its exec inputs (a lowering bug).
    #[error("stage `{stage}` reads `{target}`, which is not one of its inputs")]
    MissingInput { stage: String, target: String },
    /// A node refers to a node id the plan does not have (a checker bug).
    #[error("stage `{stage}` refers to node #{id}, which is not in the plan")]
    UnknownNode { stage: String, id: usize },
    /// Parameters the checker accepts but the stage kind cannot run.
    #[error("stage `{stage}`: {message}")]
    Unsupported { stage: String, message: String },
}

/// Positions of a node's exec inputs: which input slot holds which plan node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputPositions {
    stage: String,
    ids: Vec<NodeId>,
    names: Vec<String>,
}

impl InputPositions {
    /// The exec inputs of `node` (see the module doc for the order).
    pub fn of(node: &Node, plan: &Plan) -> Self {
        let ids = exec_inputs(node, plan);
        let names = ids
            .iter()
            .map(|id| plan.node(*id).map_or_else(String::new, |n| n.name.clone()))
            .collect();
        Self {
            stage: node.name.clone(),
            ids,
            names,
        }
    }

    /// The input slot (index into `StageContext::inputs`) that holds `target`'s entry.
    pub fn input_index(&self, target: NodeId) -> Result<usize, LowerError> {
        self.ids
            .iter()
            .position(|id| *id == target)
            .ok_or_else(|| LowerError::MissingInput {
                stage: self.stage.clone(),
                target: format!("#{}", target.0),
            })
    }

    /// The plan nodes in slot order.
    pub fn ids(&self) -> &[NodeId] {
        &self.ids
    }

    /// The names of the plan nodes in slot order.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// The exec inputs of `node`: its plan inputs, then the root datasets of the data it reads.
pub fn exec_inputs(node: &Node, plan: &Plan) -> Vec<NodeId> {
    let mut ids = node.inputs.clone();
    let mut refs = data_refs(&node.params);
    // A report shows the images of the evals it compares, so it reads their datasets too.
    if let NodeParams::Report(report) = &node.params {
        for compared in &report.compare {
            if let Some(NodeParams::Eval(eval)) = plan.node(compared.id).map(|n| &n.params) {
                refs.push(&eval.data);
            }
        }
    }
    for data in refs {
        let root = root_dataset(data, plan);
        if !ids.contains(&root) {
            ids.push(root);
        }
    }
    ids
}

/// The data references a node reads rows from (none for nodes that do not read data).
fn data_refs(params: &NodeParams) -> Vec<&DataRef> {
    match params {
        NodeParams::Split(p) => vec![&p.source],
        NodeParams::Sample(p) => vec![&p.source],
        NodeParams::Shuffle(p) => vec![&p.source],
        NodeParams::Eval(p) => vec![&p.data],
        NodeParams::Finetune(p) => {
            let mut refs = vec![&p.data];
            refs.extend(p.eval_data.as_ref());
            refs
        }
        NodeParams::Labels(_)
        | NodeParams::Dataset(_)
        | NodeParams::Prompt(_)
        | NodeParams::Model(_)
        | NodeParams::Grammar(_)
        | NodeParams::Report(_) => Vec::new(),
    }
}

/// The file holding `data_ref`'s rows within the referenced node's cache entry.
///
/// `plan` is part of the contract so a future node kind with several outputs can be told apart;
/// today a member always names a split part and every other data node writes `rows.parquet`.
pub fn data_file(data_ref: &DataRef, _plan: &Plan) -> String {
    match &data_ref.member {
        Some(member) => part_file_name(member),
        None => ROWS_FILE.to_owned(),
    }
}

/// The dataset node at the start of `data_ref`'s chain (split → sample → … → dataset).
///
/// The checker guarantees every chain ends at a dataset; a broken chain returns the last node
/// reached, which then fails loudly when the stage opens its images.
pub fn root_dataset(data_ref: &DataRef, plan: &Plan) -> NodeId {
    let mut id = data_ref.node.id;
    // Bounded by the node count: a plan is acyclic, so a longer walk would be a checker bug.
    for _ in 0..=plan.nodes.len() {
        let next = match plan.node(id).map(|n| &n.params) {
            Some(NodeParams::Split(p)) => p.source.node.id,
            Some(NodeParams::Sample(p)) => p.source.node.id,
            Some(NodeParams::Shuffle(p)) => p.source.node.id,
            _ => return id,
        };
        id = next;
    }
    id
}

/// Lowers `plan` into an executable graph.
pub fn lower(plan: &Plan, ctx: &LowerContext<'_>) -> Result<ExecGraph, LowerError> {
    let mut nodes = Vec::with_capacity(plan.nodes.len());
    for node in plan.topological() {
        let positions = InputPositions::of(node, plan);
        let mut inputs = Vec::with_capacity(positions.ids().len());
        for id in positions.ids() {
            // Plan order is topological and ids are indices, so a node's inputs come first.
            if id.0 >= node.id.0 || id.0 >= plan.nodes.len() {
                return Err(LowerError::UnknownNode {
                    stage: node.name.clone(),
                    id: id.0,
                });
            }
            inputs.push(id.0);
        }
        let stage = lower_node(node, plan, ctx, &positions)?;
        nodes.push(ExecNode {
            name: node.name.clone(),
            inputs,
            stage,
        });
    }
    Ok(ExecGraph {
        pipeline: plan.settings.name.clone(),
        nodes,
    })
}

fn lower_node(
    node: &Node,
    plan: &Plan,
    ctx: &LowerContext<'_>,
    positions: &InputPositions,
) -> Result<Box<dyn Stage>, LowerError> {
    use crate::stages::{data, declared, model, rows};
    Ok(match &node.params {
        NodeParams::Dataset(p) => Box::new(data::stage::DatasetStage::new(node, p, ctx)?),
        NodeParams::Split(p) => Box::new(rows::SplitStage::new(node, p, plan, positions)?),
        NodeParams::Sample(p) => Box::new(rows::SampleStage::new(node, p, plan, positions)?),
        NodeParams::Shuffle(p) => Box::new(rows::ShuffleStage::new(node, p, plan, positions)?),
        NodeParams::Labels(p) => Box::new(declared::LabelsStage::new(p)),
        NodeParams::Prompt(p) => Box::new(declared::PromptStage::new(p, plan)),
        NodeParams::Grammar(p) => Box::new(declared::GrammarStage::new(p)),
        NodeParams::Model(p) => Box::new(model::ModelStage::new(node, p, ctx)?),
        NodeParams::Eval(_) => crate::stages::eval::stage::lower_eval(node, plan, ctx, positions)?,
        NodeParams::Finetune(_) => {
            crate::stages::finetune::stage::lower_finetune(node, plan, ctx, positions)?
        }
        NodeParams::Report(_) => {
            crate::stages::report::stage::lower_report(node, plan, ctx, positions)?
        }
    })
}

/// The prompt a stage names (the checker guarantees the kind; a mismatch is a lowering bug).
pub fn prompt_of(
    node: &Node,
    plan: &Plan,
    prompt: &crate::plan::params::NodeRef,
) -> Result<crate::plan::params::PromptParams, LowerError> {
    match plan.node(prompt.id).map(|n| &n.params) {
        Some(NodeParams::Prompt(params)) => Ok(params.clone()),
        _ => Err(LowerError::Unsupported {
            stage: node.name.clone(),
            message: format!("`{}` is not a prompt", prompt.name),
        }),
    }
}

/// The decoder's form of the output grammar a stage names, if any.
pub fn grammar_of(
    node: &Node,
    plan: &Plan,
    output: Option<&crate::plan::params::NodeRef>,
) -> Result<Option<crate::decode::GrammarSpec>, LowerError> {
    let Some(output) = output else {
        return Ok(None);
    };
    match plan.node(output.id).map(|n| &n.params) {
        Some(NodeParams::Grammar(grammar)) => {
            Ok(Some(crate::stages::declared::grammar_spec(grammar)))
        }
        _ => Err(LowerError::Unsupported {
            stage: node.name.clone(),
            message: format!("`{}` is not a grammar", output.name),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::plan::NodeKind;

    fn plan_of(text: &str) -> Plan {
        let result = crate::plan::check_source(Path::new("/tmp/lower_test.vp"), text, &[]);
        let rendered = crate::plan::render_diagnostics(&result, false);
        result.plan.unwrap_or_else(|| panic!("{rendered}"))
    }

    #[test]
    fn inputs_append_root_datasets_once() {
        let plan = plan_of(
            r#"
            pipeline p { seed = 3 }
            labels animals = ["cat", "dog"]
            dataset pets { source = synthetic(kind: "shapes", n: 8, seed: 1) label = "label" }
            split s = stratified(pets, train: 0.5, test: 0.5, seed: 1)
            "#,
        );
        let split = plan.find("s").unwrap();
        assert_eq!(
            exec_inputs(split, &plan),
            vec![plan.find("pets").unwrap().id]
        );
    }

    #[test]
    fn sample_of_split_member_reads_member_file_and_root() {
        let plan = plan_of(
            r#"
            pipeline p { seed = 3 }
            labels animals = ["cat", "dog"]
            dataset pets { source = synthetic(kind: "shapes", n: 8, seed: 1) label = "label" }
            split s = stratified(pets, train: 0.5, test: 0.5, seed: 1)
            prompt q { user = "which? {{ labels }}" }
            model m = init(preset: "tiny", seed: 1)
            eval e { model = m  data = sample(s.test, 2, seed: 4)  prompt = q  labels = animals }
            "#,
        );
        let sample = plan
            .nodes
            .iter()
            .find(|n| n.kind() == NodeKind::Sample)
            .unwrap();
        let NodeParams::Sample(p) = &sample.params else {
            unreachable!()
        };
        assert_eq!(data_file(&p.source, &plan), "test.parquet");
        let pets = plan.find("pets").unwrap().id;
        assert_eq!(root_dataset(&p.source, &plan), pets);
        let inputs = exec_inputs(sample, &plan);
        assert_eq!(inputs, vec![plan.find("s").unwrap().id, pets]);
        let eval = plan.find("e").unwrap();
        let positions = InputPositions::of(eval, &plan);
        assert_eq!(*positions.ids().last().unwrap(), pets);
        assert!(positions.input_index(pets).is_ok());
        assert!(positions.input_index(plan.find("q").unwrap().id).is_ok());
    }
}
