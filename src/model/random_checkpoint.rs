//! Random-weight checkpoints in the Hub layout, for load tests and benchmarks at real shapes.
//!
//! [`hub_tensor_specs`] lists every tensor an LFM2-VL `config.json` implies, named and shaped as
//! transformers 4.57 saves `Lfm2VlForConditionalGeneration` (the Hub layout: all vision layers of
//! the file, no `lm_head` when tied). It is written independently of the loader, from the
//! reference's module names, so a checkpoint made from it tests that the loader accepts the Hub's
//! names; a test checks it against a checkpoint transformers saved.
//!
//! [`write_random_checkpoint`] copies a model folder's config, tokenizer and processor files and
//! adds `model.safetensors` with seeded random weights in that layout (bf16 by default, like the
//! real LFM2-VL-450M file), so Rust and Python (`bench_transformers.py`) can load the same
//! weights. Scales follow the reference generator's `scaled_init`: linear weights with variance
//! 1/fan_in, embeddings and the position grid with std 0.5, norm weights near 1, biases near 0,
//! so activations stay in a realistic range and greedy output varies.

use std::path::{Path, PathBuf};

use candle_core::DType;
use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::model::config::{Config, ConfigError, LayerKind, Lfm2VlConfig};

/// What can go wrong writing a random checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum RandomCheckpointError {
    #[error("cannot read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid `{path}`")]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("cannot write `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serialise the weights: {0}")]
    Serialize(String),
    #[error("random weights can be written as f32, bf16 or f16, not {0:?}")]
    Dtype(DType),
}

/// How a tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitKind {
    /// Uniform with variance `1 / fan_in` (`fan_in` = last dimension, or the kernel size for the
    /// depthwise conv).
    Linear,
    /// Uniform with std 0.5: token embeddings and the position grid.
    Embedding,
    /// 1 + uniform noise with std 0.01.
    NormWeight,
    /// Uniform with std 0.01.
    Bias,
}

/// One tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: InitKind,
}

