//! The model's vocabulary as llguidance sees it: every token id's bytes, the EOS id, canonical
//! tokenisation, and the per-tokenizer `ParserFactory` that all grammars for it share.
//!
//! The token trie spans the *model's* vocabulary (65,536 rows for LFM2-VL), not just the
//! tokenizer's 64,400 entries: ids past the tokenizer get no bytes, so no grammar can ever allow
//! them, and masks have exactly one bit per logit.
//! Special tokens get llguidance's 0xFF marker in front of their text, so plain text grammars never
//! allow them (see llguidance `docs/special_tokens.md`); EOS is allowed only where a grammar may end.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use llguidance::ParserFactory;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};

use crate::decode::error::DecodeError;
use crate::file_error::FileError;

/// How to read a tokenizer for the model it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabConfig {
    /// The token that ends an answer, e.g. `<|im_end|>` for the LFM2-VL chat models.
    pub eos_token: String,
    /// Rows of the model's output layer; `None` uses the tokenizer's size.
    pub model_vocab_size: Option<usize>,
}

impl VocabConfig {
    /// LFM2-VL: `<|im_end|>` ends a turn and the embedding has 65,536 rows.
    pub fn lfm2_vl() -> Self {
        Self {
            eos_token: "<|im_end|>".to_string(),
            model_vocab_size: Some(65_536),
        }
    }
}

/// A tokenizer prepared for grammar compilation; cheap to share behind an `Arc`.
pub struct Vocab {
    env: TokEnv,
    factory: ParserFactory,
    eos: u32,
    tokenizer_size: usize,
    hash: blake3::Hash,
    /// The id whose text is exactly byte `b`, for each `b` (what a forced close searches over).
    byte_tokens: Vec<Option<u32>>,
}

impl std::fmt::Debug for Vocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vocab")
            .field("eos", &self.eos)
            .field("tokenizer_size", &self.tokenizer_size)
            .field("model_vocab_size", &self.model_vocab_size())
            .field("hash", &self.hash.to_hex().to_string())
            .finish()
    }
}

