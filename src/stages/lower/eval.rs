//! The `eval` and `report` stages' configuration: the prompt, grammar, labels and decoding an
//! eval uses, and where each compared eval and its images are.

use crate::model::generate::Sampling;
use crate::model::processor::DEFAULT_MAX_IMAGE_PIXELS;
use crate::plan::params::{EvalParams, ReportParams, Scoring};
use crate::plan::{Node, NodeParams, Plan};
use crate::runner::DecodeOptions;
use crate::stages::eval::stage::{EvalAnswer, EvalConfig};
use crate::stages::model::ModelResolver;
use crate::stages::report::{ComparedEval, ReportConfig};

use super::{
    InputPositions, LowerContext, LowerError, grammar_of, pipeline_params, prompt_of, root_dataset,
};

/// The `eval` stage of `node`.
pub(super) fn eval_config(
    node: &Node,
    params: &EvalParams,
    plan: &Plan,
    ctx: &LowerContext<'_>,
    inputs: &InputPositions,
) -> Result<EvalConfig, LowerError> {
    let dataset = root_dataset(&params.data, plan);
    let max_image_pixels = match plan.node(dataset).map(|n| &n.params) {
        Some(NodeParams::Dataset(d)) => d.max_image_pixels,
        _ => None,
    }
    .unwrap_or(DEFAULT_MAX_IMAGE_PIXELS);
    let answer = match params.scoring {
        Scoring::Labels => EvalAnswer::ScoreLabels,
        Scoring::Generate => EvalAnswer::Generate(DecodeOptions {
            max_new_tokens: params.max_new_tokens as usize,
            sampling: Sampling {
                temperature: params.temperature as f32,
                top_p: None,
                min_p: params.min_p.map(|p| p as f32),
                repetition_penalty: params.repetition_penalty.map(|p| p as f32),
                seed: 0,
            },
        }),
    };
    Ok(EvalConfig {
        params: node.canonical_params(),
        labels: params.labels.values.clone(),
        prompt: prompt_of(node, plan, &params.prompt)?,
        grammar: grammar_of(node, plan, params.output.as_ref())?,
        pipeline_params: pipeline_params(plan),
        model_slot: inputs.input_index(params.model.id)?,
        data: inputs.data_input(&params.data, plan)?,
        max_image_pixels,
        batch_size: params.batch_size.max(1) as usize,
        answer,
        positive_class: params.positive_class.clone(),
        export_dir: ctx.evals_dir.join(&node.name),
        models: ModelResolver::new(ctx.hub.clone(), ctx.pipeline_dir.clone()),
        device: ctx.device.clone(),
        shards: params.shards.map(|n| n as usize),
    })
}

/// The `report` stage of `node`.
pub(super) fn report_config(
    node: &Node,
    params: &ReportParams,
    plan: &Plan,
    ctx: &LowerContext<'_>,
    inputs: &InputPositions,
) -> Result<ReportConfig, LowerError> {
    let mut compared = Vec::with_capacity(params.compare.len());
    for eval in &params.compare {
        let Some(NodeParams::Eval(eval_params)) = plan.node(eval.id).map(|n| &n.params) else {
            return Err(LowerError::Unsupported {
                stage: node.name.clone(),
                message: format!("`{}` is not an eval stage", eval.name),
            });
        };
        compared.push(ComparedEval {
            name: eval.name.clone(),
            slot: inputs.input_index(eval.id)?,
            dataset_slot: inputs.input_index(root_dataset(&eval_params.data, plan))?,
        });
    }
    Ok(ReportConfig {
        params: node.canonical_params(),
        title: params
            .title
            .clone()
            .unwrap_or_else(|| format!("{} — {}", plan.settings.name, node.name)),
        compared,
        export_dir: ctx.evals_dir.join(&node.name),
    })
}