/// Every tensor of an LFM2-VL checkpoint in the Hub layout, in name order.
pub fn hub_tensor_specs(raw: &Lfm2VlConfig, cfg: &Config) -> Vec<TensorSpec> {
    let mut specs = Vec::new();
    let mut push =
        |name: String, shape: Vec<usize>, init| specs.push(TensorSpec { name, shape, init });

    let v = &cfg.vision;
    let vp = "model.vision_tower.vision_model";
    push(
        format!("{vp}.embeddings.patch_embedding.weight"),
        vec![v.hidden_size, v.patch_dim()],
        InitKind::Linear,
    );
    push(
        format!("{vp}.embeddings.patch_embedding.bias"),
        vec![v.hidden_size],
        InitKind::Bias,
    );
    push(
        format!("{vp}.embeddings.position_embedding.weight"),
        vec![v.position_grid * v.position_grid, v.hidden_size],
        InitKind::Embedding,
    );
    // The file holds every layer of the config, even when `vision_feature_layer` runs fewer.
    for i in 0..raw.vision_config.num_hidden_layers {
        let p = format!("{vp}.encoder.layers.{i}");
        for norm in ["layer_norm1", "layer_norm2"] {
            push(
                format!("{p}.{norm}.weight"),
                vec![v.hidden_size],
                InitKind::NormWeight,
            );
            push(
                format!("{p}.{norm}.bias"),
                vec![v.hidden_size],
                InitKind::Bias,
            );
        }
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            push(
                format!("{p}.self_attn.{proj}.weight"),
                vec![v.hidden_size, v.hidden_size],
                InitKind::Linear,
            );
            push(
                format!("{p}.self_attn.{proj}.bias"),
                vec![v.hidden_size],
                InitKind::Bias,
            );
        }
        push(
            format!("{p}.mlp.fc1.weight"),
            vec![v.intermediate_size, v.hidden_size],
            InitKind::Linear,
        );
        push(
            format!("{p}.mlp.fc1.bias"),
            vec![v.intermediate_size],
            InitKind::Bias,
        );
        push(
            format!("{p}.mlp.fc2.weight"),
            vec![v.hidden_size, v.intermediate_size],
            InitKind::Linear,
        );
        push(
            format!("{p}.mlp.fc2.bias"),
            vec![v.hidden_size],
            InitKind::Bias,
        );
    }
    push(
        format!("{vp}.post_layernorm.weight"),
        vec![v.hidden_size],
        InitKind::NormWeight,
    );
    push(
        format!("{vp}.post_layernorm.bias"),
        vec![v.hidden_size],
        InitKind::Bias,
    );

    let pr = &cfg.projector;
    let pp = "model.multi_modal_projector";
    if pr.use_layer_norm {
        push(
            format!("{pp}.layer_norm.weight"),
            vec![pr.in_dim],
            InitKind::NormWeight,
        );
        push(
            format!("{pp}.layer_norm.bias"),
            vec![pr.in_dim],
            InitKind::Bias,
        );
    }
    push(
        format!("{pp}.linear_1.weight"),
        vec![pr.hidden_size, pr.in_dim],
        InitKind::Linear,
    );
    push(
        format!("{pp}.linear_2.weight"),
        vec![pr.out_dim, pr.hidden_size],
        InitKind::Linear,
    );
    if pr.bias {
        push(
            format!("{pp}.linear_1.bias"),
            vec![pr.hidden_size],
            InitKind::Bias,
        );
        push(
            format!("{pp}.linear_2.bias"),
            vec![pr.out_dim],
            InitKind::Bias,
        );
    }

    let t = &cfg.text;
    let tp = "model.language_model";
    let d = t.hidden_size;
    push(
        format!("{tp}.embed_tokens.weight"),
        vec![t.vocab_size, d],
        InitKind::Embedding,
    );
    push(
        format!("{tp}.embedding_norm.weight"),
        vec![d],
        InitKind::NormWeight,
    );
    for (i, kind) in t.layer_kinds.iter().enumerate() {
        let p = format!("{tp}.layers.{i}");
        for norm in ["operator_norm", "ffn_norm"] {
            push(format!("{p}.{norm}.weight"), vec![d], InitKind::NormWeight);
        }
        push(
            format!("{p}.feed_forward.w1.weight"),
            vec![t.ffn_dim, d],
            InitKind::Linear,
        );
        push(
            format!("{p}.feed_forward.w3.weight"),
            vec![t.ffn_dim, d],
            InitKind::Linear,
        );
        push(
            format!("{p}.feed_forward.w2.weight"),
            vec![d, t.ffn_dim],
            InitKind::Linear,
        );
        match kind {
            LayerKind::Conv => {
                push(
                    format!("{p}.conv.conv.weight"),
                    vec![d, 1, t.conv_kernel],
                    InitKind::Linear,
                );
                if t.conv_bias {
                    push(format!("{p}.conv.conv.bias"), vec![d], InitKind::Bias);
                }
                push(
                    format!("{p}.conv.in_proj.weight"),
                    vec![3 * d, d],
                    InitKind::Linear,
                );
                push(
                    format!("{p}.conv.out_proj.weight"),
                    vec![d, d],
                    InitKind::Linear,
                );
                if t.conv_bias {
                    push(
                        format!("{p}.conv.in_proj.bias"),
                        vec![3 * d],
                        InitKind::Bias,
                    );
                    push(format!("{p}.conv.out_proj.bias"), vec![d], InitKind::Bias);
                }
            }
            LayerKind::Attention => {
                let q = t.num_heads * t.head_dim;
                let kv = t.num_kv_heads * t.head_dim;
                for (proj, rows, cols) in [
                    ("q_proj", q, d),
                    ("k_proj", kv, d),
                    ("v_proj", kv, d),
                    ("out_proj", d, q),
                ] {
                    push(
                        format!("{p}.self_attn.{proj}.weight"),
                        vec![rows, cols],
                        InitKind::Linear,
                    );
                }
                for norm in ["q_layernorm", "k_layernorm"] {
                    push(
                        format!("{p}.self_attn.{norm}.weight"),
                        vec![t.head_dim],
                        InitKind::NormWeight,
                    );
                }
            }
        }
    }
    if !t.tie_embeddings {
        push(
            "lm_head.weight".into(),
            vec![t.vocab_size, d],
            InitKind::Linear,
        );
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs
}

/// Number of parameters in `specs`.
pub fn num_parameters(specs: &[TensorSpec]) -> usize {
    specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum()
}

/// Files of a model folder besides the weights, copied when present.
const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
];

/// Copies `source`'s config, tokenizer and processor files into `out` and writes
/// `out/model.safetensors` with random weights for `source/config.json` (see the module docs).
/// Returns the number of parameters written.
pub fn write_random_checkpoint(
    source: &Path,
    out: &Path,
    dtype: DType,
    seed: u64,
) -> Result<usize, RandomCheckpointError> {
    std::fs::create_dir_all(out).map_err(|e| write_err(out, e))?;
    for name in SIDE_FILES {
        let from = source.join(name);
        if from.is_file() {
            let to = out.join(name);
            std::fs::copy(&from, &to).map_err(|e| write_err(&to, e))?;
        }
    }
    let config_path = source.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|source| RandomCheckpointError::Read {
            path: config_path.clone(),
            source,
        })?;
    let config_err = |source| RandomCheckpointError::Config {
        path: config_path.clone(),
        source,
    };
    let raw: Lfm2VlConfig =
        serde_json::from_str(&text).map_err(|e| config_err(ConfigError::from(e)))?;
    let cfg = Config::from_raw(&raw).map_err(config_err)?;
    let specs = hub_tensor_specs(&raw, &cfg);
    write_random_weights(&specs, &out.join("model.safetensors"), dtype, seed)?;
    Ok(num_parameters(&specs))
}

