//! Lowering: a checked [`Plan`] becomes the [`ExecGraph`] the executor runs.
//!
//! Every plan node becomes one exec node with the same name, in the plan's topological order,
//! reading the exec inputs [`InputPositions`] lists. Like datafusion's physical planner, lowering
//! resolves everything the plan refers to (prompts, grammars, input slots, data files, root
//! datasets, local paths, hyperparameters) and builds each stage from plain typed configuration:
//! `XStage::from_config(XConfig)`, one per stage kind, in the folder of its kind.
//!
//! **API Boundary**: this module is the only one under `stages` that reads `crate::plan`; stages
//! never see the plan, the executor never sees the plan, and the plan never sees stages.

mod data;
mod eval;
mod export;
mod finetune;
mod inputs;
mod model;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

pub(crate) use data::DatasetConfigError;
pub(crate) use inputs::{InputPositions, data_file, root_dataset};

use crate::cache::sort_keys;
use crate::exec::{ExecGraph, ExecNode, Stage};
use crate::hub::Hub;
use crate::plan::params::{GrammarParams, GrammarSpec as PlanGrammar, NodeRef};
use crate::plan::{Node, NodeParams, Plan};
use crate::stages::data::DatasetStage;
use crate::stages::declared::{
    GrammarConfig, GrammarStage, LabelsConfig, LabelsStage, PromptConfig, PromptStage,
};
use crate::stages::eval::stage::EvalStage;
use crate::stages::export::ExportStage;
use crate::stages::finetune::FinetuneStage;
use crate::stages::model::ModelStage;
use crate::stages::prompt::PromptTemplates;
use crate::stages::report::ReportStage;
use crate::stages::rows::{SampleStage, SplitStage};

/// What lowering needs besides the plan: where things live on this machine.
pub(crate) struct LowerContext<'a> {
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
pub(crate) enum LowerError {
    /// A stage reads a node that is not among its exec inputs (a lowering bug).
    #[error("stage `{stage}` reads `{target}`, which is not one of its inputs")]
    MissingInput { stage: String, target: String },
    /// A node refers to a node id the plan does not have (a checker bug).
    #[error("stage `{stage}` refers to node #{id}, which is not in the plan")]
    UnknownNode { stage: String, id: usize },
    /// A dataset declaration the checker accepts but ingest cannot run.
    #[error("stage `{stage}`: {source}")]
    Dataset {
        stage: String,
        #[source]
        source: DatasetConfigError,
    },
    /// Parameters the checker accepts but the stage kind cannot run.
    #[error("stage `{stage}`: {message}")]
    Unsupported { stage: String, message: String },
}

/// Lowers `plan` into an executable graph.
pub(crate) fn lower(plan: &Plan, ctx: &LowerContext<'_>) -> Result<ExecGraph, LowerError> {
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

/// The stage of one node, built from its configuration.
fn lower_node(
    node: &Node,
    plan: &Plan,
    ctx: &LowerContext<'_>,
    positions: &InputPositions,
) -> Result<Box<dyn Stage>, LowerError> {
    Ok(match &node.params {
        NodeParams::Dataset(p) => Box::new(DatasetStage::from_config(data::dataset_config(
            node, p, ctx,
        )?)),
        NodeParams::Split(p) => Box::new(SplitStage::from_config(data::split_config(
            node, p, plan, positions,
        )?)),
        NodeParams::Sample(p) => Box::new(SampleStage::from_config(data::sample_config(
            node, p, plan, positions,
        )?)),
        NodeParams::Shuffle(p) => Box::new(SampleStage::from_config(data::shuffle_config(
            node, p, plan, positions,
        )?)),
        NodeParams::Labels(p) => Box::new(LabelsStage::from_config(LabelsConfig {
            values: p.values.clone(),
        })),
        NodeParams::Prompt(p) => Box::new(PromptStage::from_config(PromptConfig {
            templates: PromptTemplates {
                system: p.system.clone(),
                user: p.user.clone(),
            },
            pipeline_params: pipeline_params(plan),
        })),
        NodeParams::Grammar(p) => Box::new(GrammarStage::from_config(grammar_config(p))),
        NodeParams::Model(p) => {
            Box::new(ModelStage::from_config(model::model_config(node, p, ctx)?))
        }
        NodeParams::Eval(p) => Box::new(EvalStage::from_config(eval::eval_config(
            node, p, plan, ctx, positions,
        )?)),
        NodeParams::Finetune(p) => Box::new(FinetuneStage::from_config(finetune::finetune_config(
            node, p, plan, ctx, positions,
        )?)),
        NodeParams::Export(p) => Box::new(ExportStage::from_config(export::export_config(
            node, p, plan, ctx, positions,
        )?)),
        NodeParams::Report(p) => Box::new(ReportStage::from_config(eval::report_config(
            node, p, plan, ctx, positions,
        )?)),
    })
}

/// The pipeline's params (after `--set`) as JSON, what prompt templates read.
fn pipeline_params(plan: &Plan) -> BTreeMap<String, Value> {
    plan.settings
        .params
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or(Value::Null)))
        .collect()
}

