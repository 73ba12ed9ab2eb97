//! The `model` stage: resolves `hf(...)`, `local(...)` or `init(...)` to a checkpoint folder.
//!
//! The entry holds `model.json` = `{"checkpoint_dir": …, "adapter_dir": null, "dtype": …}`.
//! A relative `checkpoint_dir` lies inside the entry (an `init` model is saved there); an
//! absolute one points outside (a Hub cache snapshot or a local folder). Every consumer opens a
//! model the same way, through [`open_model_entry`] and then `model::checkpoint`.
//!
//! Fingerprints: `hf` models mix in the cached commit of their revision (a moved `main`
//! reruns), `local` ones a stat of every file of the folder, `init` ones only their parameters.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cache::CacheEntry;
use crate::exec::{Stage, StageContext, StageError, StageOutcome};
use crate::hub::{Hub, HubRepo};
use crate::model::config::Config;
use crate::model::lfm2_vl::{Lfm2VlModel, WeightPrefixes};
use crate::plan::Node;
use crate::plan::params::{Dtype, ModelParams, ModelSource};
use crate::stages::data::SplitMix64;
use crate::stages::lower::{LowerContext, LowerError};

/// The file of a model entry.
pub const MODEL_FILE: &str = "model.json";
/// Folder inside the entry where an `init` model is saved.
const INIT_DIR: &str = "checkpoint";

const MODEL_CODE_VERSION: u32 = 2;

/// Where a model's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelLocation {
    /// A Hub-layout checkpoint folder (config, weights, tokenizer, chat template, processor).
    pub checkpoint_dir: PathBuf,
    /// A LoRA adapter folder to apply on top, for fine-tuned models.
    pub adapter_dir: Option<PathBuf>,
    /// The dtype the pipeline asks to compute in (`f32`, `f16`, `bf16`); `None` means f32.
    pub dtype: Option<String>,
}

/// `model.json` as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelFile {
    pub checkpoint_dir: PathBuf,
    pub adapter_dir: Option<PathBuf>,
    /// The dtype the pipeline asks to compute in (`f32`, `f16`, `bf16`).
    #[serde(default)]
    pub dtype: Option<String>,
}

/// Errors of model entries and `init` presets.
#[derive(Debug, thiserror::Error)]
pub enum ModelNodeError {
    #[error("cannot read `{path}`")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not a model entry file")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("unknown model preset `{0}` (known: tiny)")]
    UnknownPreset(String),
    #[error("cannot build the `{preset}` model")]
    Build {
        preset: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("invalid built-in config of preset `{preset}`: {message}")]
    Config { preset: String, message: String },
}

/// Reads a model entry (written by this stage or by a fine-tune) and resolves its paths.
pub fn open_model_entry(entry: &CacheEntry) -> Result<ModelLocation, ModelNodeError> {
    let path = entry.path(MODEL_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| ModelNodeError::Io {
        path: path.clone(),
        source,
    })?;
    let file: ModelFile =
        serde_json::from_str(&text).map_err(|source| ModelNodeError::Json { path, source })?;
    let resolve = |p: PathBuf| {
        if p.is_absolute() {
            p
        } else {
            entry.dir().join(p)
        }
    };
    Ok(ModelLocation {
        checkpoint_dir: resolve(file.checkpoint_dir),
        adapter_dir: file.adapter_dir.map(resolve),
        dtype: file.dtype,
    })
}

/// The configured model stage.
pub struct ModelStage {
    params: Value,
    source: Resolved,
    dtype: &'static str,
}

enum Resolved {
    Hf { hub: Hub, repo: HubRepo },
    Local { dir: PathBuf },
    Init { preset: Preset, seed: u64 },
}

impl ModelStage {
    pub fn new(
        node: &Node,
        params: &ModelParams,
        ctx: &LowerContext<'_>,
    ) -> Result<Self, LowerError> {
        let source = match &params.source {
            ModelSource::Hf { repo, revision } => Resolved::Hf {
                hub: ctx.hub.clone(),
                repo: HubRepo::model(repo).at(revision),
            },
            ModelSource::Local { path } => Resolved::Local {
                dir: path.resolved.clone(),
            },
            ModelSource::Init { preset, seed } => Resolved::Init {
                preset: Preset::parse(preset).map_err(|e| LowerError::Unsupported {
                    stage: node.name.clone(),
                    message: e.to_string(),
                })?,
                seed: *seed,
            },
        };
        Ok(Self {
            params: node.canonical_params(),
            source,
            dtype: match params.dtype {
                Dtype::F32 => "f32",
                Dtype::F16 => "f16",
                Dtype::Bf16 => "bf16",
            },
        })
    }
}

