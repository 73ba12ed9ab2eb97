//! The one random initialiser: seeded random weights of an LFM2-VL config, as an in-memory model
//! ([`random_model`]: benchmarks and load tests, no files) or a checkpoint folder in the Hub
//! layout ([`write_random_checkpoint`], [`write_random_weights`]: the `init(...)` model node, `bench
//! model`, the 450M load test).
//!
//! [`hub_tensor_specs`] lists every tensor an LFM2-VL `config.json` implies, named and shaped as
//! transformers 4.57 saves `Lfm2VlForConditionalGeneration` (the Hub layout: all vision layers of
//! the file, no `lm_head` when tied). It is written independently of the loader, from the
//! reference's module names, so a checkpoint made from it tests that the loader accepts the Hub's
//! names; a test checks it against a checkpoint transformers saved.
//!
//! [`random_values`] fills one tensor: matrices and convolutions normal with std `1/sqrt(fan_in)`,
//! token and position embeddings std 0.5 (the reference generator's `scaled_init`), norm weights
//! one, biases zero. transformers' flat std 0.02 would tie the LM head to a near-zero embedding
//! table: every logit stays near zero, so the model answers uniformly at random and a fine-tune of
//! LoRA adapters cannot move it (measured: loss flat at ln(vocab)). Each tensor has its own
//! [`SeededRng`] stream, seeded by the seed and the tensor's name, so values do not depend on the
//! order tensors are made in, and tensors are made in parallel.

use std::path::{Path, PathBuf};

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::file_error::FileError;
use crate::model::config::{Config, ConfigError, LayerKind, Lfm2VlConfig};
use crate::model::lfm2_vl::{Lfm2VlModel, WeightPrefixes};
use crate::model::load::checkpoint::LoadOptions;
use crate::rng::{SeededRng, name_hash};

/// What can go wrong writing a random checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum RandomCheckpointError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("invalid `{path}`")]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("cannot serialise the weights: {0}")]
    Serialize(String),
    #[error("random weights can be written as f32, bf16 or f16, not {0:?}")]
    Dtype(DType),
}

/// How a tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum InitKind {
    /// Normal with variance `1 / fan_in` (`fan_in` = last dimension, or the kernel size for the
    /// depthwise conv).
    Linear,
    /// Normal with std 0.5: token embeddings and the position grid.
    Embedding,
    /// Ones.
    NormWeight,
    /// Zeros.
    Bias,
}

/// One tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: InitKind,
}

/// Every tensor of an LFM2-VL checkpoint in the Hub layout, in name order.
pub(crate) fn hub_tensor_specs(raw: &Lfm2VlConfig, cfg: &Config) -> Vec<TensorSpec> {
    tensor_specs(cfg, raw.vision_config.num_hidden_layers)
}

/// The tensors of `cfg` with `vision_layers` vision encoder layers (the file holds every layer of
/// the config, even when `vision_feature_layer` runs fewer), in name order.
pub(crate) fn tensor_specs(cfg: &Config, vision_layers: usize) -> Vec<TensorSpec> {
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
    for i in 0..vision_layers {
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
pub(crate) fn num_parameters(specs: &[TensorSpec]) -> usize {
    specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum()
}

/// The specs of a `config.json`'s text (the Hub layout).
pub(crate) fn specs_from_json(config_json: &str) -> Result<Vec<TensorSpec>, ConfigError> {
    let raw: Lfm2VlConfig = serde_json::from_str(config_json)?;
    let cfg = Config::from_raw(&raw)?;
    Ok(hub_tensor_specs(&raw, &cfg))
}

/// `spec`'s seeded values in row-major order (see the module docs).
pub(crate) fn random_values(spec: &TensorSpec, seed: u64) -> Vec<f32> {
    let n: usize = spec.shape.iter().product();
    let fan_in = match spec.shape.as_slice() {
        [_, 1, k] => *k,
        [.., last] => *last,
        [] => 1,
    };
    let std = match spec.init {
        InitKind::NormWeight => return vec![1.0; n],
        InitKind::Bias => return vec![0.0; n],
        InitKind::Linear => 1.0 / (fan_in.max(1) as f64).sqrt(),
        InitKind::Embedding => 0.5,
    };
    SeededRng::from_words(&[seed, name_hash(&spec.name)]).normal_vec(n, std)
}

/// A model of `cfg`'s shapes with seeded random weights (benchmarks and load tests, no files):
/// the values [`write_random_checkpoint`] would write for the same config and seed.
pub fn random_model(
    cfg: &Config,
    opts: &LoadOptions,
    seed: u64,
) -> candle_core::Result<Lfm2VlModel> {
    let tensors = tensor_specs(cfg, cfg.vision.num_layers)
        .into_par_iter()
        .map(|spec| {
            let values = random_values(&spec, seed);
            Ok((
                spec.name,
                Tensor::from_vec(values, spec.shape, &Device::Cpu)?,
            ))
        })
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    let vb = VarBuilder::from_tensors(tensors, opts.dtype, &opts.device);
    Lfm2VlModel::new(cfg, vb, &WeightPrefixes::default())
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
    std::fs::create_dir_all(out).map_err(FileError::create(out))?;
    for name in SIDE_FILES {
        let from = source.join(name);
        if from.is_file() {
            let to = out.join(name);
            std::fs::copy(&from, &to).map_err(FileError::copy_to(&to))?;
        }
    }
    let config_path = source.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(FileError::read(&config_path))?;
    let config_err = |source| RandomCheckpointError::Config {
        path: config_path.clone(),
        source,
    };
    let specs = specs_from_json(&text).map_err(config_err)?;
    write_random_weights(&specs, &out.join("model.safetensors"), dtype, seed)?;
    Ok(num_parameters(&specs))
}

/// Writes `specs` with random values to a safetensors file (metadata `format: pt`, like torch).
pub(crate) fn write_random_weights(
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
        .par_iter()
        .map(|spec| to_bytes(&random_values(spec, seed), dtype))
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
        safetensors::SafeTensorError::IoError(source) => FileError::write(path)(source).into(),
        other => RandomCheckpointError::Serialize(other.to_string()),
    })
}

