//! The tokenizer of a text GGUF (`tokenizer.ggml.*`) back as a Hugging Face `tokenizer.json`:
//! the inverse of [`super::tokenizer`] for LFM2's GPT-2-style byte-level BPE.
//!
//! The GGUF holds the token strings by id, their types, the merges and which special tokens are
//! added; LFM2's pre-tokenizer (`tokenizer.ggml.pre = "lfm2"`) is its split regex followed by
//! byte-level mapping, which llama.cpp hard-codes and so does this module. Normal and control
//! tokens go into the BPE vocabulary as stored; user-defined tokens are stored as text (the
//! converter decodes them), so they go back byte-level-encoded into the vocabulary and as
//! added tokens; unused ones (`[PAD{id}]`, the embedding rows past the tokenizer) are left out,
//! as the checkpoint's tokenizer has no such ids.

use serde_json::{Value as Json, json};

use super::read::{GgufIn, GgufReadError};
use super::tokenizer::{TOKEN_CONTROL, TOKEN_UNUSED, TOKEN_USER_DEFINED};

/// LFM2's split pattern (as `tokenizer.json` spells it); see `super::tokenizer::LFM2_SPLIT`.
const LFM2_SPLIT: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/// A text GGUF's tokenizer and the special tokens the chat template and runner need.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// `tokenizer.json` text equivalent to the GGUF's vocabulary.
    pub json: String,
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
    pub eos_id: Option<u32>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl GgufTokenizer {
    /// The `tokenizers` tokenizer of [`Self::json`].
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer, String> {
        self.json.parse().map_err(|e| format!("{e}"))
    }
}

/// GPT-2's byte → printable character map (`bytes_to_unicode`).
fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\0');
            n += 1;
            c
        };
    }
    map
}

/// Reads `tokenizer.ggml.*` of `file` into a tokenizer.
pub fn read_tokenizer(file: &GgufIn) -> Result<GgufTokenizer, GgufReadError> {
    const HINT: &str = "the text GGUF carries its tokenizer; this one was written without it";
    let model =
        file.string_opt("tokenizer.ggml.model")?
            .ok_or_else(|| GgufReadError::MissingKey {
                path: file.path().to_path_buf(),
                key: "tokenizer.ggml.model".into(),
                hint: HINT,
            })?;
    let bad = |key: &str, message: String| GgufReadError::BadKey {
        path: file.path().to_path_buf(),
        key: key.to_owned(),
        message,
    };
    if model != "gpt2" {
        return Err(bad(
            "tokenizer.ggml.model",
            format!("is `{model}`; LFM2's tokenizer is `gpt2` (byte-level BPE)"),
        ));
    }
    let pre = file.string_opt("tokenizer.ggml.pre")?.unwrap_or("default");
    if pre != "lfm2" {
        return Err(bad(
            "tokenizer.ggml.pre",
            format!("is `{pre}`; vlmpipe reads LFM2's pre-tokenizer (`lfm2`) only"),
        ));
    }
    let tokens = file.strings("tokenizer.ggml.tokens", HINT)?;
    let types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
        Some(_) => file.ints("tokenizer.ggml.token_type", HINT)?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(bad(
            "tokenizer.ggml.token_type",
            format!("has {} entries for {} tokens", types.len(), tokens.len()),
        ));
    }
    let merges: Vec<Json> = match file.get("tokenizer.ggml.merges") {
        Some(_) => file
            .strings("tokenizer.ggml.merges", HINT)?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| json!([a, b]))
                    .ok_or_else(|| bad("tokenizer.ggml.merges", format!("has `{m}`, not a pair")))
            })
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };

    let bytes = byte_to_char();
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, (token, ty)) in tokens.iter().zip(&types).enumerate() {
        let ty = *ty as i32;
        if ty == TOKEN_UNUSED {
            continue;
        }
        let key = if ty == TOKEN_USER_DEFINED {
            token.bytes().map(|b| bytes[b as usize]).collect()
        } else {
            (*token).to_owned()
        };
        vocab.entry(key).or_insert(json!(id));
        if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
            let special = ty == TOKEN_CONTROL;
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": !special, "special": special,
            }));
        }
    }

    let special = |key: &str| -> Result<Option<(u32, String)>, GgufReadError> {
        let Some(id) = file.u64_opt(key)? else {
            return Ok(None);
        };
        let token = tokens
            .get(id as usize)
            .ok_or_else(|| bad(key, format!("is {id}, past the {} tokens", tokens.len())))?;
        Ok(Some((id as u32, (*token).to_owned())))
    };
    let bos = special("tokenizer.ggml.bos_token_id")?;
    let eos = special("tokenizer.ggml.eos_token_id")?;
    let pad = special("tokenizer.ggml.padding_token_id")?;
    let unk = special("tokenizer.ggml.unknown_token_id")?;
    let add_bos = file
        .bool_opt("tokenizer.ggml.add_bos_token")
        .unwrap_or(false);
    let add_eos = file
        .bool_opt("tokenizer.ggml.add_eos_token")
        .unwrap_or(false);

    let mut processors = vec![json!({
        "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true
    })];
    let mut single = Vec::new();
    let mut special_tokens = serde_json::Map::new();
    let mut marker = |tok: &(u32, String)| {
        special_tokens.insert(
            tok.1.clone(),
            json!({"id": tok.1, "ids": [tok.0], "tokens": [tok.1]}),
        );
        json!({"SpecialToken": {"id": tok.1, "type_id": 0}})
    };
    let bos_marker = bos.as_ref().filter(|_| add_bos).map(&mut marker);
    let eos_marker = eos.as_ref().filter(|_| add_eos).map(&mut marker);
    if bos_marker.is_some() || eos_marker.is_some() {
        let seq = |id: &str| json!({"Sequence": {"id": id, "type_id": 0}});
        single.extend(bos_marker.clone());
        single.push(seq("A"));
        single.extend(eos_marker.clone());
        let mut pair = single.clone();
        pair.extend(bos_marker);
        pair.push(seq("B"));
        pair.extend(eos_marker);
        processors.push(json!({
            "type": "TemplateProcessing", "single": single, "pair": pair,
            "special_tokens": special_tokens,
        }));
    }

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LFM2_SPLIT}, "behavior": "Isolated",
             "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
             "use_regex": false}
        ]},
        "post_processor": {"type": "Sequence", "processors": processors},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    let out = GgufTokenizer {
        json: tokenizer.to_string(),
        bos: bos.map(|t| t.1),
        eos_id: eos.as_ref().map(|t| t.0),
        eos: eos.map(|t| t.1),
        pad: pad.map(|t| t.1),
        unk: unk.map(|t| t.1),
        chat_template: file
            .string_opt("tokenizer.chat_template")?
            .map(str::to_owned),
    };
    // A tokenizer that does not load is the file's fault: say so here, naming it.
    out.tokenizer().map_err(|e| GgufReadError::Tensor {
        path: file.path().to_path_buf(),
        message: format!("its tokenizer (`tokenizer.ggml.*`) does not load: {e}"),
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_byte_map() {
        let map = byte_to_char();
        assert_eq!(map[b' ' as usize], '\u{120}');
        assert_eq!(map[b'\n' as usize], '\u{10a}');
        assert_eq!(map[b'a' as usize], 'a');
        let distinct: std::collections::HashSet<char> = map.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