impl Stage for ModelStage {
    fn kind(&self) -> &'static str {
        "model"
    }

    fn code_version(&self) -> u32 {
        MODEL_CODE_VERSION
    }

    fn params(&self) -> Value {
        self.params.clone()
    }

    fn external_state(&self) -> Result<Value, StageError> {
        match &self.source {
            Resolved::Hf { hub, repo } => {
                let commit = match hub.cached_commit(repo) {
                    Some(commit) => commit,
                    None => {
                        // Not cached yet: fetch it now so the fingerprint names a real commit.
                        hub.model_dir(repo)?;
                        hub.cached_commit(repo).unwrap_or_default()
                    }
                };
                Ok(json!({ "commit": commit }))
            }
            Resolved::Local { dir } => Ok(json!({ "files": stat_dir(dir)? })),
            Resolved::Init { .. } => Ok(Value::Null),
        }
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        let (checkpoint_dir, metadata) = match &self.source {
            Resolved::Hf { hub, repo } => {
                let dir = hub.model_dir(repo)?;
                (dir, json!({ "source": "hf", "repo": repo.id }))
            }
            Resolved::Local { dir } => {
                // Fail here, naming the folder, rather than in every stage that loads it.
                crate::model::checkpoint::Checkpoint::open(dir)?;
                let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
                (dir, json!({ "source": "local" }))
            }
            Resolved::Init { preset, seed } => {
                let dir = ctx.out_path(INIT_DIR);
                let tensors = preset.save(&dir, *seed)?;
                (
                    PathBuf::from(INIT_DIR),
                    json!({ "source": "init", "preset": preset.name(), "tensors": tensors }),
                )
            }
        };
        let file = ModelFile {
            checkpoint_dir,
            adapter_dir: None,
            dtype: Some(self.dtype.to_owned()),
        };
        std::fs::write(
            ctx.out_path(MODEL_FILE),
            serde_json::to_string_pretty(&file)?,
        )?;
        Ok(StageOutcome {
            metadata,
            ..StageOutcome::default()
        })
    }
}

/// Name, size and mtime of every file under `dir`, sorted: a cheap identity of a local model.
fn stat_dir(dir: &Path) -> Result<Vec<Value>, StageError> {
    let mut files = Vec::new();
    for item in walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
    {
        let item = item?;
        if !item.file_type().is_file() {
            continue;
        }
        let meta = item.metadata()?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let rel = item.path().strip_prefix(dir).unwrap_or(item.path());
        files.push(json!([
            rel.to_string_lossy(),
            meta.len(),
            mtime.to_string()
        ]));
    }
    Ok(files)
}

/// Built-in model sizes for `init(preset: …)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The shapes of the `tiny-thumb` reference checkpoint (64-wide, 6 text and 2 vision layers,
    /// a 1,024-token synthetic tokenizer): fast enough for tests and the offline quickstart.
    Tiny,
}

