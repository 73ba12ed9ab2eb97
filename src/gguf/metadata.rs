//! The GGUF key/value metadata of the two files, as llama.cpp's converter writes it for an
//! LFM2-VL checkpoint: `TextModel.set_gguf_parameters` + `LFM2Model` for the text file,
//! `MmprojModel.set_gguf_parameters` + `LFM2VLModel` for the mmproj, read from the same config
//! fields the converter reads (`{**config, **text_config}` for the text model, `vision_config`
//! and the processor files for the mmproj).

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use super::GgufError;
use super::quant::GgufQuant;
use super::tokenizer::GgufVocab;

/// `general.quantization_version` (ggml's `GGML_QNT_VERSION`).
const QUANTIZATION_VERSION: u32 = 2;

/// Ordered key/value pairs, as they go into the file.
pub(crate) type Kv = Vec<(String, Value)>;

fn u32_of(json: Option<&Json>) -> Option<u32> {
    json.and_then(Json::as_u64)
        .and_then(|v| u32::try_from(v).ok())
}

fn f32_of(json: Option<&Json>) -> Option<f32> {
    json.and_then(Json::as_f64).map(|v| v as f32)
}

/// The first of `keys` that `obj` has (the converter's `find_hparam`).
fn find<'a>(obj: &'a serde_json::Map<String, Json>, keys: &[&str]) -> Option<&'a Json> {
    keys.iter()
        .find_map(|k| obj.get(*k).filter(|v| !v.is_null()))
}

/// `{**config, **config["text_config"]}`.
pub(crate) fn text_hparams(config: &Json) -> serde_json::Map<String, Json> {
    let mut merged = config.as_object().cloned().unwrap_or_default();
    if let Some(text) = config.get("text_config").and_then(Json::as_object) {
        for (k, v) in text {
            merged.insert(k.clone(), v.clone());
        }
    }
    merged
}

fn missing(path: &Path, what: &str) -> GgufError {
    GgufError::Input {
        path: path.to_path_buf(),
        message: format!("has no `{what}`"),
    }
}

/// llama.cpp's size label (gguf-py `size_label`): `450M`, `1.2B`, …
pub(crate) fn size_label(total_params: u64) -> String {
    let n = total_params as f64;
    let (scaled, suffix) = if n >= 1e12 {
        (n / 1e12, "T")
    } else if n >= 1e9 {
        (n / 1e9, "B")
    } else if n >= 1e6 {
        (n / 1e6, "M")
    } else {
        (n / 1e3, "K")
    };
    let prec = if scaled.abs() < 10.0 { 1 } else { 0 };
    let text = format!("{scaled:.prec$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    };
    format!("{text}{suffix}")
}

fn general(arch: &str, kind: &str, name: &str, size: Option<&str>) -> Kv {
    let mut kv: Kv = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String(kind.into())),
        ("general.name".into(), Value::String(name.into())),
    ];
    if let Some(size) = size {
        kv.push(("general.size_label".into(), Value::String(size.into())));
    }
    kv
}

