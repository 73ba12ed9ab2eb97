//! Loading an LFM2-VL checkpoint from a local directory in the Hub layout.
//!
//! The directory holds `config.json` and either `model.safetensors` or sharded
//! `model-0000N-of-0000M.safetensors` listed in `model.safetensors.index.json`. Tensor names follow
//! the Hub (`model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`,
//! `model.language_model.*`, no `lm_head` because it is tied); transformers 5.x drops
//! `vision_model.` and may store `lm_head.weight`. Rather than hard-code either, the loader finds
//! each part by a tensor only it has (`embeddings.patch_embedding.weight`, `linear_1.weight`,
//! `embed_tokens.weight`) and takes the prefix in front of it.
//!
//! Downloading is not done here: this module takes a directory path.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use rayon::prelude::*;

use crate::file_error::FileError;
use crate::model::config::{Config, ConfigError};
use crate::model::lfm2_vl::{Lfm2VlModel, WeightPrefixes};

/// What can go wrong loading a checkpoint directory.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("`{path}` not found")]
    MissingFile { path: PathBuf },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("invalid `{path}`")]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("invalid shard index `{path}`")]
    Index {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no `{weights}` or `{index}` in `{dir}`")]
    NoWeights {
        dir: PathBuf,
        weights: &'static str,
        index: &'static str,
    },
    #[error("cannot open the safetensors weights in `{dir}`")]
    Open {
        dir: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("checkpoint in `{dir}` has no tensor ending in `{suffix}` ({part})")]
    MissingPart {
        dir: PathBuf,
        part: &'static str,
        suffix: &'static str,
    },
    #[error("checkpoint in `{dir}` is missing tensor `{name}`")]
    MissingTensor { dir: PathBuf, name: String },
    #[error("cannot load the weights in `{dir}`")]
    Weights {
        dir: PathBuf,
        #[source]
        source: candle_core::Error,
    },
}

/// How to load: the dtype to compute in and the device.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Weights are converted to this dtype. f32 is the default because candle's CPU kernels
    /// compute natively in f32 and f16, while bf16 matmuls convert the whole weight on every call.
    pub dtype: DType,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }
}

/// A checkpoint directory resolved to its config and weight files, not yet loaded.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Config,
    pub weight_files: Vec<PathBuf>,
}

const CONFIG_FILE: &str = "config.json";
const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

impl Checkpoint {
    /// Reads `config.json` and finds the weight files of `dir`.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let config_path = dir.join(CONFIG_FILE);
        let text = read_text(&config_path)?;
        let config = Config::from_json(&text).map_err(|source| CheckpointError::Config {
            path: config_path.clone(),
            source,
        })?;
        let single = dir.join(SINGLE_FILE);
        let index_path = dir.join(INDEX_FILE);
        let weight_files = if single.is_file() {
            vec![single]
        } else if index_path.is_file() {
            let index: ShardIndex =
                serde_json::from_str(&read_text(&index_path)?).map_err(|source| {
                    CheckpointError::Index {
                        path: index_path.clone(),
                        source,
                    }
                })?;
            let shards: BTreeSet<&String> = index.weight_map.values().collect();
            let files: Vec<PathBuf> = shards.into_iter().map(|s| dir.join(s)).collect();
            if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                return Err(CheckpointError::MissingFile {
                    path: missing.clone(),
                });
            }
            files
        } else {
            return Err(CheckpointError::NoWeights {
                dir: dir.to_path_buf(),
                weights: SINGLE_FILE,
                index: INDEX_FILE,
            });
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weight_files,
        })
    }

    /// Memory-maps the weights and builds the network.
    pub fn load(&self, opts: &LoadOptions) -> Result<Lfm2VlModel, CheckpointError> {
        // SAFETY: the files are memory-mapped read-only; candle copies each tensor out while
        // building the model, so later changes to the files cannot alias live tensors.
        let st = unsafe { MmapedSafetensors::multi(&self.weight_files) }.map_err(|source| {
            CheckpointError::Open {
                dir: self.dir.clone(),
                source,
            }
        })?;
        let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        let prefixes = self.prefixes(&names)?;
        let converted =
            convert_all(&st, &names, opts).map_err(|source| CheckpointError::Weights {
                dir: self.dir.clone(),
                source,
            })?;
        let backend = NamedBackend {
            inner: st,
            converted,
        };
        let backend: Box<dyn SimpleBackend> = Box::new(backend);
        let vb = VarBuilder::from_backend(backend, opts.dtype, opts.device.clone());
        let model = Lfm2VlModel::new(&self.config, vb, &prefixes);
        model.map_err(|source| {
            // The backend's error names the tensor it could not find, so the error can say it plainly.
            if let Some(name) = find_missing(&source, &names) {
                CheckpointError::MissingTensor {
                    dir: self.dir.clone(),
                    name,
                }
            } else {
                CheckpointError::Weights {
                    dir: self.dir.clone(),
                    source,
                }
            }
        })
    }

    /// Where the vision tower, projector, decoder and LM head live in this file set.
    fn prefixes(&self, names: &[String]) -> Result<WeightPrefixes, CheckpointError> {
        let find = |suffix: &'static str, part: &'static str| {
            names
                .iter()
                .filter_map(|n| n.strip_suffix(suffix))
                .map(|p| p.trim_end_matches('.').to_string())
                .min_by_key(String::len)
                .ok_or_else(|| CheckpointError::MissingPart {
                    dir: self.dir.clone(),
                    part,
                    suffix,
                })
        };
        let vision_model = find("embeddings.patch_embedding.weight", "vision tower")?;
        let projector = find("linear_1.weight", "multimodal projector")?;
        let language_model = find("embed_tokens.weight", "language model")?;
        let lm_head = names
            .iter()
            .find(|n| n.as_str() == "lm_head.weight")
            .cloned();
        Ok(WeightPrefixes {
            vision_model,
            projector,
            language_model,
            lm_head,
        })
    }
}