/// The `tiny` preset's files, generated by `tests/reference` (synthetic tokenizer; ours).
const TINY_FILES: &[(&str, &str)] = &[
    (
        "config.json",
        include_str!("../../tests/fixtures/reference/checkpoints/tiny-thumb/config.json"),
    ),
    (
        "tokenizer.json",
        include_str!("../../tests/fixtures/reference/checkpoints/tiny-thumb/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_str!("../../tests/fixtures/reference/checkpoints/tiny-thumb/tokenizer_config.json"),
    ),
    (
        "special_tokens_map.json",
        include_str!(
            "../../tests/fixtures/reference/checkpoints/tiny-thumb/special_tokens_map.json"
        ),
    ),
    (
        "chat_template.jinja",
        include_str!("../../tests/fixtures/reference/checkpoints/tiny-thumb/chat_template.jinja"),
    ),
    (
        "processor_config.json",
        include_str!("../../tests/fixtures/reference/checkpoints/tiny-thumb/processor_config.json"),
    ),
    (
        "preprocessor_config.json",
        include_str!(
            "../../tests/fixtures/reference/checkpoints/tiny-thumb/preprocessor_config.json"
        ),
    ),
    (
        "generation_config.json",
        include_str!(
            "../../tests/fixtures/reference/checkpoints/tiny-thumb/generation_config.json"
        ),
    ),
];

impl Preset {
    pub fn parse(name: &str) -> Result<Self, ModelNodeError> {
        match name {
            "tiny" => Ok(Preset::Tiny),
            other => Err(ModelNodeError::UnknownPreset(other.to_owned())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
        }
    }

    fn files(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Preset::Tiny => TINY_FILES,
        }
    }

    /// Writes a Hub-layout checkpoint with seeded random weights into `dir`; returns the
    /// number of tensors saved.
    pub fn save(self, dir: &Path, seed: u64) -> Result<usize, StageError> {
        std::fs::create_dir_all(dir)?;
        for (name, text) in self.files() {
            std::fs::write(dir.join(name), text)?;
        }
        let (_, config_text) = self.files()[0];
        let config = Config::from_json(config_text).map_err(|e| ModelNodeError::Config {
            preset: self.name().to_owned(),
            message: e.to_string(),
        })?;
        let tensors = random_weights(&config, seed).map_err(|source| ModelNodeError::Build {
            preset: self.name().to_owned(),
            source,
        })?;
        let count = tensors.len();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        Ok(count)
    }
}

/// Builds the network once with a backend that invents and records every tensor it is asked
/// for, so the saved names are exactly the ones the loader will request (Hub layout).
fn random_weights(cfg: &Config, seed: u64) -> candle_core::Result<HashMap<String, Tensor>> {
    let recorded = Arc::new(Mutex::new(HashMap::new()));
    let backend = RecordingBackend {
        seed,
        recorded: Arc::clone(&recorded),
    };
    // Host-side on purpose: the weights are written to disk, and the same seed must give the
    // same bytes whatever device later loads them (the cache entry is shared across devices).
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    Lfm2VlModel::new(cfg, vb, &WeightPrefixes::default())?;
    let mut guard = recorded
        .lock()
        .map_err(|_| candle_core::Error::Msg("weight recorder poisoned".to_owned()))?;
    Ok(std::mem::take(&mut *guard))
}

/// Scaled normal weights, zero biases, unit norms; each tensor seeded by its name so the result
/// does not depend on construction order.
///
/// Matrices and convolutions get std `1/sqrt(fan_in)`, token and position embeddings std 0.5 (the
/// reference generator's `scaled_init`). transformers' flat std 0.02 would tie the LM head to a
/// near-zero embedding table: every logit stays near zero, so the model answers uniformly at
/// random and a fine-tune of LoRA adapters cannot move it (measured: loss flat at ln(vocab)).
struct RecordingBackend {
    seed: u64,
    recorded: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl SimpleBackend for RecordingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let leaf = name.rsplit('.').nth(1).unwrap_or("");
        let t = if name.ends_with(".bias") {
            Tensor::zeros(s, DType::F32, &Device::Cpu)?
        } else if leaf.contains("norm") {
            Tensor::ones(s, DType::F32, &Device::Cpu)?
        } else {
            let digest = blake3::hash(name.as_bytes());
            let mut key = [0u8; 8];
            key.copy_from_slice(&digest.as_bytes()[..8]);
            let mut rng = SplitMix64::new(self.seed ^ u64::from_le_bytes(key));
            let dims = s.dims();
            let std = if matches!(leaf, "embed_tokens" | "position_embedding") || dims.len() < 2 {
                0.5
            } else {
                1.0 / (dims[1..].iter().product::<usize>().max(1) as f64).sqrt()
            };
            let n = s.elem_count();
            let mut data = Vec::with_capacity(n + 1);
            while data.len() < n {
                // Box-Muller: two normals per pair of uniforms.
                let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
                let u2 = rng.next_f64();
                let r = (-2.0 * u1.ln()).sqrt() * std;
                let (sin, cos) = (std::f64::consts::TAU * u2).sin_cos();
                data.push((r * cos) as f32);
                data.push((r * sin) as f32);
            }
            data.truncate(n);
            Tensor::from_vec(data, s, &Device::Cpu)?
        };
        if let Ok(mut map) = self.recorded.lock() {
            map.insert(name.to_owned(), t.clone());
        }
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // The LM head stays tied to the embeddings, as in the Hub checkpoints.
        name != "lm_head.weight"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::{LoadOptions, load};

    #[test]
    fn tiny_preset_saves_a_loadable_hub_layout_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let count = Preset::Tiny.save(dir.path(), 5).unwrap();
        assert!(count > 20, "{count} tensors");
        let model = load(dir.path(), &LoadOptions::default());
        assert!(model.is_ok(), "{:?}", model.err());
        let template = crate::model::chat::ChatTemplate::from_model_dir(dir.path());
        assert!(template.is_ok(), "{:?}", template.err());
        // Same seed, same bytes; another seed, other weights.
        let again = tempfile::tempdir().unwrap();
        Preset::Tiny.save(again.path(), 5).unwrap();
        let a = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let b = std::fs::read(again.path().join("model.safetensors")).unwrap();
        assert_eq!(blake3::hash(&a), blake3::hash(&b));
        let other = tempfile::tempdir().unwrap();
        Preset::Tiny.save(other.path(), 6).unwrap();
        let c = std::fs::read(other.path().join("model.safetensors")).unwrap();
        assert_ne!(blake3::hash(&a), blake3::hash(&c));
        assert!(Preset::parse("huge").is_err());
    }
}
