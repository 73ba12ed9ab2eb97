//! LFM2-VL configuration: the serde view of `config.json` and the runtime [`Config`] built from it.
//!
//! `config.json` comes in several spellings (transformers 4.55 as on the Hub, 4.57, 5.x): keys equal
//! to transformers' defaults may be missing, `model_type` is `lfm2-vl` or `lfm2_vl`, the dtype is
//! `dtype` or `torch_dtype`, the image token is `image_token_id` or `image_token_index`, and the FFN
//! width follows LFM2's `block_auto_adjust_ff_dim` rule. Every default below mirrors transformers'
//! `Lfm2VlConfig`, `Lfm2Config` and `Siglip2VisionConfig`; the runtime sizes are read from here only.

use candle_core::DType;
use serde::Deserialize;

/// What can go wrong turning `config.json` into a [`Config`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json is not valid JSON for LFM2-VL: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported `model_type` `{found}`: expected `lfm2-vl` or `lfm2_vl`")]
    ModelType { found: String },
    #[error("unsupported dtype `{found}`: expected `float32`, `bfloat16` or `float16`")]
    Dtype { found: String },
    #[error("unsupported activation `{found}` in `{key}`")]
    Activation { key: &'static str, found: String },
    #[error("unknown layer type `{found}` at index {index}: expected `conv` or `full_attention`")]
    LayerType { index: usize, found: String },
    #[error("invalid `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// `config.json` of an LFM2-VL checkpoint, as written by transformers.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Lfm2VlConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub vision_config: VisionConfig,
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default)]
    pub image_token_id: Option<u32>,
    /// The 4.55-era spelling of `image_token_id`.
    #[serde(default)]
    pub image_token_index: Option<u32>,
    #[serde(default = "default_projector_act")]
    pub projector_hidden_act: String,
    #[serde(default = "default_projector_hidden")]
    pub projector_hidden_size: usize,
    #[serde(default = "default_true")]
    pub projector_bias: bool,
    /// Only transformers 5.x writes this; older checkpoints always have the LayerNorm.
    #[serde(default = "default_true")]
    pub projector_use_layernorm: bool,
    #[serde(default = "default_downsample")]
    pub downsample_factor: usize,
    #[serde(default = "default_feature_layer")]
    pub vision_feature_layer: i64,
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
}

/// `vision_config` (SigLIP2 NaFlex vision tower).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct VisionConfig {
    #[serde(default = "default_v_hidden")]
    pub hidden_size: usize,
    #[serde(default = "default_v_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "default_v_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_v_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_v_channels")]
    pub num_channels: usize,
    #[serde(default = "default_v_num_patches")]
    pub num_patches: usize,
    #[serde(default = "default_v_patch")]
    pub patch_size: usize,
    #[serde(default = "default_v_act")]
    pub hidden_act: String,
    #[serde(default = "default_v_eps")]
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        // serde fills each missing key with its default; an empty object gives them all.
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

/// `rope_parameters` as transformers 5.x writes it (older files use a top-level `rope_theta`).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// `text_config` (LFM2 hybrid decoder).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct TextConfig {
    #[serde(default = "default_t_vocab")]
    pub vocab_size: usize,
    #[serde(default)]
    pub hidden_size: Option<usize>,
    #[serde(default)]
    pub block_dim: Option<usize>,
    #[serde(default = "default_t_intermediate")]
    pub intermediate_size: usize,
    /// Overrides `intermediate_size` when present (LFM2's own spelling).
    #[serde(default)]
    pub block_ff_dim: Option<usize>,
    #[serde(default = "default_true")]
    pub block_auto_adjust_ff_dim: bool,
    #[serde(default = "default_multiplier")]
    pub block_ffn_dim_multiplier: Option<f64>,
    #[serde(default = "default_multiple_of")]
    pub block_multiple_of: usize,
    #[serde(default = "default_t_layers")]
    pub num_hidden_layers: usize,
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// LFM2's own spelling; transformers lets it override `num_attention_heads`.
    #[serde(default)]
    pub num_heads: Option<usize>,
    #[serde(default = "default_t_kv_heads")]
    pub num_key_value_heads: usize,
    #[serde(default)]
    pub norm_eps: Option<f64>,
    /// LFM2's own spelling; overrides `norm_eps` like `block_ff_dim` overrides `intermediate_size`.
    #[serde(default)]
    pub block_norm_eps: Option<f64>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(rename = "conv_L_cache", default = "default_conv_l")]
    pub conv_l_cache: usize,
    #[serde(default)]
    pub conv_bias: bool,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub full_attn_idxs: Option<Vec<usize>>,
    #[serde(default)]
    pub eos_token_id: Option<EosIds>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
}