/// `values` in `dtype`'s little-endian bytes (f32, bf16 or f16; checked by the caller).
fn to_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        DType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// A model of a few thousand parameters with every part (vision, projector, a conv and an
/// attention layer), for unit tests across the crate.
#[cfg(test)]
pub(crate) fn tiny_test_config() -> Config {
    Config::from_json(
        r#"{"projector_hidden_size": 32,
            "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                              "num_attention_heads": 2},
            "text_config": {"hidden_size": 16, "intermediate_size": 48, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 500,
                            "block_multiple_of": 8, "layer_types": ["conv", "full_attention"]}}"#,
    )
    .expect("the tiny test config parses")
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
        let spec = |name: &str, init| TensorSpec {
            name: name.into(),
            shape: vec![64, 256],
            init,
        };
        let values = random_values(&spec("w", InitKind::Linear), 3);
        let n = values.len() as f32;
        let mean = values.iter().sum::<f32>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n;
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!(
            (var * 256.0 - 1.0).abs() < 0.05,
            "variance x fan_in {}",
            var * 256.0
        );
        assert_eq!(
            values,
            random_values(&spec("w", InitKind::Linear), 3),
            "seeded"
        );
        assert_ne!(values, random_values(&spec("w", InitKind::Linear), 4));
        assert_ne!(
            values,
            random_values(&spec("v", InitKind::Linear), 3),
            "per name"
        );
        let emb = random_values(&spec("e", InitKind::Embedding), 3);
        let std = (emb.iter().map(|v| v * v).sum::<f32>() / n).sqrt();
        assert!((std - 0.5).abs() < 0.01, "embedding std {std}");
        assert!(
            random_values(&spec("n", InitKind::NormWeight), 3)
                .iter()
                .all(|&v| v == 1.0)
        );
        assert!(
            random_values(&spec("b", InitKind::Bias), 3)
                .iter()
                .all(|&v| v == 0.0)
        );
    }

    #[test]
    fn the_model_in_memory_has_the_values_written() -> Result<(), Box<dyn std::error::Error>> {
        let dir = fixture("tiny-thumb");
        let text = std::fs::read_to_string(dir.join("config.json"))?;
        let cfg = Config::from_json(&text)?;
        let model = random_model(&cfg, &LoadOptions::default(), 9)?;
        let out = tempfile::tempdir()?;
        write_random_checkpoint(&dir, out.path(), DType::F32, 9)?;
        let written = crate::model::load::checkpoint::load(out.path(), &LoadOptions::default())?;
        let ids = candle_core::Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu)?;
        let logits = |m: &Lfm2VlModel| -> candle_core::Result<Vec<f32>> {
            let mut cache = m.new_cache(1);
            m.forward(
                &ids,
                None,
                None,
                &mut cache,
                crate::model::lfm2_vl::LogitsMode::Last,
            )?
            .flatten_all()?
            .to_vec1::<f32>()
        };
        assert_eq!(logits(&model)?, logits(&written)?);
        Ok(())
    }

    #[test]
    fn random_model_has_the_config_shapes() -> candle_core::Result<()> {
        let cfg = tiny_test_config();
        let model = random_model(&cfg, &LoadOptions::default(), 1)?;
        let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
        let mut cache = model.new_cache(1);
        let logits = model.forward(
            &ids,
            None,
            None,
            &mut cache,
            crate::model::lfm2_vl::LogitsMode::Last,
        )?;
        assert_eq!(logits.dims(), &[1, 500]);
        Ok(())
    }

    #[test]
    fn writes_a_checkpoint_the_loader_accepts() -> Result<(), Box<dyn std::error::Error>> {
        let out = tempfile::tempdir()?;
        let n = write_random_checkpoint(&fixture("tiny-thumb"), out.path(), DType::BF16, 1)?;
        assert_eq!(n, 515_968);
        let ckpt = crate::model::load::checkpoint::Checkpoint::open(out.path())?;
        let model = ckpt.load(&crate::model::load::checkpoint::LoadOptions::default())?;
        assert_eq!(model.config(), &ckpt.config);
        assert!(out.path().join("tokenizer.json").is_file());
        Ok(())
    }
}
