//! `tokenizer.ggml.*` for the text GGUF: the GPT-2-style BPE vocabulary llama.cpp's converter
//! writes for LFM2 (`TextModel._set_vocab_gpt2`: `get_vocab_base` + gguf-py's `SpecialVocab`),
//! ported for the files an LFM2 checkpoint carries (`tokenizer.json`, `tokenizer_config.json`,
//! `chat_template.jinja`, `config.json`).

use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::GgufError;

/// gguf-py's `TokenType`.
pub(crate) const TOKEN_NORMAL: i32 = 1;
pub(crate) const TOKEN_CONTROL: i32 = 3;
pub(crate) const TOKEN_USER_DEFINED: i32 = 4;
pub(crate) const TOKEN_UNUSED: i32 = 5;

/// The text the converter encodes and hashes to recognise a BPE pre-tokenizer
/// (`get_vocab_base_pre`'s `chktxt`).
const CHKTXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u{200d}🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// The hashes of [`CHKTXT`]'s token ids that llama.cpp's converter maps to the `lfm2`
/// pre-tokenizer (LiquidAI/LFM2.5-350M, LiquidAI/LFM2.5-8B-A1B).
const LFM2_HASHES: [&str; 2] = [
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51",
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7",
];

/// LFM2's pre-tokenizer split pattern; a tokenizer whose hash is not listed (a trimmed test
/// vocabulary) but that splits like this is still `lfm2` to llama.cpp's tokenizer.
const LFM2_SPLIT: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/// Everything `tokenizer.ggml.*` holds, in the converter's order.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    pub pre: String,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    /// `(bos|eos|unk|sep|pad|cls|mask, id)` in the order `SpecialVocab` finds them.
    pub special_ids: Vec<(&'static str, u32)>,
    /// `(bos|eos|sep|…, add?)`.
    pub add_special: Vec<(&'static str, bool)>,
    pub chat_template: Option<String>,
}

const SPECIAL_TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

fn read_json(path: &Path) -> Result<Option<Value>, GgufError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| GgufError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| GgufError::Input {
            path: path.to_path_buf(),
            message: format!("is not valid JSON: {e}"),
        })
}

/// Reads the vocabulary of the checkpoint in `dir`; `vocab_size` is the text config's (the
/// embedding rows), which may exceed the tokenizer's (the rest become `[PAD{i}]`).
pub fn read_vocab(dir: &Path, vocab_size: usize) -> Result<GgufVocab, GgufError> {
    let tok_path = dir.join("tokenizer.json");
    let Some(tok_json) = read_json(&tok_path)? else {
        return Err(GgufError::Input {
            path: tok_path,
            message: "is missing; the text GGUF needs the tokenizer".into(),
        });
    };
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| GgufError::Input {
        path: tok_path.clone(),
        message: format!("cannot be loaded: {e}"),
    })?;
    let bad = |message: String| GgufError::Input {
        path: tok_path.clone(),
        message,
    };

    // id → token, the base vocabulary and the added tokens (`tokenizer.vocab` in transformers).
    let mut by_id: Vec<Option<String>> = vec![None; vocab_size];
    let vocab = tok_json["model"]["vocab"]
        .as_object()
        .ok_or_else(|| bad("has no `model.vocab` map (not a BPE tokenizer)".into()))?;
    let mut put = |token: &str, id: u64| -> Result<(), GgufError> {
        let slot = by_id.get_mut(id as usize).ok_or_else(|| GgufError::Input {
            path: tok_path.clone(),
            message: format!(
                "token `{token}` has id {id}, beyond the model's vocab_size {vocab_size}"
            ),
        })?;
        *slot = Some(token.to_owned());
        Ok(())
    };
    for (token, id) in vocab {
        put(token, id.as_u64().unwrap_or(u64::MAX))?;
    }
    struct Added {
        id: u64,
        content: String,
        special: bool,
        normalized: bool,
    }
    let added: Vec<Added> = tok_json["added_tokens"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|t| {
            Some(Added {
                id: t["id"].as_u64()?,
                content: t["content"].as_str()?.to_owned(),
                special: t["special"].as_bool().unwrap_or(false),
                normalized: t["normalized"].as_bool().unwrap_or(false),
            })
        })
        .collect();
    for a in &added {
        put(&a.content, a.id)?;
    }

    let mut tokens = Vec::with_capacity(vocab_size);
    let mut token_types = Vec::with_capacity(vocab_size);
    for (i, token) in by_id.into_iter().enumerate() {
        let Some(mut token) = token else {
            tokens.push(format!("[PAD{i}]"));
            token_types.push(TOKEN_UNUSED);
            continue;
        };
        let ty = match added.iter().find(|a| a.content == token) {
            None => TOKEN_NORMAL,
            Some(a) => {
                // llama.cpp expects added tokens pre-normalized: the converter round-trips the
                // ones the tokenizer does not normalize through encode + decode.
                if !a.normalized {
                    let ids = tokenizer
                        .encode(token.as_str(), false)
                        .map_err(|e| bad(format!("cannot encode `{token}`: {e}")))?;
                    token = tokenizer
                        .decode(ids.get_ids(), false)
                        .map_err(|e| bad(format!("cannot decode `{token}`: {e}")))?;
                }
                if a.special || looks_special(&token) {
                    TOKEN_CONTROL
                } else {
                    token = token.replace('\u{2581}', " ");
                    TOKEN_USER_DEFINED
                }
            }
        };
        tokens.push(token);
        token_types.push(ty);
    }

    let added_by_content: Vec<(String, u64)> =
        added.iter().map(|a| (a.content.clone(), a.id)).collect();
    let pre = pre_tokenizer(&tokenizer, &tok_json).map_err(bad)?;
    let merges = merges(&tok_json).map_err(bad)?;
    let (special_ids, add_special, chat_template) =
        special_vocab(dir, &tok_json, &added_by_content, vocab_size)?;
    Ok(GgufVocab {
        pre,
        tokens,
        token_types,
        merges,
        special_ids,
        add_special,
        chat_template,
    })
}

