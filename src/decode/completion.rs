//! A short way from a grammar state to a complete answer, so that an answer can be closed before
//! its token budget runs out ([`Constraint::limit_tokens`]).
//!
//! llguidance says which tokens may come next, not how far away the end is, so this walks
//! greedily towards an end: at each step it takes the first token, in an order that closes
//! things first (`"`, `}`, `]`, `)`, other punctuation, `0`, `a`, shorter tokens first),
//! whose state is complete or new; where every choice leads back to a kind of state the walk
//! was in before (a state's kind is its mask and forced bytes), the least visited. So a string is
//! closed rather than written, a number gets one digit, an array only its required items, and
//! a recursive rule its way out rather than one more level. The walk uses single-byte tokens
//! (a byte-level or byte-fallback tokenizer has one for every byte) or, where few tokens are
//! allowed (a label list), every allowed token; the bytes are then re-tokenised greedily,
//! longest token first, and kept where that is shorter and the grammar accepts it.
//!
//! Whatever is returned is a real completion, checked against the grammar, so an answer forced
//! along it always ends complete; it is short, not provably the shortest.
//!
//! [`Constraint::limit_tokens`]: crate::decode::Constraint::limit_tokens

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use llguidance::Matcher;
use toktrie::SimpleVob;

use crate::decode::vocab::Vocab;

/// The longest completion the walk builds before giving up (a grammar whose every answer is
/// longer is not one a token budget is meant for).
const MAX_TOKENS: usize = 1024;

/// Masks allowing at most this many tokens are walked token by token, not byte by byte.
const FEW_TOKENS: usize = 256;

/// Whether the answer may end in `m`'s state (EOS allowed, or nothing more possible).
pub(crate) fn may_end(m: &mut Matcher) -> bool {
    m.is_stopped() || m.is_accepting().unwrap_or(false)
}

/// Whether `tokens`, consumed from `m`'s state, complete the answer.
pub(crate) fn completes(m: &Matcher, tokens: &[u32]) -> bool {
    let mut m = m.clone();
    if tokens.is_empty() {
        return may_end(&mut m);
    }
    matches!(m.try_consume_tokens(tokens), Ok(n) if n == tokens.len()) && may_end(&mut m)
}

/// A short token sequence that completes the answer from `start`'s state (empty when it may end
/// already); `None` when the walk found no token to take or reached [`MAX_TOKENS`].
pub(crate) fn shortest_completion(start: &Matcher, vocab: &Vocab) -> Option<Vec<u32>> {
    let mut state = start.clone();
    if may_end(&mut state) {
        return Some(Vec::new());
    }
    let mut mask = state.compute_mask().ok()?;
    let mut visits: HashMap<u64, usize> = HashMap::new();
    let mut path = Vec::new();
    while path.len() < MAX_TOKENS {
        *visits.entry(signature(&mut state, &mask)).or_default() += 1;
        // (times its kind was visited, 0 when complete; state; its mask; token)
        let mut best: Option<(usize, Matcher, Option<SimpleVob>, u32)> = None;
        for id in candidates(&mask, vocab) {
            let mut child = state.clone();
            if !matches!(child.try_consume_tokens(&[id]), Ok(1)) {
                continue;
            }
            let (seen, child_mask) = if may_end(&mut child) {
                (0, None)
            } else {
                let Ok(m) = child.compute_mask() else {
                    continue;
                };
                let seen = visits.get(&signature(&mut child, &m)).copied();
                (1 + seen.unwrap_or(0), Some(m))
            };
            if best.as_ref().is_none_or(|b| seen < b.0) {
                best = Some((seen, child, child_mask, id));
            }
            if seen <= 1 {
                break;
            }
        }
        let (_, child, child_mask, id) = best?;
        path.push(id);
        let Some(child_mask) = child_mask else {
            return Some(compress(start, vocab, path));
        };
        state = child;
        mask = child_mask;
    }
    None
}

/// The tokens worth trying from a state, best first: every allowed one when there are few (a
/// label list, a toy tokenizer without byte tokens), otherwise the allowed single-byte tokens.
fn candidates(mask: &SimpleVob, vocab: &Vocab) -> Vec<u32> {
    let eos = vocab.eos();
    let mut ids: Vec<u32> = if mask.num_set() <= FEW_TOKENS {
        mask.to_list().into_iter().filter(|&id| id != eos).collect()
    } else {
        vocab
            .byte_tokens()
            .iter()
            .flatten()
            .copied()
            .filter(|&id| mask.is_allowed(id))
            .collect()
    };
    ids.sort_by_key(|&id| {
        let bytes = vocab.token_bytes(id);
        (bytes.first().map_or(u8::MAX, |&b| rank(b)), bytes.len(), id)
    });
    ids
}

/// How early a token starting with `b` is tried: what closes first, what opens or pads last.
fn rank(b: u8) -> u8 {
    match b {
        b'"' => 0,
        b'}' | b']' | b')' => 1,
        b'-' | b'+' | b'\\' | b'{' | b'[' | b'(' => 6,
        _ if b.is_ascii_punctuation() => 2,
        b'0' => 3,
        b'a' | b'A' => 4,
        _ if b.is_ascii_alphanumeric() => 5,
        _ => 7,
    }
}

/// The byte path re-tokenised longest-token-first when the grammar accepts that and it is shorter.
fn compress(start: &Matcher, vocab: &Vocab, byte_path: Vec<u32>) -> Vec<u32> {
    let text: Vec<u8> = byte_path
        .iter()
        .flat_map(|&t| vocab.token_bytes(t).iter().copied())
        .collect();
    let greedy = vocab.greedy_tokenize(&text);
    if greedy.len() < byte_path.len() && completes(start, &greedy) {
        greedy
    } else {
        byte_path
    }
}

/// A state's kind: its mask and the bytes it forces next (without those, `…"note":"",` and
/// `…"score":1,` in one object both allow only `"` and would look alike).
fn signature(m: &mut Matcher, mask: &SimpleVob) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    mask.as_slice().hash(&mut h);
    m.compute_ff_bytes().hash(&mut h);
    h.finish()
}