/// The text file's metadata: `general.*`, `lfm2.*`, `tokenizer.ggml.*`.
pub fn text_metadata(
    config_path: &Path,
    config: &Json,
    vocab: &GgufVocab,
    name: &str,
    quant: GgufQuant,
    total_params: u64,
) -> Result<Kv, GgufError> {
    let h = text_hparams(config);
    let need = |keys: &[&str]| -> Result<u32, GgufError> {
        u32_of(find(&h, keys)).ok_or_else(|| missing(config_path, keys[0]))
    };
    let arch = "lfm2";
    let key = |k: &str| format!("{arch}.{k}");
    let mut kv = general(arch, "model", name, Some(&size_label(total_params)));

    let block_count = need(&["n_layers", "num_hidden_layers", "n_layer", "num_layers"])?;
    kv.push((key("block_count"), Value::U32(block_count)));
    if let Some(n) = u32_of(find(
        &h,
        &[
            "max_position_embeddings",
            "n_ctx",
            "n_positions",
            "max_length",
        ],
    )) {
        kv.push((key("context_length"), Value::U32(n)));
    }
    kv.push((
        key("embedding_length"),
        Value::U32(need(&["hidden_size", "n_embd", "dim"])?),
    ));
    kv.push((
        key("feed_forward_length"),
        Value::U32(lfm2_ff_dim(&h, config_path)?),
    ));
    kv.push((
        key("attention.head_count"),
        Value::U32(need(&["num_attention_heads", "n_head", "n_heads"])?),
    ));
    // One entry per layer: the KV heads of attention layers, 0 for the short-conv ones.
    let n_kv = need(&["num_key_value_heads", "n_kv_heads"])?;
    let layer_types: Vec<String> = match h.get("layer_types").and_then(Json::as_array) {
        Some(types) => types
            .iter()
            .map(|t| t.as_str().unwrap_or_default().to_owned())
            .collect(),
        None => {
            let attn: Vec<u64> = h
                .get("full_attn_idxs")
                .and_then(Json::as_array)
                .map(|a| a.iter().filter_map(Json::as_u64).collect())
                .ok_or_else(|| missing(config_path, "layer_types"))?;
            (0..u64::from(block_count))
                .map(|i| {
                    if attn.contains(&i) {
                        "full_attention".to_owned()
                    } else {
                        "conv".to_owned()
                    }
                })
                .collect()
        }
    };
    kv.push((
        key("attention.head_count_kv"),
        Value::Array(
            layer_types
                .iter()
                .map(|t| Value::I32(if t == "conv" { 0 } else { n_kv as i32 }))
                .collect(),
        ),
    ));
    let rope_theta = f32_of(
        h.get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| find(&h, &["rope_theta", "rotary_emb_base"])),
    );
    if let Some(theta) = rope_theta {
        kv.push((key("rope.freq_base"), Value::F32(theta)));
    }
    if let Some(eps) = f32_of(find(&h, &["rms_norm_eps", "norm_eps"])) {
        kv.push((key("attention.layer_norm_rms_epsilon"), Value::F32(eps)));
    }
    kv.push(("general.file_type".into(), Value::U32(quant.file_type())));
    kv.push((key("vocab_size"), Value::U32(need(&["vocab_size"])?)));
    kv.push((
        key("shortconv.l_cache"),
        Value::U32(need(&["conv_L_cache"])?),
    ));
    kv.push((
        "general.quantization_version".into(),
        Value::U32(QUANTIZATION_VERSION),
    ));

    kv.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
    kv.push((
        "tokenizer.ggml.pre".into(),
        Value::String(vocab.pre.clone()),
    ));
    kv.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(vocab.tokens.iter().cloned().map(Value::String).collect()),
    ));
    kv.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(vocab.token_types.iter().map(|&t| Value::I32(t)).collect()),
    ));
    if !vocab.merges.is_empty() {
        kv.push((
            "tokenizer.ggml.merges".into(),
            Value::Array(vocab.merges.iter().cloned().map(Value::String).collect()),
        ));
    }
    for (typ, id) in &vocab.special_ids {
        let typ = if *typ == "pad" { "padding" } else { typ };
        kv.push((format!("tokenizer.ggml.{typ}_token_id"), Value::U32(*id)));
    }
    for (typ, add) in &vocab.add_special {
        kv.push((format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(*add)));
    }
    if let Some(template) = &vocab.chat_template {
        kv.push((
            "tokenizer.chat_template".into(),
            Value::String(template.clone()),
        ));
    }
    Ok(kv)
}

/// `LFM2Model._add_feed_forward_length`: the SwiGLU width the checkpoint's matrices have.
fn lfm2_ff_dim(h: &serde_json::Map<String, Json>, path: &Path) -> Result<u32, GgufError> {
    let ff = find(h, &["block_ff_dim", "intermediate_size"])
        .and_then(Json::as_u64)
        .ok_or_else(|| missing(path, "block_ff_dim"))?;
    let auto = h
        .get("block_auto_adjust_ff_dim")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    if !auto {
        return Ok(ff as u32);
    }
    let mut ff = (2 * ff) / 3;
    if let Some(m) = h.get("block_ffn_dim_multiplier").and_then(Json::as_f64) {
        ff = (m * ff as f64) as u64;
    }
    let multiple = h
        .get("block_multiple_of")
        .and_then(Json::as_u64)
        .unwrap_or(256)
        .max(1);
    Ok((multiple * ff.div_ceil(multiple)) as u32)
}