/// `TextModel.does_token_look_special`.
fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<｜") && token.ends_with("｜>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// `tokenizer.ggml.pre`: the converter's hash of [`CHKTXT`]'s ids (`str(list)` of Python), and
/// for a vocabulary it does not list, the LFM2 split pattern itself.
fn pre_tokenizer(tokenizer: &tokenizers::Tokenizer, json: &Value) -> Result<String, String> {
    let ids = tokenizer
        .encode(CHKTXT, true)
        .map_err(|e| format!("cannot encode the pre-tokenizer check text: {e}"))?;
    let listed = format!(
        "[{}]",
        ids.get_ids()
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let hash = format!("{:x}", Sha256::digest(listed.as_bytes()));
    if LFM2_HASHES.contains(&hash.as_str()) {
        return Ok("lfm2".into());
    }
    let splits_like_lfm2 = json["pre_tokenizer"]["pretokenizers"]
        .as_array()
        .is_some_and(|ps| {
            ps.iter()
                .any(|p| p["type"] == "Split" && p["pattern"]["Regex"] == LFM2_SPLIT)
        });
    if splits_like_lfm2 {
        return Ok("lfm2".into());
    }
    Err(format!(
        "has a pre-tokenizer llama.cpp does not know as LFM2's (check hash {hash}); only LFM2 \
         tokenizers can be exported"
    ))
}

/// `tokenizer.ggml.merges`: pairs joined by a space, spaces inside a part as U+0120 (gguf-py's
/// encoding of the list-of-pairs format).
fn merges(json: &Value) -> Result<Vec<String>, String> {
    let Some(list) = json["model"]["merges"].as_array() else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(pair) if pair.len() == 2 => {
                let part = |v: &Value| -> Result<String, String> {
                    let s = v.as_str().ok_or("a merge part is not a string")?;
                    Ok(s.chars()
                        .map(|c| if c == ' ' { '\u{120}' } else { c })
                        .collect())
                };
                Ok(format!("{} {}", part(&pair[0])?, part(&pair[1])?))
            }
            other => Err(format!("has a merge of unknown form: {other}")),
        })
        .collect()
}