/// Writes `specs` with random values to a safetensors file (metadata `format: pt`, like torch).
pub fn write_random_weights(
    specs: &[TensorSpec],
    path: &Path,
    dtype: DType,
    seed: u64,
) -> Result<(), RandomCheckpointError> {
    let st_dtype = match dtype {
        DType::F32 => StDtype::F32,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
        other => return Err(RandomCheckpointError::Dtype(other)),
    };
    let buffers: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| random_bytes(spec, dtype, seed.wrapping_add(i as u64)))
        .collect();
    let views = specs
        .iter()
        .zip(&buffers)
        .map(|(spec, bytes)| {
            TensorView::new(st_dtype, spec.shape.clone(), bytes)
                .map(|view| (spec.name.clone(), view))
                .map_err(|e| RandomCheckpointError::Serialize(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::tensor::serialize_to_file(views, metadata, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => write_err(path, source),
        other => RandomCheckpointError::Serialize(other.to_string()),
    })
}

fn write_err(path: &Path, source: std::io::Error) -> RandomCheckpointError {
    RandomCheckpointError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// The tensor's values in `dtype`'s little-endian bytes, from a SplitMix64 stream.
///
/// Uniform draws keep this fast enough for 450M parameters in a test (a normal draw per value
/// would dominate); the scale is what matters for realistic activations.
fn random_bytes(spec: &TensorSpec, dtype: DType, seed: u64) -> Vec<u8> {
    let n: usize = spec.shape.iter().product();
    let fan_in = match spec.shape.as_slice() {
        [_, 1, k] => *k,
        [.., last] => *last,
        [] => 1,
    };
    // A uniform on [-a, a] has std a / sqrt(3).
    let sqrt3 = 3f32.sqrt();
    let (center, half_width) = match spec.init {
        InitKind::Linear => (0.0, sqrt3 / (fan_in.max(1) as f32).sqrt()),
        InitKind::Embedding => (0.0, 0.5 * sqrt3),
        InitKind::NormWeight => (1.0, 0.01 * sqrt3),
        InitKind::Bias => (0.0, 0.01 * sqrt3),
    };
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    // 24 random bits per value map to [-1, 1).
    let mut value =
        move || center + half_width * ((next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0);
    match dtype {
        DType::BF16 => (0..n)
            .flat_map(|_| bf16::from_f32(value()).to_le_bytes())
            .collect(),
        DType::F16 => (0..n)
            .flat_map(|_| f16::from_f32(value()).to_le_bytes())
            .collect(),
        _ => (0..n).flat_map(|_| value().to_le_bytes()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/reference/checkpoints")
            .join(name)
    }

    type NamedShapes = Vec<(String, Vec<usize>)>;

    /// The names and shapes transformers 4.57 saved for each fixture checkpoint.
    fn saved_specs(dir: &Path) -> Result<NamedShapes, Box<dyn std::error::Error>> {
        let bytes = std::fs::read(dir.join("model.safetensors"))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let mut out: NamedShapes = st
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect();
        out.sort();
        Ok(out)
    }

    #[test]
    fn specs_match_checkpoints_saved_by_transformers() -> Result<(), Box<dyn std::error::Error>> {
        for name in ["tiny-thumb", "tiny-nothumb", "tiny-realtok"] {
            let dir = fixture(name);
            let text = std::fs::read_to_string(dir.join("config.json"))?;
            let raw: Lfm2VlConfig = serde_json::from_str(&text)?;
            let cfg = Config::from_raw(&raw)?;
            let ours: NamedShapes = hub_tensor_specs(&raw, &cfg)
                .into_iter()
                .map(|s| (s.name, s.shape))
                .collect();
            assert_eq!(ours, saved_specs(&dir)?, "{name}");
        }
        Ok(())
    }

    #[test]
    fn random_values_have_the_requested_scale() {
        let spec = TensorSpec {
            name: "w".into(),
            shape: vec![64, 256],
            init: InitKind::Linear,
        };
        let bytes = random_bytes(&spec, DType::F32, 3);
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let n = values.len() as f32;
        let mean = values.iter().sum::<f32>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n;
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!(
            (var * 256.0 - 1.0).abs() < 0.05,
            "variance x fan_in {}",
            var * 256.0
        );
        assert_eq!(bytes, random_bytes(&spec, DType::F32, 3), "seeded");
        assert_ne!(bytes, random_bytes(&spec, DType::F32, 4));
    }

    #[test]
    fn writes_a_checkpoint_the_loader_accepts() -> Result<(), Box<dyn std::error::Error>> {
        let out = tempfile::tempdir()?;
        let n = write_random_checkpoint(&fixture("tiny-thumb"), out.path(), DType::BF16, 1)?;
        assert_eq!(n, 515_968);
        let ckpt = crate::model::checkpoint::Checkpoint::open(out.path())?;
        let model = ckpt.load(&crate::model::checkpoint::LoadOptions::default())?;
        assert_eq!(model.config(), &ckpt.config);
        assert!(out.path().join("tokenizer.json").is_file());
        Ok(())
    }
}