/// What the mmproj metadata reads besides `config.json`: `image_mean` / `image_std` from
/// `preprocessor_config.json`, overridden by `processor_config.json` (and its
/// `image_processor`), as `MmprojModel.__init__` merges them.
pub(crate) fn processor_settings(dir: &Path) -> Result<serde_json::Map<String, Json>, GgufError> {
    let mut merged = serde_json::Map::new();
    for file in ["preprocessor_config.json", "processor_config.json"] {
        let path = dir.join(file);
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| GgufError::io(&path, e))?;
        let json: Json = serde_json::from_str(&text).map_err(|e| GgufError::Input {
            path: path.clone(),
            message: format!("is not valid JSON: {e}"),
        })?;
        let Some(obj) = json.as_object() else {
            continue;
        };
        let nested = if file == "preprocessor_config.json" {
            "media_proc_cfg"
        } else {
            "image_processor"
        };
        for (k, v) in obj {
            merged.insert(k.clone(), v.clone());
        }
        if let Some(inner) = obj.get(nested).and_then(Json::as_object) {
            for (k, v) in inner {
                merged.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(merged)
}

/// The mmproj's metadata: `general.*` and `clip.*` (the LFM2 projector type).
pub(crate) fn mmproj_metadata(
    dir: &Path,
    config: &Json,
    name: &str,
    quant: GgufQuant,
) -> Result<Kv, GgufError> {
    let config_path = dir.join("config.json");
    let vision = config
        .get("vision_config")
        .and_then(Json::as_object)
        .ok_or_else(|| missing(&config_path, "vision_config"))?;
    let text = text_hparams(config);
    let need = |obj: &serde_json::Map<String, Json>, keys: &[&str]| -> Result<u32, GgufError> {
        u32_of(find(obj, keys)).ok_or_else(|| missing(&config_path, keys[0]))
    };
    let processor = processor_settings(dir)?;
    let floats = |key: &str| -> Result<Value, GgufError> {
        let values =
            processor
                .get(key)
                .and_then(Json::as_array)
                .ok_or_else(|| GgufError::Input {
                    path: dir.join("preprocessor_config.json"),
                    message: format!("has no `{key}` (the mmproj needs the image normalisation)"),
                })?;
        Ok(Value::Array(
            values
                .iter()
                .map(|v| Value::F32(v.as_f64().unwrap_or_default() as f32))
                .collect(),
        ))
    };
    let block_keys = [
        "n_layers",
        "num_hidden_layers",
        "n_layer",
        "num_layers",
        "depth",
        "layers",
    ];
    let mut kv = general("clip", "mmproj", name, None);
    kv.push(("general.file_type".into(), Value::U32(quant.file_type())));
    kv.push(("clip.has_vision_encoder".into(), Value::Bool(true)));
    kv.push((
        "clip.vision.projection_dim".into(),
        Value::U32(need(&text, &["hidden_size", "n_embd"])?),
    ));
    // LFM2-VL has dynamic resolution; the converter writes 256 here for the loader.
    kv.push(("clip.vision.image_size".into(), Value::U32(256)));
    kv.push((
        "clip.vision.patch_size".into(),
        Value::U32(need(vision, &["patch_size"])?),
    ));
    kv.push((
        "clip.vision.embedding_length".into(),
        Value::U32(need(vision, &["hidden_size", "width"])?),
    ));
    kv.push((
        "clip.vision.feed_forward_length".into(),
        Value::U32(need(vision, &["intermediate_size"])?),
    ));
    let layers = need(vision, &block_keys)?;
    kv.push(("clip.vision.block_count".into(), Value::U32(layers)));
    kv.push((
        "clip.vision.attention.head_count".into(),
        Value::U32(need(
            vision,
            &["num_attention_heads", "num_heads", "heads"],
        )?),
    ));
    kv.push(("clip.vision.image_mean".into(), floats("image_mean")?));
    kv.push(("clip.vision.image_std".into(), floats("image_std")?));
    kv.push(("clip.projector_type".into(), Value::String("lfm2".into())));
    kv.push((
        "clip.vision.attention.layer_norm_epsilon".into(),
        Value::F32(
            f32_of(vision.get("layer_norm_eps"))
                .ok_or_else(|| missing(&config_path, "vision_config.layer_norm_eps"))?,
        ),
    ));
    kv.push((
        "clip.vision.projector.scale_factor".into(),
        Value::U32(u32_of(config.get("downsample_factor")).unwrap_or(2)),
    ));
    kv.push(("clip.use_gelu".into(), Value::Bool(true)));
    // `vision_feature_layer` -1 keeps every layer; -2 drops the last one, and so on.
    let feature_layer = config
        .get("vision_feature_layer")
        .and_then(Json::as_i64)
        .unwrap_or(-1);
    let dropped = u32::try_from(-(feature_layer + 1)).unwrap_or(0);
    set(
        &mut kv,
        "clip.vision.block_count",
        Value::U32(layers.saturating_sub(dropped)),
    );
    kv.push((
        "general.quantization_version".into(),
        Value::U32(QUANTIZATION_VERSION),
    ));
    Ok(kv)
}

/// Overwrites `key` in place (gguf-py's writer keeps the first position of a key set twice).
fn set(kv: &mut Kv, key: &str, value: Value) {
    match kv.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value,
        None => kv.push((key.to_owned(), value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn size_labels_like_gguf_py() {
        assert_eq!(size_label(451_000_000), "451M");
        assert_eq!(size_label(1_170_000_000), "1.2B");
        assert_eq!(size_label(5_300_000), "5.3M");
        assert_eq!(size_label(1_000_000), "1M");
    }

    #[test]
    fn ff_dim_auto_adjust_matches_the_converter() {
        // LFM2-VL-450M: 6656 → int(2 * 6656 / 3) = 4437 → multiple of 256 → 4608.
        let h = text_hparams(&json!({"text_config": {
            "block_ff_dim": 6656, "block_auto_adjust_ff_dim": true,
            "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256}}));
        assert_eq!(lfm2_ff_dim(&h, Path::new("config.json")).unwrap(), 4608);
        let h = text_hparams(&json!({"text_config": {
            "block_ff_dim": 96, "block_auto_adjust_ff_dim": false, "block_multiple_of": 32}}));
        assert_eq!(lfm2_ff_dim(&h, Path::new("config.json")).unwrap(), 96);
    }
}