impl Default for TextConfig {
    fn default() -> Self {
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

/// `eos_token_id` is a single id or a list in generation and model configs.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EosIds {
    One(u32),
    Many(Vec<u32>),
}

impl EosIds {
    pub(crate) fn to_vec(&self) -> Vec<u32> {
        match self {
            EosIds::One(id) => vec![*id],
            EosIds::Many(ids) => ids.clone(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_projector_act() -> String {
    "gelu".into()
}
fn default_projector_hidden() -> usize {
    2560
}
fn default_downsample() -> usize {
    2
}
fn default_feature_layer() -> i64 {
    -1
}
fn default_v_hidden() -> usize {
    768
}
fn default_v_intermediate() -> usize {
    3072
}
fn default_v_layers() -> usize {
    12
}
fn default_v_heads() -> usize {
    12
}
fn default_v_channels() -> usize {
    3
}
fn default_v_num_patches() -> usize {
    256
}
fn default_v_patch() -> usize {
    16
}
fn default_v_act() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_v_eps() -> f64 {
    1e-6
}
fn default_t_vocab() -> usize {
    65536
}
fn default_t_intermediate() -> usize {
    12288
}
fn default_multiplier() -> Option<f64> {
    Some(1.0)
}
fn default_multiple_of() -> usize {
    256
}
fn default_t_layers() -> usize {
    32
}
fn default_t_kv_heads() -> usize {
    8
}
fn default_conv_l() -> usize {
    3
}

/// An activation function named in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_pytorch_tanh` and friends: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    GeluErf,
    Silu,
}

impl Activation {
    fn parse(key: &'static str, name: &str) -> Result<Self, ConfigError> {
        match name {
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" | "gelu_python_tanh" => {
                Ok(Activation::GeluTanh)
            }
            "gelu" | "gelu_python" => Ok(Activation::GeluErf),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(ConfigError::Activation {
                key,
                found: other.to_string(),
            }),
        }
    }
}

/// The operator of one LFM2 decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Gated short convolution (`conv`).
    Conv,
    /// Grouped-query attention (`full_attention`).
    Attention,
}

/// Runtime sizes of the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionParams {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Encoder layers actually run: `vision_feature_layer` already applied.
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_channels: usize,
    pub patch_size: usize,
    /// Side of the learned square position grid (`sqrt(num_patches)`, 16 for LFM2-VL).
    pub position_grid: usize,
    pub layer_norm_eps: f64,
    pub act: Activation,
}

impl VisionParams {
    /// Width of one pre-cut patch: `num_channels * patch_size^2`.
    pub fn patch_dim(&self) -> usize {
        self.num_channels * self.patch_size * self.patch_size
    }
    pub(crate) fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// Runtime sizes of the multimodal projector.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectorParams {
    /// Pixel-unshuffle factor (`downsample_factor`).
    pub factor: usize,
    /// `vision hidden * factor^2`.
    pub in_dim: usize,
    pub hidden_size: usize,
    pub out_dim: usize,
    pub bias: bool,
    pub use_layer_norm: bool,
    /// `nn.LayerNorm`'s default; the config has no key for it.
    pub layer_norm_eps: f64,
    pub act: Activation,
}

/// Runtime sizes of the LFM2 decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct TextParams {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Effective SwiGLU width after the `block_auto_adjust_ff_dim` rule.
    pub ffn_dim: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub layer_kinds: Vec<LayerKind>,
    pub norm_eps: f64,
    pub rope_theta: f64,
    /// Depthwise kernel length of the short convolution (`conv_L_cache`).
    pub conv_kernel: usize,
    pub conv_bias: bool,
    pub tie_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// Everything the network needs, resolved from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vision: VisionParams,
    pub projector: ProjectorParams,
    pub text: TextParams,
    pub image_token_id: u32,
    /// The dtype the checkpoint was saved in (`dtype` or `torch_dtype`), if stated.
    pub checkpoint_dtype: Option<DType>,
}

/// Maps transformers' dtype names to candle's.
pub(crate) fn parse_dtype(name: &str) -> Result<DType, ConfigError> {
    match name.trim_start_matches("torch.") {
        "float32" | "float" | "f32" => Ok(DType::F32),
        "bfloat16" | "bf16" => Ok(DType::BF16),
        "float16" | "half" | "f16" => Ok(DType::F16),
        other => Err(ConfigError::Dtype {
            found: other.to_string(),
        }),
    }
}

/// LFM2's FFN width: with `block_auto_adjust_ff_dim`, `roundup(int(int(2*ff/3) * multiplier), multiple_of)`.
pub(crate) fn effective_ffn_dim(
    ff_dim: usize,
    auto_adjust: bool,
    multiplier: Option<f64>,
    multiple_of: usize,
) -> usize {
    if !auto_adjust {
        return ff_dim;
    }
    let mut dim = 2 * ff_dim / 3;
    if let Some(m) = multiplier {
        dim = (m * dim as f64) as usize;
    }
    let multiple_of = multiple_of.max(1);
    multiple_of * dim.div_ceil(multiple_of)
}

