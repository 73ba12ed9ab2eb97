//! The `finetune` stage's configuration: the trainer's settings from the plan's
//! hyperparameters, and the parameters that identify the adapter.

use std::time::Duration;

use serde_json::{Value, json};

use crate::plan::params::{
    FinetuneParams, LFM2_VL_OTHER_TARGETS, LossOn as PlanLossOn, Schedule as PlanSchedule,
};
use crate::plan::{Node, NodeParams, Plan};
use crate::stages::finetune::FinetuneConfig;
use crate::stages::model::ModelResolver;
use crate::train::{AdamWConfig, Decay, LoraConfig, LossOn, TrainConfig, TrainableSpec};

use super::{InputPositions, LowerContext, LowerError, grammar_of, pipeline_params, prompt_of};

/// The `finetune` stage of `node`.
pub(super) fn finetune_config(
    node: &Node,
    params: &FinetuneParams,
    plan: &Plan,
    ctx: &LowerContext<'_>,
    inputs: &InputPositions,
) -> Result<FinetuneConfig, LowerError> {
    let unsupported = |message: String| LowerError::Unsupported {
        stage: node.name.clone(),
        message,
    };
    match plan.node(params.base.id).map(|n| &n.params) {
        Some(NodeParams::Model(_)) => {}
        Some(NodeParams::Finetune(_)) => {
            return Err(unsupported(format!(
                "base `{}` is a fine-tune; stacking adapters is not supported: fine-tune its base \
                 model, or export `{}` with `vlmpipe export --merged` and load it with `local(...)`",
                params.base.name, params.base.name
            )));
        }
        _ => {
            return Err(unsupported(format!(
                "base `{}` is not a model",
                params.base.name
            )));
        }
    }
    let lora = &params.lora;
    Ok(FinetuneConfig {
        params: fingerprint_params(node.canonical_params(), params),
        train: train_config(params),
        lora: json!({
            "r": lora.r,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "rslora": lora.rslora,
            "targets": lora.targets,
        }),
        labels: params.labels.as_ref().map(|set| set.values.clone()),
        prompt: prompt_of(node, plan, &params.prompt)?,
        grammar: grammar_of(node, plan, params.output.as_ref())?,
        pipeline_params: pipeline_params(plan),
        base_slot: inputs.input_index(params.base.id)?,
        train_data: inputs.data_input(&params.data, plan)?,
        eval_data: params
            .eval_data
            .as_ref()
            .map(|data| inputs.data_input(data, plan))
            .transpose()?,
        export_dir: ctx.evals_dir.join(&node.name),
        models: ModelResolver::new(ctx.hub.clone(), ctx.pipeline_dir.clone()),
        device: ctx.device.clone(),
    })
}

/// The trainer's settings from the plan's parameters; the stage sets `pad_id` from the
/// tokenizer it loads.
fn train_config(p: &FinetuneParams) -> TrainConfig {
    let lora = &p.lora;
    // The vision tower and projector are adapted only when a target names one of their
    // own modules (`fc1`, `linear_1`, …); LFM2 names alone keep to the language model.
    let include_vision = lora
        .targets
        .iter()
        .any(|t| LFM2_VL_OTHER_TARGETS.contains(&t.as_str()));
    TrainConfig {
        trainable: TrainableSpec {
            lora: Some(LoraConfig {
                rank: lora.r as usize,
                alpha: lora.alpha,
                dropout: lora.dropout as f32,
                use_rslora: lora.rslora,
                targets: lora.targets.clone(),
                include_vision,
                seed: p.seed,
            }),
            full: Vec::new(),
        },
        optimizer: AdamWConfig {
            lr: p.lr,
            weight_decay: p.weight_decay,
            ..AdamWConfig::default()
        },
        batch_size: p.batch_size.max(1) as usize,
        grad_accum: p.grad_accum.max(1) as usize,
        warmup_ratio: p.warmup_ratio,
        decay: match p.schedule {
            PlanSchedule::Constant => Decay::Constant,
            PlanSchedule::Linear => Decay::Linear,
            PlanSchedule::Cosine => Decay::Cosine,
        },
        max_grad_norm: Some(p.max_grad_norm),
        epochs: p.epochs as usize,
        max_steps: p.max_steps.map(|s| s as usize),
        seed: p.seed,
        loss_on: match p.loss {
            PlanLossOn::Answer => LossOn::Answer,
            PlanLossOn::All => LossOn::AllTokens,
        },
        eval_every: p.eval_every.map(|n| n as usize),
        checkpoint_every: Some(p.checkpoint_every as usize),
        // Too long for a `Duration` means never by time; too short, every step.
        checkpoint_interval: Duration::try_from_secs_f64(p.checkpoint_minutes * 60.0)
            .ok()
            .map(|t| t.max(Duration::from_nanos(1))),
        // The stage draws its own bar through the executor's progress (hidden off-terminal).
        progress: false,
        ..TrainConfig::default()
    }
}

/// The plan's parameters minus what cannot change the adapter, so that changing it reruns
/// nothing: checkpoint intervals always, `epochs` when `max_steps` replaces it, `eval_every`
/// when there is no `eval_data` (check warns about the last two).
fn fingerprint_params(mut canonical: Value, params: &FinetuneParams) -> Value {
    if let Some(fields) = canonical.get_mut("finetune").and_then(Value::as_object_mut) {
        fields.remove("checkpoint_every");
        fields.remove("checkpoint_minutes");
        if params.max_steps.is_some() {
            fields.remove("epochs");
        }
        if params.eval_data.is_none() {
            fields.remove("eval_every");
        }
    }
    canonical
}
