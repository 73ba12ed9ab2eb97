//! A GGUF pair (`<name>-<QUANT>.gguf`, llama.cpp's `lfm2` text model, and
//! `mmproj-<name>-<QUANT>.gguf`, the SigLIP2 tower and LFM2 projector) → an
//! [`Lfm2VlModel`] and its [`Processor`], as llama.cpp's converter, LiquidAI's published GGUF
//! repos and `vlmpipe export --gguf` write them.
//!
//! - The config is rebuilt from the metadata (`lfm2.*`, `clip.*`) and the tensor shapes, in the
//!   `config.json` form [`Config::from_json`] reads, so every size check and default is the
//!   safetensors path's.
//! - Weights are found by the model's own (Hub) tensor names mapped forward with
//!   [`crate::gguf::names::map_name`], so the name map has one definition for export and import.
//!   The two layout changes of the export are undone: the short-conv kernel gets its middle axis
//!   back, and the patch embedding's `(out, C, py, px)` kernel becomes the `(out, py·px·C)` linear.
//! - Block-quantized matrices (Q8_0, Q4_K, …) stay blocks: each projection and the LM head
//!   multiply through [`QuantWeight`] (candle's `QMatMul`), as `--quant` does; F32/F16/BF16
//!   tensors become dense tensors in the load dtype. A quantized tied embedding table reads its
//!   rows from the quantized head, as llama.cpp reads `token_embd`.
//! - The image processor takes patch size, downsample factor and mean/std from `clip.*`; the
//!   tiling numbers (tile 512, 64..256 image tokens, thumbnail) are not in an mmproj, and are
//!   the LFM2-VL processor's defaults, which llama.cpp's `clip.cpp` hard-codes too.
//!
//! Every check that can fail (architecture, truncation, block rows, whether the mmproj fits the
//! text model) runs on the headers, before any tensor is read.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use serde_json::{Value as Json, json};

use crate::gguf::names::{Target, map_name};
use crate::gguf::read::{GgufIn, GgufPair, GgufReadError, find_pair, pair_for_text_file};
use crate::gguf::tokenizer_read::{GgufTokenizer, read_tokenizer};
use crate::model::checkpoint::LoadOptions;
use crate::model::config::Config;
use crate::model::lfm2_vl::{Lfm2VlModel, WeightPrefixes};
use crate::model::linear::{LinearVisitor, WeightMatrix};
use crate::model::processor::chat::{ChatTemplate, TemplateTokens};
use crate::model::processor::{ImageTokenStrings, Processor, ProcessorConfig};
use crate::model::quant::QuantWeight;

/// A loaded pair: the network, its processor and what the files said.
pub(crate) struct GgufModel {
    pub model: Lfm2VlModel,
    pub processor: Processor,
    pub tokenizer: GgufTokenizer,
}

/// The pair `path` stands for, or `None` for a Hub-layout checkpoint folder: a `.gguf` text
/// file (its mmproj beside it), or a folder with no `config.json` that holds `.gguf` files.
pub(crate) fn detect(path: &Path) -> Result<Option<GgufPair>, GgufReadError> {
    if path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return pair_for_text_file(path, None).map(Some);
    }
    if path.is_dir()
        && !path.join("config.json").is_file()
        && crate::gguf::read::has_gguf_files(path)
    {
        return find_pair(path, None, None).map(Some);
    }
    Ok(None)
}

const TEXT_ARCH: &str = "LFM2-VL's text model is llama.cpp's `lfm2` architecture";

/// The two files opened and checked against each other (headers only).
pub(crate) struct OpenPair {
    pub text: GgufIn,
    pub mmproj: GgufIn,
    pub config: Config,
    pub tokenizer: GgufTokenizer,
    pub processor_config: ProcessorConfig,
}