impl Vocab {
    /// Reads a Hugging Face `tokenizer.json` (byte-level BPE or byte-fallback SentencePiece).
    pub fn from_tokenizer_file(path: &Path, cfg: &VocabConfig) -> Result<Self, DecodeError> {
        let bytes = std::fs::read(path)
            .map_err(FileError::read(path))
            .map_err(DecodeError::ReadTokenizer)?;
        Self::from_tokenizer_json(&bytes, cfg).map_err(|e| match e {
            DecodeError::LoadTokenizer { message, .. } => DecodeError::LoadTokenizer {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Like [`Vocab::from_tokenizer_file`] from the file's bytes.
    pub fn from_tokenizer_json(json: &[u8], cfg: &VocabConfig) -> Result<Self, DecodeError> {
        let load_err = |message: String| DecodeError::LoadTokenizer {
            path: "<memory>".into(),
            message,
        };
        let mut tokenizer =
            tokenizers::Tokenizer::from_bytes(json).map_err(|e| load_err(e.to_string()))?;
        // Answers are text: `<image>` written by a model or a label is seven characters, never
        // the special token (which grammars cannot allow), so split special tokens as text.
        tokenizer.set_encode_special_tokens(true);
        let raw: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| load_err(e.to_string()))?;
        let decoding = TokenDecoding::detect(&raw["decoder"])?;

        let mut words: Vec<Vec<u8>> = Vec::new();
        let mut put = |id: u32, bytes: Vec<u8>| {
            let id = id as usize;
            if words.len() <= id {
                words.resize(id + 1, Vec::new());
            }
            words[id] = bytes;
        };
        let byte_of = byte_level_decoder();
        for (name, id) in tokenizer.get_vocab(false) {
            put(id, decoding.token_bytes(&name, &byte_of)?);
        }
        for (id, added) in tokenizer.get_added_tokens_decoder() {
            let mut bytes = added.content.into_bytes();
            if added.special {
                bytes.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
            }
            put(id, bytes);
        }
        let eos = tokenizer
            .token_to_id(&cfg.eos_token)
            .ok_or_else(|| DecodeError::UnknownEos(cfg.eos_token.clone()))?;

        let mut hasher = blake3::Hasher::new();
        hasher.update(b"hf-tokenizer\0");
        hasher.update(json);
        let env = Self::build(
            words,
            eos,
            cfg.model_vocab_size,
            hasher,
            move |bytes, trie| {
                trie.tokenize_with_greedy_fallback(bytes, |s| {
                    // Encoding plain text cannot fail for a tokenizer that loaded; should it, greedy
                    // trie tokenisation is still a valid (if non-canonical) answer for llguidance.
                    tokenizer
                        .encode_fast(s, false)
                        .map(|e| e.get_ids().to_vec())
                        .unwrap_or_else(|_| trie.greedy_tokenize(s.as_bytes()))
                })
            },
        )?;
        Ok(env)
    }

    /// A vocabulary from raw token bytes (id = position), tokenising greedily by longest match.
    /// Meant for toy tokenizers in tests and examples; `eos` must be one of the ids.
    pub fn from_token_bytes(
        tokens: Vec<Vec<u8>>,
        eos: u32,
        model_vocab_size: Option<usize>,
    ) -> Result<Self, DecodeError> {
        if eos as usize >= tokens.len() {
            return Err(DecodeError::UnknownEos(format!("id {eos}")));
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"token-bytes\0");
        for t in &tokens {
            hasher.update(&(t.len() as u64).to_le_bytes());
            hasher.update(t);
        }
        Self::build(tokens, eos, model_vocab_size, hasher, |bytes, trie| {
            trie.greedy_tokenize(bytes)
        })
    }

    fn build(
        mut words: Vec<Vec<u8>>,
        eos: u32,
        model_vocab_size: Option<usize>,
        mut hasher: blake3::Hasher,
        tokenize: impl Fn(&[u8], &TokTrie) -> Vec<u32> + Send + Sync + 'static,
    ) -> Result<Self, DecodeError> {
        let tokenizer_size = words.len();
        let size = model_vocab_size.unwrap_or(tokenizer_size);
        if size < tokenizer_size {
            return Err(DecodeError::VocabTooSmall {
                model: size,
                tokenizer: tokenizer_size,
            });
        }
        let Ok(vocab_size) = u32::try_from(size) else {
            return Err(DecodeError::UnsupportedTokenizer(format!(
                "vocabulary of {size} tokens"
            )));
        };
        // The EOS token is matched by id, never by text; give it the special marker so that no
        // grammar can spell it out, and so that the trie decodes it as special.
        if let Some(w) = words.get_mut(eos as usize)
            && w.first() != Some(&TokTrie::SPECIAL_TOKEN_MARKER)
        {
            w.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
        }
        words.resize(size, Vec::new());
        if let Some((id, _)) = words.iter().enumerate().find(|(_, w)| w.len() > 0xff_ff) {
            return Err(DecodeError::UnsupportedTokenizer(format!(
                "token {id} is longer than 65,535 bytes"
            )));
        }
        hasher.update(&eos.to_le_bytes());
        hasher.update(&(size as u64).to_le_bytes());

        let info = TokRxInfo::new(vocab_size, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(FnTokEnv {
            trie,
            tokenize: Box::new(tokenize),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| {
            DecodeError::UnsupportedTokenizer(format!("llguidance rejected it: {e}"))
        })?;
        factory.quiet();
        let trie = env.tok_trie();
        let byte_tokens = (0..=255u8)
            .map(|b| {
                trie.token_id(&[b])
                    .filter(|&id| id != eos && (id as usize) < tokenizer_size)
            })
            .collect();
        Ok(Self {
            env,
            factory,
            eos,
            tokenizer_size,
            hash: hasher.finalize(),
            byte_tokens,
        })
    }

    /// The end-of-answer token id.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Ids `0..tokenizer_size()` have text; the rest of the model's rows never do.
    pub fn tokenizer_size(&self) -> usize {
        self.tokenizer_size
    }

    /// The length of every mask: rows of the model's output layer.
    pub fn model_vocab_size(&self) -> usize {
        self.env.tok_trie().vocab_size()
    }

    /// Identifies the tokenizer (its file, EOS and model size) in cache keys.
    pub(crate) fn hash(&self) -> blake3::Hash {
        self.hash
    }

    /// The canonical tokenisation of `text`, without special tokens.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.env.tokenize_bytes(text.as_bytes())
    }

    /// The text of `tokens`, leaving out special tokens (EOS among them) and ids without text.
    pub fn decode(&self, tokens: &[u32]) -> String {
        let bytes = self.env.tok_trie().decode_ext(tokens, false);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Whether `id` is a special token (EOS, chat markers, image markers).
    pub fn is_special(&self, id: u32) -> bool {
        (id as usize) < self.tokenizer_size && self.env.tok_trie().is_special_token(id)
    }

    pub(crate) fn factory(&self) -> &ParserFactory {
        &self.factory
    }

    /// For each byte, the id whose text is exactly that byte (`None` where the tokenizer has none).
    pub(crate) fn byte_tokens(&self) -> &[Option<u32>] {
        &self.byte_tokens
    }

    /// The text of one token (a special token's starts with the trie's marker byte).
    pub(crate) fn token_bytes(&self, id: u32) -> &[u8] {
        self.env.tok_trie().token(id)
    }

    /// Longest-match tokenisation of `bytes` (not the tokenizer's own, but one llguidance accepts).
    pub(crate) fn greedy_tokenize(&self, bytes: &[u8]) -> Vec<u32> {
        self.env.tok_trie().greedy_tokenize(bytes)
    }
}

/// A `TokenizerEnv` over a trie and a tokenising closure (the HF tokenizer or greedy matching).
struct FnTokEnv {
    trie: TokTrie,
    #[allow(clippy::type_complexity)]
    tokenize: Box<dyn Fn(&[u8], &TokTrie) -> Vec<u32> + Send + Sync>,
}

impl TokenizerEnv for FnTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        (self.tokenize)(s, &self.trie)
    }
}

/// How a tokenizer's vocabulary strings map to bytes.
enum TokenDecoding {
    /// GPT-2 byte-level BPE: each byte is drawn as one printable character.
    ByteLevel,
    /// SentencePiece with byte fallback: `<0xAB>` is a byte, `space_char` is a space.
    ByteFallback { space_char: char },
}

impl TokenDecoding {
    fn detect(decoder: &serde_json::Value) -> Result<Self, DecodeError> {
        let mut parts = vec![decoder];
        if let Some(list) = decoder["decoders"].as_array() {
            parts.extend(list);
        }
        let types: Vec<&str> = parts.iter().filter_map(|d| d["type"].as_str()).collect();
        if types.contains(&"ByteLevel") {
            return Ok(Self::ByteLevel);
        }
        if types.contains(&"ByteFallback") {
            let space_char = parts
                .iter()
                .filter(|d| {
                    d["type"].as_str() == Some("Replace") && d["content"].as_str() == Some(" ")
                })
                .find_map(|d| {
                    let s = d["pattern"]["String"].as_str()?;
                    let mut chars = s.chars();
                    let c = chars.next()?;
                    chars.next().is_none().then_some(c)
                })
                .unwrap_or('\u{2581}');
            return Ok(Self::ByteFallback { space_char });
        }
        Err(DecodeError::UnsupportedTokenizer(format!(
            "decoder {} is neither byte-level nor byte-fallback",
            types.join("+")
        )))
    }

    fn token_bytes(&self, name: &str, byte_of: &HashMap<char, u8>) -> Result<Vec<u8>, DecodeError> {
        match self {
            Self::ByteLevel => name
                .chars()
                .map(|c| {
                    byte_of.get(&c).copied().ok_or_else(|| {
                        DecodeError::UnsupportedTokenizer(format!(
                            "token `{name}` has character {c:?} outside the byte-level alphabet"
                        ))
                    })
                })
                .collect(),
            Self::ByteFallback { space_char } => {
                if let Some(hex) = name
                    .strip_prefix("<0x")
                    .and_then(|rest| rest.strip_suffix('>'))
                    && hex.len() == 2
                    && let Ok(b) = u8::from_str_radix(hex, 16)
                {
                    return Ok(vec![b]);
                }
                Ok(name.replace(*space_char, " ").into_bytes())
            }
        }
    }
}

/// GPT-2's byte-to-character table, inverted: printable Latin-1 bytes stand for themselves, the
/// other 68 bytes are drawn as U+0100 onwards in byte order.
fn byte_level_decoder() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    let mut map = HashMap::with_capacity(256);
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
            next += 1;
            c
        };
        map.insert(c, b);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_is_a_bijection() {
        let map = byte_level_decoder();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'a'], b'a');
    }

    #[test]
    fn toy_vocab_pads_to_model_size_and_marks_eos() {
        let tokens = vec![b"a".to_vec(), b"b".to_vec(), b"<eos>".to_vec()];
        let v = Vocab::from_token_bytes(tokens, 2, Some(8)).unwrap();
        assert_eq!(v.model_vocab_size(), 8);
        assert_eq!(v.tokenizer_size(), 3);
        assert!(v.is_special(2));
        assert!(!v.is_special(7));
        assert_eq!(v.tokenize("ab"), vec![0, 1]);
        assert_eq!(v.decode(&[0, 1, 2, 7]), "ab");
    }

    #[test]
    fn model_smaller_than_tokenizer_is_an_error() {
        let tokens = vec![b"a".to_vec(), b"b".to_vec()];
        let err = Vocab::from_token_bytes(tokens, 1, Some(1)).unwrap_err();
        assert!(matches!(err, DecodeError::VocabTooSmall { .. }));
    }
}
