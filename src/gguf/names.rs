//! Checkpoint tensor names → llama.cpp's GGUF tensor names, for the `lfm2` text model and the
//! LFM2-VL mmproj (SigLIP2 vision tower + the LFM2 projector), as `convert_hf_to_gguf.py`
//! (`LFM2Model`, `LFM2VLModel`, gguf-py's `tensor_mapping.py`) maps them.

/// Which of the two files a checkpoint tensor goes to, under which name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Text(String),
    Mmproj(String),
}

/// Where `hf_name` goes, or `None` for a tensor llama.cpp has no slot for (the caller reports
/// it: nothing of the checkpoint is dropped silently).
///
/// Accepts both the transformers ≥ 4.55 layout (`model.language_model.…`,
/// `model.vision_tower.…`, `model.multi_modal_projector.…`) and the older one
/// (`model.language_model` without the leading `model.`, `vision_tower.…`).
pub(crate) fn map_name(hf_name: &str) -> Option<Target> {
    let (stem, suffix) = split_suffix(hf_name)?;
    if stem == "lm_head" {
        return Some(Target::Text(format!("output{suffix}")));
    }
    if let Some(rest) = strip_any(stem, &["model.language_model.", "language_model.model."]) {
        return text_name(rest).map(|n| Target::Text(format!("{n}{suffix}")));
    }
    if let Some(rest) = strip_any(stem, &["model.vision_tower.", "vision_tower."]) {
        return vision_name(rest).map(|n| Target::Mmproj(format!("{n}{suffix}")));
    }
    if let Some(rest) = strip_any(
        stem,
        &["model.multi_modal_projector.", "multi_modal_projector."],
    ) {
        let name = match rest {
            "layer_norm" => "mm.input_norm".to_owned(),
            "linear_1" => "mm.1".to_owned(),
            "linear_2" => "mm.2".to_owned(),
            _ => return None,
        };
        return Some(Target::Mmproj(format!("{name}{suffix}")));
    }
    None
}

fn split_suffix(name: &str) -> Option<(&str, &'static str)> {
    if let Some(stem) = name.strip_suffix(".weight") {
        Some((stem, ".weight"))
    } else {
        name.strip_suffix(".bias").map(|stem| (stem, ".bias"))
    }
}

fn strip_any<'a>(name: &'a str, prefixes: &[&str]) -> Option<&'a str> {
    prefixes.iter().find_map(|p| name.strip_prefix(p))
}

/// `layers.{i}.rest` → `(i, rest)`.
fn layer(name: &str, prefix: &str) -> Option<(usize, String)> {
    let rest = name.strip_prefix(prefix)?;
    let (index, rest) = rest.split_once('.')?;
    Some((index.parse().ok()?, rest.to_owned()))
}

fn text_name(rest: &str) -> Option<String> {
    match rest {
        "embed_tokens" => return Some("token_embd".into()),
        // LFM2 applies this norm after the last block; llama.cpp keeps the checkpoint's name.
        "embedding_norm" => return Some("token_embd_norm".into()),
        "lm_head" => return Some("output".into()),
        _ => {}
    }
    let (i, part) = layer(rest, "layers.")?;
    let tail = match part.as_str() {
        "operator_norm" => "attn_norm",
        "ffn_norm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.out_proj" => "attn_output",
        "self_attn.q_layernorm" => "attn_q_norm",
        "self_attn.k_layernorm" => "attn_k_norm",
        "conv.conv" => "shortconv.conv",
        "conv.in_proj" => "shortconv.in_proj",
        "conv.out_proj" => "shortconv.out_proj",
        "feed_forward.w1" => "ffn_gate",
        "feed_forward.w3" => "ffn_up",
        "feed_forward.w2" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{i}.{tail}"))
}

fn vision_name(rest: &str) -> Option<String> {
    let rest = rest.strip_prefix("vision_model.").unwrap_or(rest);
    match rest {
        "embeddings.patch_embedding" => return Some("v.patch_embd".into()),
        "embeddings.position_embedding" => return Some("v.position_embd".into()),
        "post_layernorm" => return Some("v.post_ln".into()),
        _ => {}
    }
    let (i, part) = layer(rest, "encoder.layers.")?;
    let tail = match part.as_str() {
        "layer_norm1" => "ln1",
        "layer_norm2" => "ln2",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.out_proj" => "attn_out",
        "mlp.fc1" => "ffn_up",
        "mlp.fc2" => "ffn_down",
        _ => return None,
    };
    Some(format!("v.blk.{i}.{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Option<Target> {
        Some(Target::Text(s.to_owned()))
    }
    fn mm(s: &str) -> Option<Target> {
        Some(Target::Mmproj(s.to_owned()))
    }

    #[test]
    fn text_names() {
        assert_eq!(
            map_name("model.language_model.embed_tokens.weight"),
            text("token_embd.weight")
        );
        assert_eq!(
            map_name("model.language_model.embedding_norm.weight"),
            text("token_embd_norm.weight")
        );
        assert_eq!(
            map_name("model.language_model.layers.12.conv.conv.weight"),
            text("blk.12.shortconv.conv.weight")
        );
        assert_eq!(
            map_name("model.language_model.layers.2.self_attn.out_proj.weight"),
            text("blk.2.attn_output.weight")
        );
        assert_eq!(
            map_name("model.language_model.layers.0.feed_forward.w1.weight"),
            text("blk.0.ffn_gate.weight")
        );
        // The older transformers layout.
        assert_eq!(
            map_name("language_model.model.layers.3.operator_norm.weight"),
            text("blk.3.attn_norm.weight")
        );
    }

    #[test]
    fn vision_and_projector_names() {
        assert_eq!(
            map_name("model.vision_tower.vision_model.embeddings.patch_embedding.bias"),
            mm("v.patch_embd.bias")
        );
        assert_eq!(
            map_name("model.vision_tower.vision_model.encoder.layers.11.mlp.fc2.weight"),
            mm("v.blk.11.ffn_down.weight")
        );
        assert_eq!(
            map_name("vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.bias"),
            mm("v.blk.0.attn_out.bias")
        );
        assert_eq!(
            map_name("model.multi_modal_projector.linear_2.weight"),
            mm("mm.2.weight")
        );
        assert_eq!(
            map_name("model.multi_modal_projector.layer_norm.bias"),
            mm("mm.input_norm.bias")
        );
    }

    #[test]
    fn unknown_names_are_none() {
        assert_eq!(
            map_name("model.language_model.layers.0.mystery.weight"),
            None
        );
        assert_eq!(
            map_name("model.vision_tower.vision_model.head.weight"),
            None
        );
        assert_eq!(map_name("lm_head.scale"), None);
    }
}