/// Opens both files and checks everything that can be checked without reading a tensor.
pub(crate) fn open_pair(pair: &GgufPair) -> Result<OpenPair, GgufReadError> {
    let text = GgufIn::open(&pair.text)?;
    let mmproj = GgufIn::open(&pair.mmproj)?;
    if text.architecture() == "clip" {
        return Err(GgufReadError::Architecture {
            path: pair.text.clone(),
            found: "clip".into(),
            expected: format!(
                "it is an mmproj, given where the text model goes ({TEXT_ARCH}; its mmproj is \
                 named `mmproj-…`)"
            ),
        });
    }
    text.expect_architecture(
        "lfm2",
        &format!("vlmpipe reads LFM2-VL ({TEXT_ARCH}); convert an LFM2-VL checkpoint"),
    )?;
    mmproj.expect_architecture(
        "clip",
        "an mmproj is llama.cpp's `clip` architecture (vision tower and projector)",
    )?;
    let projector = mmproj.string_opt("clip.projector_type")?.unwrap_or("none");
    if projector != "lfm2" {
        return Err(GgufReadError::Architecture {
            path: pair.mmproj.clone(),
            found: format!("clip (projector `{projector}`)"),
            expected: "LFM2-VL's mmproj has `clip.projector_type` `lfm2`".into(),
        });
    }
    let tokenizer = read_tokenizer(&text)?;
    let image_token_id = tokenizer
        .tokenizer()
        .ok()
        .and_then(|t| t.token_to_id(&ImageTokenStrings::default().image))
        .ok_or_else(|| GgufReadError::BadKey {
            path: pair.text.clone(),
            key: "tokenizer.ggml.tokens".into(),
            message: "has no `<image>` token: not an LFM2-VL tokenizer".into(),
        })?;
    let config_json = config_json(&text, &mmproj, &tokenizer, image_token_id)?;
    check_fit(pair, &text, &mmproj, &config_json)?;
    let config =
        Config::from_json(&config_json.to_string()).map_err(|e| GgufReadError::BadKey {
            path: pair.text.clone(),
            key: "lfm2.*".into(),
            message: format!("describe no model vlmpipe can build: {e}"),
        })?;
    let processor_config = processor_config(&mmproj)?;
    Ok(OpenPair {
        text,
        mmproj,
        config,
        tokenizer,
        processor_config,
    })
}

