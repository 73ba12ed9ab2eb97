//! Where a node's inputs sit among its exec inputs, and where the rows of a data reference are.
//!
//! A node's exec inputs are its plan inputs in the same order, then, for nodes that read data
//! (`split`, `sample`, `shuffle`, `eval`, `finetune`, and `report` through the evals it
//! compares), the root dataset node of each data chain they read, appended when not already
//! present, so a stage can open the dataset's `images.parquet` (splits and samples only
//! reference images by id).

use crate::plan::params::DataRef;
use crate::plan::{Node, NodeId, NodeParams, Plan};
use crate::stages::data::{DataInput, ROWS_FILE, part_file_name};

use super::LowerError;

/// Positions of a node's exec inputs: which input slot holds which plan node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct InputPositions {
    stage: String,
    ids: Vec<NodeId>,
    names: Vec<String>,
}

impl InputPositions {
    /// The exec inputs of `node` (see the module doc for the order).
    pub(crate) fn of(node: &Node, plan: &Plan) -> Self {
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
    pub(crate) fn input_index(&self, target: NodeId) -> Result<usize, LowerError> {
        self.ids
            .iter()
            .position(|id| *id == target)
            .ok_or_else(|| LowerError::MissingInput {
                stage: self.stage.clone(),
                target: format!("#{}", target.0),
            })
    }

    /// The plan nodes in slot order.
    pub(crate) fn ids(&self) -> &[NodeId] {
        &self.ids
    }

    /// Where the rows of `data` and the images they reference are among these inputs.
    pub(crate) fn data_input(&self, data: &DataRef, plan: &Plan) -> Result<DataInput, LowerError> {
        Ok(DataInput {
            name: data.display_name(),
            slot: self.input_index(data.node.id)?,
            file: data_file(data, plan),
            dataset_slot: self.input_index(root_dataset(data, plan))?,
        })
    }
}

/// The exec inputs of `node`: its plan inputs, then the root datasets of the data it reads.
pub(crate) fn exec_inputs(node: &Node, plan: &Plan) -> Vec<NodeId> {
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
        | NodeParams::Export(_)
        | NodeParams::Report(_) => Vec::new(),
    }
}

/// The file holding `data_ref`'s rows within the referenced node's cache entry.
///
/// `plan` is part of the contract so a future node kind with several outputs can be told apart;
/// today a member always names a split part and every other data node writes `rows.parquet`.
pub(crate) fn data_file(data_ref: &DataRef, _plan: &Plan) -> String {
    match &data_ref.member {
        Some(member) => part_file_name(member),
        None => ROWS_FILE.to_owned(),
    }
}

/// The dataset node at the start of `data_ref`'s chain (split → sample → … → dataset).
///
/// The checker guarantees every chain ends at a dataset; a broken chain returns the last node
/// reached, which then fails loudly when the stage opens its images.
pub(crate) fn root_dataset(data_ref: &DataRef, plan: &Plan) -> NodeId {
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

#[cfg(test)]
mod tests {
    use super::super::tests::plan_of;
    use super::*;
    use crate::plan::NodeKind;

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
        let positions = InputPositions::of(sample, &plan);
        let input = positions.data_input(&p.source, &plan).unwrap();
        assert_eq!((input.slot, input.dataset_slot), (0, 1));
        assert_eq!(input.file, "test.parquet");
        let eval = plan.find("e").unwrap();
        let positions = InputPositions::of(eval, &plan);
        assert_eq!(*positions.ids().last().unwrap(), pets);
        assert!(positions.input_index(pets).is_ok());
        assert!(positions.input_index(plan.find("q").unwrap().id).is_ok());
    }
}