/// Opens and loads `dir` in one step.
pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Lfm2VlModel, CheckpointError> {
    Checkpoint::open(dir)?.load(opts)
}

fn read_text(path: &Path) -> Result<String, CheckpointError> {
    if !path.is_file() {
        return Err(CheckpointError::MissingFile {
            path: path.to_path_buf(),
        });
    }
    Ok(std::fs::read_to_string(path).map_err(FileError::read(path))?)
}

const MISSING_MARKER: &str = "missing tensor ";

/// Pulls the tensor name out of the backend's missing-tensor error, if that is what failed.
fn find_missing(err: &candle_core::Error, names: &[String]) -> Option<String> {
    let text = err.to_string();
    let start = text.find(MISSING_MARKER)? + MISSING_MARKER.len();
    let name = text[start..]
        .trim_matches('`')
        .split('`')
        .next()?
        .to_string();
    (!names.contains(&name)).then_some(name)
}

/// The mmapped tensors with a missing-tensor error that names the tensor.
struct NamedBackend {
    inner: MmapedSafetensors,
    /// Every floating-point tensor of the files, already in the dtype and on the device asked for.
    converted: HashMap<String, Tensor>,
}

impl NamedBackend {
    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        if let Some(t) = self.converted.get(name) {
            return Ok(t.clone());
        }
        if self.inner.get(name).is_err() {
            candle_core::bail!("{MISSING_MARKER}`{name}`")
        }
        self.inner.load(name, dev)
    }
}

/// Loads and converts every floating-point tensor of the files in parallel.
///
/// Building the model asks for tensors one at a time; converting them there ran on one core, and
/// the bf16 -> f32 case went through an intermediate bf16 copy. Here bf16 weights are widened
/// straight from the memory map into their f32 buffers, across the rayon pool.
fn convert_all(
    st: &MmapedSafetensors,
    names: &[String],
    opts: &LoadOptions,
) -> candle_core::Result<HashMap<String, Tensor>> {
    names
        .par_iter()
        .filter_map(|name| {
            let view = st.get(name).ok()?;
            let float = matches!(
                view.dtype(),
                safetensors::Dtype::BF16 | safetensors::Dtype::F16 | safetensors::Dtype::F32
            );
            float.then(|| {
                let tensor = if view.dtype() == safetensors::Dtype::BF16
                    && opts.dtype == DType::F32
                    && opts.device.is_cpu()
                {
                    let widened = bf16_bytes_to_f32(view.data());
                    Tensor::from_vec(widened, view.shape(), &Device::Cpu)?
                } else {
                    st.load(name, &opts.device)?.to_dtype(opts.dtype)?
                };
                Ok((name.clone(), tensor))
            })
        })
        .collect()
}

/// Little-endian bf16 bytes to f32 (a bf16 is the top half of the f32 with the same bits).
fn bf16_bytes_to_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
        .collect()
}

impl SimpleBackend for NamedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dev)?;
        if tensor.shape() != &s {
            candle_core::bail!(
                "tensor `{name}` has shape {:?}, the config implies {:?}",
                tensor.dims(),
                s.dims()
            )
        }
        tensor.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.get(name).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{"model_type": "lfm2_vl"}"#;

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        match Checkpoint::open(dir.path()) {
            Err(CheckpointError::MissingFile { path }) => assert!(path.ends_with("config.json")),
            other => panic!("expected a missing config.json, got {other:?}"),
        }
        std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
        assert!(matches!(
            Checkpoint::open(dir.path()),
            Err(CheckpointError::NoWeights { .. })
        ));
        let index = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors"}}"#;
        std::fs::write(dir.path().join(INDEX_FILE), index).unwrap();
        match Checkpoint::open(dir.path()) {
            Err(CheckpointError::MissingFile { path }) => {
                assert!(path.ends_with("model-00001-of-00002.safetensors"))
            }
            other => panic!("expected a missing shard, got {other:?}"),
        }
    }

    #[test]
    fn bf16_widening_is_exact() {
        let values = [
            0.0f32,
            -0.0,
            1.0,
            -3.140625,
            1e-30,
            6.5e4,
            f32::INFINITY,
            f32::MIN_POSITIVE,
        ];
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let expected: Vec<f32> = values
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(bf16_bytes_to_f32(&bytes), expected);
    }

    #[test]
    fn bad_config_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
        assert!(matches!(
            Checkpoint::open(dir.path()),
            Err(CheckpointError::Config { .. })
        ));
    }
}