/// `config.json` of the pair, in the 4.55 Hub spelling.
fn config_json(
    text: &GgufIn,
    mmproj: &GgufIn,
    tokenizer: &GgufTokenizer,
    image_token_id: u32,
) -> Result<Json, GgufReadError> {
    const T: &str = "llama.cpp's converter writes it for every lfm2 model";
    const V: &str = "llama.cpp's converter writes it for every mmproj";
    let layers = text.usize("lfm2.block_count", T)?;
    let hidden = text.usize("lfm2.embedding_length", T)?;
    let heads = text.usize("lfm2.attention.head_count", T)?;
    // Per layer: KV heads of an attention layer, 0 for a short-conv layer.
    let kv_key = "lfm2.attention.head_count_kv";
    let kv: Vec<i64> = match text.get(kv_key) {
        Some(candle_core::quantized::gguf_file::Value::Array(_)) => text.ints(kv_key, T)?,
        Some(_) => {
            let n = text.usize(kv_key, T)? as i64;
            (0..layers)
                .map(|i| {
                    let conv = text.has_tensor(&format!("blk.{i}.shortconv.conv.weight"));
                    if conv { 0 } else { n }
                })
                .collect()
        }
        None => return Err(missing(text, kv_key, T)),
    };
    if kv.len() != layers {
        return Err(GgufReadError::BadKey {
            path: text.path().to_path_buf(),
            key: kv_key.into(),
            message: format!("has {} entries for {layers} blocks", kv.len()),
        });
    }
    let layer_types: Vec<&str> = kv
        .iter()
        .map(|&n| if n == 0 { "conv" } else { "full_attention" })
        .collect();
    let kv_heads = kv.iter().copied().max().unwrap_or(0).max(1);
    let vocab = match text.u64_opt("lfm2.vocab_size")? {
        Some(n) => n as usize,
        None => text
            .tensor_info("token_embd.weight")
            .map(|(_, d)| d[0])
            .ok_or_else(|| missing(text, "lfm2.vocab_size", T))?,
    };
    let first_conv = layer_types.iter().position(|t| *t == "conv");
    let conv_bias =
        first_conv.is_some_and(|i| text.has_tensor(&format!("blk.{i}.shortconv.conv.bias")));
    let mut text_config = json!({
        "model_type": "lfm2",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "block_ff_dim": text.usize("lfm2.feed_forward_length", T)?,
        "block_auto_adjust_ff_dim": false,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "layer_types": layer_types,
        "conv_L_cache": text.usize("lfm2.shortconv.l_cache", T)?,
        "conv_bias": conv_bias,
        "tie_word_embeddings": !text.has_tensor("output.weight"),
    });
    let put = |cfg: &mut Json, key: &str, value: Option<Json>| {
        if let Some(v) = value {
            cfg[key] = v;
        }
    };
    put(
        &mut text_config,
        "norm_eps",
        text.f64_opt("lfm2.attention.layer_norm_rms_epsilon")?
            .map(Json::from),
    );
    put(
        &mut text_config,
        "rope_theta",
        text.f64_opt("lfm2.rope.freq_base")?.map(Json::from),
    );
    put(
        &mut text_config,
        "max_position_embeddings",
        text.u64_opt("lfm2.context_length")?.map(Json::from),
    );
    put(
        &mut text_config,
        "eos_token_id",
        tokenizer.eos_id.map(Json::from),
    );

    let v_layers = mmproj.usize("clip.vision.block_count", V)?;
    let num_patches = mmproj
        .tensor_info("v.position_embd.weight")
        .map(|(_, d)| d[0])
        .ok_or_else(|| missing_tensor(mmproj, "v.position_embd.weight"))?;
    let mm1 = mmproj
        .tensor_info("mm.1.weight")
        .ok_or_else(|| missing_tensor(mmproj, "mm.1.weight"))?;
    if mmproj.bool_opt("clip.use_gelu") == Some(false) {
        return Err(GgufReadError::BadKey {
            path: mmproj.path().to_path_buf(),
            key: "clip.use_gelu".into(),
            message: "is false; SigLIP2 (LFM2-VL's vision tower) uses GELU".into(),
        });
    }
    let mut vision_config = json!({
        "hidden_size": mmproj.usize("clip.vision.embedding_length", V)?,
        "intermediate_size": mmproj.usize("clip.vision.feed_forward_length", V)?,
        "num_hidden_layers": v_layers,
        "num_attention_heads": mmproj.usize("clip.vision.attention.head_count", V)?,
        "num_channels": 3,
        "num_patches": num_patches,
        "patch_size": mmproj.usize("clip.vision.patch_size", V)?,
        "hidden_act": "gelu_pytorch_tanh",
    });
    put(
        &mut vision_config,
        "layer_norm_eps",
        mmproj
            .f64_opt("clip.vision.attention.layer_norm_epsilon")?
            .map(Json::from),
    );
    Ok(json!({
        "model_type": "lfm2-vl",
        "architectures": ["Lfm2VlForConditionalGeneration"],
        "image_token_index": image_token_id,
        "downsample_factor": mmproj.u64_opt("clip.vision.projector.scale_factor")?.unwrap_or(2),
        "projector_hidden_act": "gelu",
        "projector_hidden_size": mm1.1[0],
        "projector_bias": mmproj.has_tensor("mm.1.bias"),
        "projector_use_layernorm": mmproj.has_tensor("mm.input_norm.weight"),
        "vision_feature_layer": -1,
        "tie_word_embeddings": !text.has_tensor("output.weight"),
        "text_config": text_config,
        "vision_config": vision_config,
    }))
}

fn missing(file: &GgufIn, key: &str, hint: &'static str) -> GgufReadError {
    GgufReadError::MissingKey {
        path: file.path().to_path_buf(),
        key: key.to_owned(),
        hint,
    }
}

fn missing_tensor(file: &GgufIn, tensor: &str) -> GgufReadError {
    GgufReadError::MissingTensor {
        path: file.path().to_path_buf(),
        tensor: tensor.to_owned(),
        hint: " (not an LFM2-VL mmproj?)".into(),
    }
}

