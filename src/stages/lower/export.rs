//! The `export` stage's configuration: the GGUF types and the name its files take.

use serde_json::Value;

use crate::gguf::GgufQuant;
use crate::plan::params::ExportParams;
use crate::plan::{Node, Plan};
use crate::stages::export::ExportConfig;
use crate::stages::model::ModelResolver;

use super::{InputPositions, LowerContext, LowerError};

/// The `export` stage of `node`.
pub(super) fn export_config(
    node: &Node,
    params: &ExportParams,
    plan: &Plan,
    ctx: &LowerContext<'_>,
    inputs: &InputPositions,
) -> Result<ExportConfig, LowerError> {
    let quant = |name: &str| {
        name.parse::<GgufQuant>()
            .map_err(|e| LowerError::Unsupported {
                stage: node.name.clone(),
                message: e.to_string(),
            })
    };
    // The stage's name is in the file names and in `general.name`, so it is part of the output.
    let mut canonical = node.canonical_params();
    if let Some(fields) = canonical.get_mut("export").and_then(Value::as_object_mut) {
        fields.insert("name".into(), Value::String(node.name.clone()));
    }
    Ok(ExportConfig {
        params: canonical,
        name: node.name.clone(),
        pipeline: plan.settings.name.clone(),
        quant: quant(&params.quant)?,
        mmproj_quant: quant(&params.mmproj)?,
        model_slot: inputs.input_index(params.model.id)?,
        models: ModelResolver::new(ctx.hub.clone(), ctx.pipeline_dir.clone()),
        export_dir: ctx.evals_dir.join(&node.name),
    })
}
