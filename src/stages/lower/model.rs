//! The `model` stage's configuration: a Hub repo, a local folder or an `init` preset, with an
//! optional adapter, named so that the entry does not depend on where the project lives.

use std::path::{Path, PathBuf};

use crate::hub::HubRepo;
use crate::plan::Node;
use crate::plan::params::{AdapterSource, LocalPath, ModelParams, ModelSource};
use crate::stages::model::{
    AdapterOrigin, GgufPlace, ModelConfig, ModelOrigin, Preset, relative_to,
};

use super::{LowerContext, LowerError};

/// The `model` stage of `node`.
pub(super) fn model_config(
    node: &Node,
    params: &ModelParams,
    ctx: &LowerContext<'_>,
) -> Result<ModelConfig, LowerError> {
    let origin = match &params.source {
        ModelSource::Hf { repo, revision } => ModelOrigin::Hf {
            hub: ctx.hub.clone(),
            repo: HubRepo::model(repo).at(revision),
        },
        ModelSource::Local { path } => ModelOrigin::Local {
            dir: path.resolved.clone(),
            stored: pipeline_ref(path, &ctx.pipeline_dir),
        },
        ModelSource::Gguf {
            repo,
            revision,
            path,
            quant,
            mmproj,
        } => ModelOrigin::Gguf {
            place: match (repo, path) {
                (Some(repo), _) => GgufPlace::Hub {
                    hub: ctx.hub.clone(),
                    repo: HubRepo::model(repo).at(revision.as_deref().unwrap_or("main")),
                },
                (None, Some(path)) => GgufPlace::Local {
                    dir: path.resolved.clone(),
                    stored: pipeline_ref(path, &ctx.pipeline_dir),
                },
                (None, None) => {
                    return Err(LowerError::Unsupported {
                        stage: node.name.clone(),
                        message: "gguf(...) without a repo or a folder".into(),
                    });
                }
            },
            quant: quant.clone(),
            mmproj: mmproj.clone(),
        },
        ModelSource::Init { preset, seed } => ModelOrigin::Init {
            preset: Preset::parse(preset).map_err(|e| LowerError::Unsupported {
                stage: node.name.clone(),
                message: e.to_string(),
            })?,
            seed: *seed,
        },
    };
    let adapter = params.adapter.as_ref().map(|a| match a {
        AdapterSource::Hf { repo, revision } => AdapterOrigin::Hf {
            hub: ctx.hub.clone(),
            repo: HubRepo::model(repo).at(revision),
        },
        AdapterSource::Local { path } => AdapterOrigin::Local {
            dir: path.resolved.clone(),
            stored: pipeline_ref(path, &ctx.pipeline_dir),
        },
    });
    Ok(ModelConfig {
        params: node.canonical_params(),
        origin,
        adapter,
        dtype: params.dtype,
        reads: ctx.plan.reads.clone(),
    })
}

/// How the entry names a local folder: as written when the pipeline wrote an absolute path,
/// else relative to the root pipeline file's folder (which `resolved`, joined onto the declaring
/// file's folder, lies under lexically); absolute only if it somehow does not.
fn pipeline_ref(path: &LocalPath, pipeline_dir: &Path) -> PathBuf {
    if Path::new(&path.path).is_absolute() {
        return PathBuf::from(&path.path);
    }
    relative_to(&path.resolved, pipeline_dir).unwrap_or_else(|| {
        std::path::absolute(&path.resolved).unwrap_or_else(|_| path.resolved.clone())
    })
}