/// Whether the mmproj's projector feeds this text model: its output width is the text
/// embedding width (`clip.vision.projection_dim` and `mm.2.weight`), its input the unshuffled
/// vision width.
fn check_fit(
    pair: &GgufPair,
    text: &GgufIn,
    mmproj: &GgufIn,
    cfg: &Json,
) -> Result<(), GgufReadError> {
    let mismatch = |mismatch: String| GgufReadError::Mismatch {
        text: pair.text.clone(),
        mmproj: pair.mmproj.clone(),
        mismatch,
    };
    let width = cfg["text_config"]["hidden_size"].as_u64().unwrap_or(0) as usize;
    if let Some(dim) = mmproj.u64_opt("clip.vision.projection_dim")?
        && dim as usize != width
    {
        return Err(mismatch(format!(
            "its projector outputs {dim} values a token (`clip.vision.projection_dim`), the text \
             model embeds tokens in {width} (`lfm2.embedding_length`)"
        )));
    }
    if let Some((_, dims)) = mmproj.tensor_info("mm.2.weight")
        && dims[0] != width
    {
        return Err(mismatch(format!(
            "`mm.2.weight` is [{}, {}]: it outputs {} values a token, the text model embeds \
             tokens in {width}",
            dims[0], dims[1], dims[0]
        )));
    }
    let v_hidden = cfg["vision_config"]["hidden_size"].as_u64().unwrap_or(0) as usize;
    let factor = cfg["downsample_factor"].as_u64().unwrap_or(2) as usize;
    if let Some((_, dims)) = mmproj.tensor_info("mm.1.weight")
        && dims[1] != v_hidden * factor * factor
    {
        return Err(mismatch(format!(
            "`mm.1.weight` takes {} values, the vision tower gives {v_hidden} x {factor}² = {}",
            dims[1],
            v_hidden * factor * factor
        )));
    }
    if let Some((_, dims)) = text.tensor_info("token_embd.weight")
        && dims.get(1) != Some(&width)
    {
        return Err(GgufReadError::BadKey {
            path: pair.text.clone(),
            key: "lfm2.embedding_length".into(),
            message: format!("is {width}, but `token_embd.weight` is {dims:?}"),
        });
    }
    Ok(())
}

/// The processor settings: LFM2-VL's defaults with the mmproj's patch, factor and mean/std.
fn processor_config(mmproj: &GgufIn) -> Result<ProcessorConfig, GgufReadError> {
    const V: &str = "llama.cpp's converter writes it for every mmproj";
    let mut cfg = ProcessorConfig {
        encoder_patch_size: mmproj.usize("clip.vision.patch_size", V)?,
        ..ProcessorConfig::default()
    };
    if let Some(f) = mmproj.u64_opt("clip.vision.projector.scale_factor")? {
        cfg.downsample_factor = f as usize;
    }
    for (key, slot) in [
        ("clip.vision.image_mean", &mut cfg.image_mean),
        ("clip.vision.image_std", &mut cfg.image_std),
    ] {
        let values = mmproj.floats(key, V)?;
        *slot = <[f64; 3]>::try_from(values.as_slice()).map_err(|_| GgufReadError::BadKey {
            path: mmproj.path().to_path_buf(),
            key: key.into(),
            message: format!("has {} values, not 3 (RGB)", values.len()),
        })?;
    }
    cfg.validate().map_err(|e| GgufReadError::BadKey {
        path: mmproj.path().to_path_buf(),
        key: "clip.vision.*".into(),
        message: e.to_string(),
    })?;
    Ok(cfg)
}

/// Loads the pair onto `opts.device` in `opts.dtype`, block-quantized matrices kept as blocks.
pub(crate) fn load_pair(pair: &GgufPair, opts: &LoadOptions) -> Result<GgufModel, GgufReadError> {
    let open = open_pair(pair)?;
    let template_source =
        open.tokenizer
            .chat_template
            .clone()
            .ok_or_else(|| GgufReadError::MissingKey {
                path: pair.text.clone(),
                key: "tokenizer.chat_template".into(),
                hint: "vlmpipe builds prompts with the model's chat template",
            })?;
    let tokens = TemplateTokens {
        bos_token: open.tokenizer.bos.clone(),
        eos_token: open.tokenizer.eos.clone(),
        pad_token: open.tokenizer.pad.clone(),
        unk_token: open.tokenizer.unk.clone(),
    };
    let in_text = |message: String| GgufReadError::Tensor {
        path: pair.text.clone(),
        message,
    };
    let template = ChatTemplate::new(template_source, tokens)
        .map_err(|e| in_text(format!("`tokenizer.chat_template`: {e}")))?;
    let hf_tokenizer = open.tokenizer.tokenizer().map_err(in_text)?;
    let processor = Processor::new(
        open.processor_config.clone(),
        hf_tokenizer,
        template,
        ImageTokenStrings::default(),
    )
    .map_err(|e| in_text(e.to_string()))?;

    let backend = PairBackend {
        text: &open.text,
        mmproj: &open.mmproj,
        patch_size: open.config.vision.patch_size,
        blocks: Mutex::new(HashMap::new()),
        device: opts.device.clone(),
    };
    let prefixes = WeightPrefixes {
        lm_head: (!open.config.text.tie_embeddings).then(|| "lm_head.weight".to_owned()),
        ..WeightPrefixes::default()
    };
    let vb = VarBuilder::from_backend(Box::new(&backend), opts.dtype, opts.device.clone());
    let mut model = Lfm2VlModel::new(&open.config, vb, &prefixes)
        .map_err(|e| in_text(format!("cannot build the model: {e}")))?;
    let blocks = backend.blocks.into_inner().unwrap_or_default();
    swap_in_blocks(&mut model, blocks, &open.config)
        .map_err(|e| in_text(format!("cannot use the quantized weights: {e}")))?;
    Ok(GgufModel {
        model,
        processor,
        tokenizer: open.tokenizer,
    })
}