/// A `grammar` entry: the declaration as the plan serialises it and, for `json {…}` and
/// `json_schema(…)`, its JSON Schema.
fn grammar_config(params: &GrammarParams) -> GrammarConfig {
    let json_schema = match &params.spec {
        PlanGrammar::Json { schema } => Some(schema.to_json_schema()),
        PlanGrammar::JsonSchema { schema, .. } => Some(schema.clone()),
        PlanGrammar::OneOf { .. } | PlanGrammar::Regex { .. } | PlanGrammar::Lark { .. } => None,
    };
    GrammarConfig {
        grammar: sort_keys(serde_json::to_value(params).unwrap_or(Value::Null)),
        json_schema,
    }
}

/// The templates of the prompt a stage names (the checker guarantees the kind; a mismatch is a
/// lowering bug).
fn prompt_of(node: &Node, plan: &Plan, prompt: &NodeRef) -> Result<PromptTemplates, LowerError> {
    match plan.node(prompt.id).map(|n| &n.params) {
        Some(NodeParams::Prompt(params)) => Ok(PromptTemplates {
            system: params.system.clone(),
            user: params.user.clone(),
        }),
        _ => Err(LowerError::Unsupported {
            stage: node.name.clone(),
            message: format!("`{}` is not a prompt", prompt.name),
        }),
    }
}

/// The decoder's form of the output grammar a stage names, if any.
fn grammar_of(
    node: &Node,
    plan: &Plan,
    output: Option<&NodeRef>,
) -> Result<Option<crate::decode::GrammarSpec>, LowerError> {
    let Some(output) = output else {
        return Ok(None);
    };
    match plan.node(output.id).map(|n| &n.params) {
        Some(NodeParams::Grammar(grammar)) => Ok(Some(grammar.decode_spec())),
        _ => Err(LowerError::Unsupported {
            stage: node.name.clone(),
            message: format!("`{}` is not a grammar", output.name),
        }),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;

    pub(crate) fn plan_of(text: &str) -> Plan {
        let result = crate::plan::check_source(Path::new("/tmp/lower_test.vp"), text, &[]);
        let rendered = crate::plan::render_diagnostics(&result, false);
        result.plan.unwrap_or_else(|| panic!("{rendered}"))
    }

    fn lowered(plan: &Plan, name: &str) -> Box<dyn Stage> {
        let ctx = LowerContext {
            plan,
            pipeline_dir: PathBuf::from("/tmp"),
            evals_dir: PathBuf::from("/tmp/evals"),
            hub: Hub::from_env(),
            threads: 1,
            device: candle_core::Device::Cpu,
        };
        let node = plan.find(name).expect("node");
        lower_node(node, plan, &ctx, &InputPositions::of(node, plan)).expect("lowered")
    }

    #[test]
    fn prompt_params_cover_only_the_params_its_templates_read() {
        let plan = plan_of(
            r#"
            pipeline p { seed = 1 }
            param tone = "kind"
            param n_eval = 10
            prompt ask { system = "Be {{ tone }}." user = "{% for l in labels %}{{ l }} {% endfor %}" }
            "#,
        );
        let params = lowered(&plan, "ask").params();
        assert_eq!(params["params"], json!({ "tone": "kind" }));
        assert_eq!(params["user"], "{% for l in labels %}{{ l }} {% endfor %}");
    }

    #[test]
    fn grammar_entry_carries_the_json_schema() {
        let plan = plan_of(
            r#"
            pipeline p { seed = 1 }
            labels animals = ["cat", "dog"]
            grammar g = json { pred_class: one_of(animals) }
            "#,
        );
        let Some(NodeParams::Grammar(g)) = plan.find("g").map(|n| &n.params) else {
            panic!("no grammar");
        };
        let config = grammar_config(g);
        let schema = config.json_schema.clone().expect("schema");
        assert_eq!(
            schema["properties"]["pred_class"]["enum"],
            json!(["cat", "dog"])
        );
        assert_eq!(lowered(&plan, "g").params(), config.grammar);
    }

    /// `json_schema(...)` compacts whitespace unless told otherwise, so a small token budget is
    /// not spent on blanks; `whitespace: "flexible"` still opts back in.
    #[test]
    fn json_schema_grammars_default_to_compact_whitespace() {
        let decode = |decl: &str| {
            let plan = plan_of(&format!("pipeline p {{ seed = 1 }}\ngrammar g = {decl}\n"));
            let Some(NodeParams::Grammar(g)) = plan.find("g").map(|n| &n.params) else {
                panic!("no grammar");
            };
            g.decode_spec()
        };
        let schema =
            r#"{ type: "object", properties: { a: { type: "string" } }, required: ["a"] }"#;
        let ws = |spec: crate::decode::GrammarSpec| match spec {
            crate::decode::GrammarSpec::Json { whitespace, .. } => whitespace,
            other => panic!("not JSON: {other:?}"),
        };
        use crate::decode::Whitespace as W;
        assert_eq!(ws(decode(&format!("json_schema({schema})"))), W::Compact);
        assert_eq!(
            ws(decode(&format!(
                "json_schema({schema}, whitespace: \"flexible\")"
            ))),
            W::Flexible
        );
    }
}