type SpecialVocab = (
    Vec<(&'static str, u32)>,
    Vec<(&'static str, bool)>,
    Option<String>,
);

/// gguf-py's `SpecialVocab` for the parts an LFM2 checkpoint uses: the post-processor's
/// `ByteLevel` / `TemplateProcessing` (whether BOS/EOS/SEP are added), `tokenizer_config.json`'s
/// `*_token` and `add_*_token`, the chat template, then `config.json`'s `*_token_id`.
fn special_vocab(
    dir: &Path,
    tok_json: &Value,
    added: &[(String, u64)],
    vocab_size: usize,
) -> Result<SpecialVocab, GgufError> {
    let mut ids: Vec<(&'static str, u32)> = Vec::new();
    let mut add: Vec<(&'static str, bool)> = Vec::new();
    let set_add =
        |add: &mut Vec<(&'static str, bool)>, typ: &'static str, v: bool, force: bool| match add
            .iter_mut()
            .find(|(t, _)| *t == typ)
        {
            Some(slot) if force => slot.1 = v,
            Some(_) => {}
            None => add.push((typ, v)),
        };
    let config = read_json(&dir.join("tokenizer_config.json"))?;
    let token_of = |typ: &str| -> Option<String> {
        let entry = config.as_ref()?.get(format!("{typ}_token"))?;
        match entry {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
            _ => None,
        }
    };
    let special_bos = token_of("bos");
    let special_eos = token_of("eos");
    let processors: Vec<&Value> = match &tok_json["post_processor"] {
        Value::Null => Vec::new(),
        p => p["processors"]
            .as_array()
            .map_or_else(|| vec![p], |ps| ps.iter().collect()),
    };
    for p in processors {
        match p["type"].as_str() {
            Some("ByteLevel") => {
                set_add(&mut add, "bos", false, false);
                set_add(&mut add, "eos", false, false);
            }
            Some("TemplateProcessing") => {
                let single = p["single"].as_array().cloned().unwrap_or_default();
                let special = |v: &Value| v["SpecialToken"]["id"].as_str().map(str::to_owned);
                let mut first = None;
                let mut last = None;
                if single.len() > 1 {
                    first = special(&single[0]);
                    if let Some(f) = &first {
                        set_add(&mut add, "bos", Some(f) == special_bos.as_ref(), true);
                    }
                    last = special(&single[single.len() - 1]);
                    if let Some(l) = &last {
                        set_add(&mut add, "eos", Some(l) == special_eos.as_ref(), true);
                    }
                }
                // `A [sep] B` in the pair template: is a separator added between sequences?
                let mut pair = p["pair"].as_array().cloned().unwrap_or_default();
                if !pair.is_empty() {
                    if first.is_some() && special(&pair[0]) == first {
                        pair.remove(0);
                    }
                    if last.is_some() && pair.last().and_then(special) == last {
                        pair.pop();
                    }
                    let seq = |v: &Value| v["Sequence"]["id"].as_str().map(str::to_owned);
                    if pair.len() > 2
                        && seq(&pair[0]).as_deref() == Some("A")
                        && seq(&pair[pair.len() - 1]).as_deref() == Some("B")
                    {
                        let middle = &pair[1..pair.len() - 1];
                        let is_sep = |v: &Value| {
                            special(v).is_some_and(|s| {
                                Some(&s) == special_eos.as_ref()
                                    || Some(&s) == token_of("sep").as_ref()
                            })
                        };
                        let add_sep = (is_sep(&middle[0]) && last.is_none())
                            || (middle.len() == 2 && is_sep(&middle[1]));
                        set_add(&mut add, "sep", add_sep, true);
                    }
                }
            }
            _ => {}
        }
    }
    let mut chat_template = None;
    if let Some(config) = &config {
        let jinja = dir.join("chat_template.jinja");
        let alt = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| GgufError::io(&jinja, e))?)
        } else {
            None
        };
        chat_template = config["chat_template"].as_str().map(str::to_owned).or(alt);
        for typ in SPECIAL_TYPES {
            if let Some(v) = config
                .get(format!("add_{typ}_token"))
                .and_then(Value::as_bool)
            {
                set_add(&mut add, typ, v, false);
            }
            if let Some(content) = token_of(typ)
                && let Some((_, id)) = added.iter().find(|(c, _)| *c == content)
                && (*id as usize) < vocab_size
                && !ids.iter().any(|(t, _)| *t == typ)
            {
                ids.push((typ, *id as u32));
            }
        }
    }
    if let Some(model_config) = read_json(&dir.join("config.json"))? {
        for typ in SPECIAL_TYPES {
            let key = format!("{typ}_token_id");
            let id = model_config
                .get(&key)
                .filter(|v| !v.is_null())
                .or_else(|| model_config["text_config"].get(&key))
                .and_then(Value::as_u64);
            if let Some(id) = id
                && (id as usize) < vocab_size
                && !ids.iter().any(|(t, _)| *t == typ)
            {
                ids.push((typ, id as u32));
            }
        }
    }
    Ok((ids, add, chat_template))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_join_pairs_and_encode_inner_spaces() {
        let json = serde_json::json!({"model": {"merges": [["Ġ", "a"], ["a b", "c"]]}});
        assert_eq!(merges(&json).unwrap(), ["Ġ a", "a\u{120}b c"]);
        let json = serde_json::json!({"model": {"merges": ["x y"]}});
        assert_eq!(merges(&json).unwrap(), ["x y"]);
    }

    #[test]
    fn special_looking_tokens() {
        assert!(looks_special("<|im_start|>"));
        assert!(looks_special("<unused3>"));
        assert!(!looks_special("<image>"));
    }
}