impl Config {
    /// Parses `config.json` text.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let raw: Lfm2VlConfig = serde_json::from_str(text)?;
        Self::from_raw(&raw)
    }

    /// Resolves defaults, aliases and derived sizes.
    pub(crate) fn from_raw(raw: &Lfm2VlConfig) -> Result<Self, ConfigError> {
        if let Some(mt) = &raw.model_type
            && mt != "lfm2-vl"
            && mt != "lfm2_vl"
        {
            return Err(ConfigError::ModelType { found: mt.clone() });
        }
        let checkpoint_dtype = match raw.dtype.as_ref().or(raw.torch_dtype.as_ref()) {
            Some(name) => Some(parse_dtype(name)?),
            None => None,
        };

        let v = &raw.vision_config;
        let grid = (v.num_patches as f64).sqrt().round() as usize;
        if grid * grid != v.num_patches || grid == 0 {
            return Err(ConfigError::Invalid {
                key: "vision_config.num_patches",
                reason: format!("{} is not a positive square", v.num_patches),
            });
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(ConfigError::Invalid {
                key: "vision_config.num_attention_heads",
                reason: format!(
                    "hidden size {} is not divisible by {} heads",
                    v.hidden_size, v.num_attention_heads
                ),
            });
        }
        // transformers keeps `hidden_states[k]` = output of the first k layers; a negative index
        // counts from the end. Running only those layers then post_layernorm matches LiquidAI's
        // original code, which truncated the encoder the same way. (transformers 5.x's `lfm2_vl`
        // ignores the key and always takes the last layer; every released checkpoint says -1,
        // where the two agree.)
        let total = v.num_hidden_layers as i64;
        let used = if raw.vision_feature_layer < 0 {
            total + 1 + raw.vision_feature_layer
        } else {
            raw.vision_feature_layer
        };
        if !(0..=total).contains(&used) {
            return Err(ConfigError::Invalid {
                key: "vision_feature_layer",
                reason: format!(
                    "{} is out of range for {} encoder layers",
                    raw.vision_feature_layer, total
                ),
            });
        }
        let vision = VisionParams {
            hidden_size: v.hidden_size,
            intermediate_size: v.intermediate_size,
            num_layers: used as usize,
            num_heads: v.num_attention_heads,
            num_channels: v.num_channels,
            patch_size: v.patch_size,
            position_grid: grid,
            layer_norm_eps: v.layer_norm_eps,
            act: Activation::parse("vision_config.hidden_act", &v.hidden_act)?,
        };

        let t = &raw.text_config;
        let hidden_size = t.block_dim.or(t.hidden_size).unwrap_or(2560);
        let num_heads = t.num_heads.or(t.num_attention_heads).unwrap_or(32);
        if num_heads == 0 || !hidden_size.is_multiple_of(num_heads) {
            return Err(ConfigError::Invalid {
                key: "text_config.num_attention_heads",
                reason: format!("hidden size {hidden_size} is not divisible by {num_heads} heads"),
            });
        }
        if t.num_key_value_heads == 0 || !num_heads.is_multiple_of(t.num_key_value_heads) {
            return Err(ConfigError::Invalid {
                key: "text_config.num_key_value_heads",
                reason: format!(
                    "{num_heads} attention heads are not a multiple of {} key/value heads",
                    t.num_key_value_heads
                ),
            });
        }
        let layer_kinds = match (&t.layer_types, &t.full_attn_idxs) {
            (Some(types), _) => types
                .iter()
                .enumerate()
                .map(|(index, s)| match s.as_str() {
                    "conv" => Ok(LayerKind::Conv),
                    "full_attention" | "attention" => Ok(LayerKind::Attention),
                    other => Err(ConfigError::LayerType {
                        index,
                        found: other.to_string(),
                    }),
                })
                .collect::<Result<Vec<_>, _>>()?,
            (None, idxs) => (0..t.num_hidden_layers)
                .map(|i| match idxs {
                    Some(idxs) if !idxs.contains(&i) => LayerKind::Conv,
                    _ => LayerKind::Attention,
                })
                .collect(),
        };
        if layer_kinds.len() != t.num_hidden_layers {
            return Err(ConfigError::Invalid {
                key: "text_config.layer_types",
                reason: format!(
                    "{} entries for {} layers",
                    layer_kinds.len(),
                    t.num_hidden_layers
                ),
            });
        }
        let conv_kernel = t.conv_l_cache;
        if conv_kernel == 0 {
            return Err(ConfigError::Invalid {
                key: "text_config.conv_L_cache",
                reason: "must be at least 1".into(),
            });
        }
        let rope_theta = t
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(t.rope_theta)
            .unwrap_or(1_000_000.0);
        let text = TextParams {
            vocab_size: t.vocab_size,
            hidden_size,
            ffn_dim: effective_ffn_dim(
                t.block_ff_dim.unwrap_or(t.intermediate_size),
                t.block_auto_adjust_ff_dim,
                t.block_ffn_dim_multiplier,
                t.block_multiple_of,
            ),
            num_heads,
            num_kv_heads: t.num_key_value_heads,
            head_dim: hidden_size / num_heads,
            layer_kinds,
            norm_eps: t.block_norm_eps.or(t.norm_eps).unwrap_or(1e-5),
            rope_theta,
            conv_kernel,
            conv_bias: t.conv_bias,
            tie_embeddings: t
                .tie_word_embeddings
                .or(raw.tie_word_embeddings)
                .unwrap_or(true),
            eos_token_ids: t.eos_token_id.as_ref().map_or(vec![2], EosIds::to_vec),
            bos_token_id: t.bos_token_id.or(Some(1)),
            pad_token_id: t.pad_token_id.or(Some(0)),
        };

        let factor = raw.downsample_factor;
        if factor == 0 {
            return Err(ConfigError::Invalid {
                key: "downsample_factor",
                reason: "must be at least 1".into(),
            });
        }
        let projector = ProjectorParams {
            factor,
            in_dim: vision.hidden_size * factor * factor,
            hidden_size: raw.projector_hidden_size,
            out_dim: text.hidden_size,
            bias: raw.projector_bias,
            use_layer_norm: raw.projector_use_layernorm,
            layer_norm_eps: 1e-5,
            act: Activation::parse("projector_hidden_act", &raw.projector_hidden_act)?,
        };

        Ok(Config {
            vision,
            projector,
            text,
            image_token_id: raw.image_token_id.or(raw.image_token_index).unwrap_or(396),
            checkpoint_dtype,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffn_rule_matches_transformers() {
        // LFM2-VL-450M: 6656 -> int(4437.33) = 4437 -> roundup to 256 = 4608.
        assert_eq!(effective_ffn_dim(6656, true, Some(1.0), 256), 4608);
        // The tiny reference checkpoint: 200 -> 133 -> 160.
        assert_eq!(effective_ffn_dim(200, true, Some(1.0), 32), 160);
        assert_eq!(effective_ffn_dim(200, false, Some(1.0), 32), 200);
    }

    #[test]
    fn minimal_config_takes_transformers_defaults() {
        let cfg = Config::from_json(r#"{"model_type": "lfm2_vl"}"#).unwrap();
        assert_eq!(cfg.image_token_id, 396);
        assert_eq!(cfg.vision.hidden_size, 768);
        assert_eq!(cfg.vision.num_layers, 12);
        assert_eq!(cfg.vision.position_grid, 16);
        assert_eq!(cfg.vision.act, Activation::GeluTanh);
        assert_eq!(cfg.projector.act, Activation::GeluErf);
        assert_eq!(cfg.projector.in_dim, 768 * 4);
        assert_eq!(cfg.text.num_heads, 32);
        assert_eq!(cfg.text.layer_kinds, vec![LayerKind::Attention; 32]);
        assert_eq!(cfg.checkpoint_dtype, None);
    }

    #[test]
    fn rejects_unknown_model_type_and_layer_type() {
        let err = Config::from_json(r#"{"model_type": "llava"}"#).unwrap_err();
        assert!(matches!(err, ConfigError::ModelType { .. }), "{err}");
        let err = Config::from_json(
            r#"{"text_config": {"num_hidden_layers": 1, "layer_types": ["mamba"]}}"#,
        )
        .unwrap_err();
        assert!(
            matches!(err, ConfigError::LayerType { index: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn feature_layer_truncates_the_encoder() {
        let cfg = Config::from_json(r#"{"vision_feature_layer": -2}"#).unwrap();
        assert_eq!(cfg.vision.num_layers, 11);
        let err = Config::from_json(r#"{"vision_feature_layer": -14}"#).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }));
    }

    #[test]
    fn dtype_spellings() {
        let cfg = Config::from_json(r#"{"dtype": "float32"}"#).unwrap();
        assert_eq!(cfg.checkpoint_dtype, Some(DType::F32));
        let cfg = Config::from_json(r#"{"torch_dtype": "bfloat16"}"#).unwrap();
        assert_eq!(cfg.checkpoint_dtype, Some(DType::BF16));
        assert!(Config::from_json(r#"{"dtype": "int4"}"#).is_err());
    }

    #[test]
    fn rope_parameters_of_transformers_5() {
        let cfg =
            Config::from_json(r#"{"text_config": {"rope_parameters": {"rope_theta": 10000.0}}}"#)
                .unwrap();
        assert_eq!(cfg.text.rope_theta, 10000.0);
    }
}