/// Replaces every projection (and the LM head) whose GGUF tensor is block-quantized by its
/// blocks.
fn swap_in_blocks(
    model: &mut Lfm2VlModel,
    mut blocks: HashMap<String, Arc<QTensor>>,
    config: &Config,
) -> candle_core::Result<()> {
    let mut failure = None;
    model.visit_linears_mut(&mut |lin| {
        if failure.is_some() {
            return;
        }
        let name = format!("{}.weight", lin.name());
        if let Some(q) = blocks.remove(&name) {
            match QuantWeight::from_qtensor(q) {
                Ok(w) => lin.set_weight_matrix(WeightMatrix::Quantized(Arc::new(w))),
                Err(e) => failure = Some(e),
            }
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let head = if config.text.tie_embeddings {
        "model.language_model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    if let Some(q) = blocks.remove(head) {
        let w = QuantWeight::from_qtensor(q)?;
        model
            .text_mut()
            .set_lm_head_matrix(WeightMatrix::Quantized(Arc::new(w)));
    }
    Ok(())
}

/// Serves the model's (Hub) tensor names from the two files.
struct PairBackend<'a> {
    text: &'a GgufIn,
    mmproj: &'a GgufIn,
    patch_size: usize,
    /// Block-quantized 2-D tensors read so far, by Hub name, kept as blocks for the swap.
    blocks: Mutex<HashMap<String, Arc<QTensor>>>,
    device: Device,
}

impl PairBackend<'_> {
    fn locate(&self, name: &str) -> Option<(&GgufIn, String)> {
        match map_name(name)? {
            Target::Text(n) => Some((self.text, n)),
            Target::Mmproj(n) => Some((self.mmproj, n)),
        }
    }

    /// `name` as a dense f32 tensor in the model's layout (`shape`).
    fn dense(&self, name: &str, shape: &Shape) -> candle_core::Result<Tensor> {
        let Some((file, gguf_name)) = self.locate(name) else {
            candle_core::bail!("`{name}` has no GGUF tensor")
        };
        let q = file
            .tensor(&gguf_name, &Device::Cpu)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let quantized = !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        let t = q.dequantize(&Device::Cpu)?;
        let t = if gguf_name == "v.patch_embd.weight" && t.rank() == 4 {
            // (out, C, py, px) conv kernel → (out, py·px·C) over SigLIP2's patch pixel order.
            let out = t.dim(0)?;
            t.permute((0, 2, 3, 1))?
                .reshape((out, self.patch_size * self.patch_size * 3))?
        } else if t.elem_count() == shape.elem_count() && t.dims() != shape.dims() {
            // The short-conv kernel lost its middle axis of 1 in the export.
            t.reshape(shape)?
        } else {
            t
        };
        if t.dims() != shape.dims() {
            candle_core::bail!(
                "`{}` tensor `{gguf_name}` has shape {:?}, the model needs {:?} for `{name}`",
                file.path().display(),
                t.dims(),
                shape.dims()
            )
        }
        if quantized && t.rank() == 2 {
            // On the CPU the blocks just read are the ones to keep; elsewhere they go onto the
            // device as read from the file.
            let blocks = if self.device.is_cpu() {
                q
            } else {
                file.tensor(&gguf_name, &self.device)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            };
            self.blocks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(name.to_owned(), Arc::new(blocks));
        }
        Ok(t)
    }
}

impl SimpleBackend for &PairBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.dense(name, &s)?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("`{name}`: GGUF tensors are read with their shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.locate(name)
            .is_some_and(|(file, n)| file.has_tensor(&n))
    }
}
