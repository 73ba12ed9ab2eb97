//! Token generation: greedy and sampled decoding over batched, left-padded prompts.
//!
//! Each step takes the last-position logits of every unfinished row, applies the optional
//! [`LogitsProcessor`] mask (the grammar hook), the repetition penalty, then either takes the argmax
//! or samples after temperature, top-p and min-p (transformers' order), and feeds the chosen token
//! back to the hook. Rows stop at an EOS id or after `max_new_tokens`; finished rows keep stepping
//! with their last token so the batch stays rectangular, and their outputs are ignored.
//!
//! Batching does not change answers: rows are left-padded, positions count real tokens only and
//! padding is masked out of attention and conv states (see `text`). Ids are never looked up in a
//! tokenizer here, so a random model may emit ids past the tokenizer's vocabulary.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::model::lfm2_vl::{Lfm2VlModel, LogitsMode};
use crate::rng::SeededRng;

/// What can go wrong while generating.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("no prompts to generate from")]
    NoPrompts,
    #[error("prompt {row} is empty")]
    EmptyPrompt { row: usize },
    #[error("the logits mask left no token allowed for sequence {row} at step {step}")]
    NothingAllowed { row: usize, step: usize },
    #[error("invalid sampling setting `{key}`: {reason}")]
    Sampling { key: &'static str, reason: String },
    #[error("logits processor failed for sequence {row}")]
    Hook {
        row: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Model(#[from] candle_core::Error),
}

/// A set of token ids as a bitset of 32-bit words (the layout of llguidance's `SimpleVob`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSet {
    words: Vec<u32>,
}

impl TokenSet {
    /// Wraps bit words: token `t` is allowed when bit `t % 32` of word `t / 32` is set.
    pub(crate) fn from_words(words: Vec<u32>) -> Self {
        Self { words }
    }

    /// The set of `ids`.
    pub fn from_ids(ids: &[u32]) -> Self {
        let max = ids.iter().copied().max().map_or(0, |m| m as usize + 1);
        let mut words = vec![0u32; max.div_ceil(32)];
        for &id in ids {
            words[id as usize / 32] |= 1 << (id % 32);
        }
        Self { words }
    }

    pub(crate) fn contains(&self, id: u32) -> bool {
        self.words
            .get(id as usize / 32)
            .is_some_and(|w| w & (1 << (id % 32)) != 0)
    }
}

/// A per-step token mask, e.g. a grammar: asked for the allowed set before each sampling step of
/// each row, and told the token that was chosen.
pub trait LogitsProcessor {
    /// Tokens allowed next for sequence `seq`; `None` allows everything.
    fn allowed(
        &mut self,
        seq: usize,
    ) -> Result<Option<TokenSet>, Box<dyn std::error::Error + Send + Sync>>;

    /// The token to take instead of `token`, just chosen for sequence `seq`, or `None` to keep
    /// it (a grammar closing its answer before `max_new_tokens` runs out).
    fn replace(
        &mut self,
        _seq: usize,
        _token: u32,
    ) -> Result<Option<u32>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(None)
    }

    /// Records that `token` was chosen for sequence `seq`.
    fn advance(
        &mut self,
        seq: usize,
        token: u32,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

/// Sampling settings; `temperature <= 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens whose probabilities sum to `top_p`.
    pub top_p: Option<f32>,
    /// Drop tokens less likely than `min_p` times the most likely one.
    pub min_p: Option<f32>,
    /// transformers' repetition penalty over prompt and generated ids (`> 1` discourages).
    pub repetition_penalty: Option<f32>,
    /// Row `i` samples from a generator seeded with `seed + i`, unless its [`Prompt::seed`] says.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: None,
            min_p: None,
            repetition_penalty: None,
            seed: 0,
        }
    }
}

/// Generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    /// Any of these ends a row (included in its output, like transformers).
    pub eos_token_ids: Vec<u32>,
    /// Fills the left padding of shorter prompts.
    pub pad_token_id: u32,
    pub sampling: Sampling,
}

impl GenerateConfig {
    /// Greedy decoding up to 64 tokens.
    pub fn greedy(eos_token_ids: Vec<u32>) -> Self {
        Self {
            max_new_tokens: 64,
            eos_token_ids,
            pad_token_id: 0,
            sampling: Sampling::default(),
        }
    }
}

/// One prompt: token ids (with `<image>` placeholders) and its image features, if any.
#[derive(Debug, Clone, Copy)]
pub struct Prompt<'a> {
    pub input_ids: &'a [u32],
    /// `[image tokens, D]`, one row per `<image>` id in `input_ids`.
    pub image_features: Option<&'a Tensor>,
    /// This row's sampling seed, so a sampled answer depends on the prompt alone, not on its
    /// place in a batch; `None`: [`Sampling::seed`] plus the row's index.
    pub seed: Option<u64>,
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Length,
}

/// The generated ids of one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// Generated ids only, the EOS id included when it ended the row.
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub sequences: Vec<Sequence>,
    /// `[B, vocab]` logits of each prompt's last position, before any mask or sampling setting
    /// (what `vlmpipe infer --dump-logits` writes).
    pub prompt_logits: Tensor,
    /// Time of the prompt forward (embedding splice, decoder, first logits).
    pub prefill: Duration,
    /// Time of each later decoder step.
    pub step_times: Vec<Duration>,
}

/// Generates from a batch of prompts.
pub fn generate(
    model: &Lfm2VlModel,
    prompts: &[Prompt<'_>],
    cfg: &GenerateConfig,
    mut hook: Option<&mut dyn LogitsProcessor>,
) -> Result<GenerateOutput, GenerateError> {
    validate(prompts, &cfg.sampling)?;
    let dev = model.device();
    let b = prompts.len();
    let max_len = prompts.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
    let padded = prompts.iter().any(|p| p.input_ids.len() != max_len);

    // Left padding: [B, L] ids and mask.
    let mut ids = Vec::with_capacity(b * max_len);
    let mut mask = Vec::with_capacity(b * max_len);
    for p in prompts {
        let pad = max_len - p.input_ids.len();
        ids.extend(std::iter::repeat_n(cfg.pad_token_id, pad));
        ids.extend_from_slice(p.input_ids);
        mask.extend(std::iter::repeat_n(0u32, pad));
        mask.extend(std::iter::repeat_n(1u32, p.input_ids.len()));
    }
    let ids = Tensor::from_vec(ids, (b, max_len), dev)?;
    let mask = Tensor::from_vec(mask, (b, max_len), dev)?;
    let features: Vec<&Tensor> = prompts.iter().filter_map(|p| p.image_features).collect();
    let features = match features.len() {
        0 => None,
        1 => Some(features[0].clone()),
        _ => Some(Tensor::cat(&features, 0)?),
    };

    let mut history: Vec<Vec<u32>> = prompts.iter().map(|p| p.input_ids.to_vec()).collect();
    let mut rngs: Vec<SeededRng> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let seed = p
                .seed
                .unwrap_or_else(|| cfg.sampling.seed.wrapping_add(i as u64));
            SeededRng::new(seed)
        })
        .collect();
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut finished: Vec<Option<FinishReason>> = vec![None; b];

    let start = Instant::now();
    let mut cache = model.new_cache(b);
    let mut logits = model.forward(
        &ids,
        features.as_ref(),
        padded.then_some(&mask),
        &mut cache,
        LogitsMode::Last,
    )?;
    // GPU kernels run asynchronously; wait, so the times are the work's and not its launch's.
    dev.synchronize()?;
    let prefill = start.elapsed();
    let prompt_logits = logits.clone();
    let mut step_times = Vec::new();

    for step in 0..cfg.max_new_tokens {
        let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(b);
        for (row, mut scores) in rows.into_iter().enumerate() {
            if finished[row].is_some() {
                next.push(outputs[row].last().copied().unwrap_or(cfg.pad_token_id));
                continue;
            }
            if let Some(h) = hook.as_deref_mut() {
                let allowed = h
                    .allowed(row)
                    .map_err(|source| GenerateError::Hook { row, source })?;
                if let Some(set) = allowed {
                    apply_mask(&mut scores, &set);
                }
            }
            if let Some(p) = cfg.sampling.repetition_penalty {
                apply_repetition_penalty(&mut scores, &history[row], p);
            }
            let mut token = choose(&mut scores, &cfg.sampling, &mut rngs[row])
                .ok_or(GenerateError::NothingAllowed { row, step })?;
            if let Some(h) = hook.as_deref_mut() {
                let replaced = h
                    .replace(row, token)
                    .map_err(|source| GenerateError::Hook { row, source })?;
                token = replaced.unwrap_or(token);
                h.advance(row, token)
                    .map_err(|source| GenerateError::Hook { row, source })?;
            }
            outputs[row].push(token);
            history[row].push(token);
            if cfg.eos_token_ids.contains(&token) {
                finished[row] = Some(FinishReason::Eos);
            } else if outputs[row].len() >= cfg.max_new_tokens {
                finished[row] = Some(FinishReason::Length);
            }
            next.push(token);
        }
        if finished.iter().all(Option::is_some) {
            break;
        }
        let t = Instant::now();
        let input = Tensor::from_vec(next, (b, 1), dev)?;
        logits = model.forward_generated(&input, &mut cache, LogitsMode::Last)?;
        dev.synchronize()?;
        step_times.push(t.elapsed());
    }

    let sequences = outputs
        .into_iter()
        .zip(finished)
        .map(|(tokens, finish)| Sequence {
            tokens,
            finish: finish.unwrap_or(FinishReason::Length),
        })
        .collect();
    Ok(GenerateOutput {
        sequences,
        prompt_logits,
        prefill,
        step_times,
    })
}

fn validate(prompts: &[Prompt<'_>], s: &Sampling) -> Result<(), GenerateError> {
    if prompts.is_empty() {
        return Err(GenerateError::NoPrompts);
    }
    if let Some(row) = prompts.iter().position(|p| p.input_ids.is_empty()) {
        return Err(GenerateError::EmptyPrompt { row });
    }
    let bad = |key, reason: &str| {
        Err(GenerateError::Sampling {
            key,
            reason: reason.to_string(),
        })
    };
    if !s.temperature.is_finite() {
        return bad("temperature", "must be a finite number");
    }
    if let Some(p) = s.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return bad("top_p", "must be in (0, 1]");
    }
    if let Some(p) = s.min_p
        && !(0.0..=1.0).contains(&p)
    {
        return bad("min_p", "must be in [0, 1]");
    }
    if let Some(p) = s.repetition_penalty
        && !(p > 0.0 && p.is_finite())
    {
        return bad("repetition_penalty", "must be a positive number");
    }
    Ok(())
}

/// Sets every score outside `set` to -inf.
pub(crate) fn apply_mask(scores: &mut [f32], set: &TokenSet) {
    for (id, s) in scores.iter_mut().enumerate() {
        if !set.contains(id as u32) {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: divide positive, multiply negative scores.
pub(crate) fn apply_repetition_penalty(scores: &mut [f32], seen: &[u32], penalty: f32) {
    let mut done = vec![false; scores.len()];
    for &id in seen {
        let i = id as usize;
        if i < scores.len() && !done[i] {
            done[i] = true;
            let s = scores[i];
            scores[i] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// Index of the largest finite score (the first on ties, like `torch.argmax`).
pub(crate) fn argmax(scores: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &s) in scores.iter().enumerate() {
        if s > f32::NEG_INFINITY && best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i as u32)
}

/// Picks the next token; `None` when every score is -inf.
fn choose(scores: &mut [f32], s: &Sampling, rng: &mut SeededRng) -> Option<u32> {
    if s.temperature <= 0.0 {
        return argmax(scores);
    }
    argmax(scores)?;
    // Temperature, then probabilities over the candidates (sorted, most likely first).
    let t = s.temperature;
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = scores
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| (i as u32, (((v - max) / t) as f64).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    normalise(&mut probs);
    if let Some(top_p) = s.top_p.filter(|&p| p < 1.0) {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|&(_, p)| {
                mass += p;
                mass >= top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep.max(1));
        normalise(&mut probs);
    }
    if let Some(min_p) = s.min_p.filter(|&p| p > 0.0) {
        let threshold = probs.first().map_or(0.0, |&(_, p)| p) * min_p as f64;
        let keep = probs.iter().take_while(|&&(_, p)| p >= threshold).count();
        probs.truncate(keep.max(1));
        normalise(&mut probs);
    }
    let u = rng.uniform_f64();
    let mut acc = 0.0;
    for &(id, p) in &probs {
        acc += p;
        if u < acc {
            return Some(id);
        }
    }
    probs.last().map(|&(id, _)| id)
}

fn normalise(probs: &mut [(u32, f64)]) {
    let total: f64 = probs.iter().map(|&(_, p)| p).sum();
    if total > 0.0 {
        probs.iter_mut().for_each(|(_, p)| *p /= total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_set_membership() {
        let set = TokenSet::from_ids(&[3, 40, 1000]);
        assert!(set.contains(3) && set.contains(40) && set.contains(1000));
        assert!(!set.contains(4) && !set.contains(5000));
    }

    #[test]
    fn repetition_penalty_matches_transformers() {
        let mut s = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut s, &[0, 1, 1], 2.0);
        assert_eq!(s, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn argmax_takes_first_of_ties_and_skips_masked() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), None);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_p() {
        let s = Sampling {
            temperature: 1.0,
            top_p: Some(0.5),
            seed: 7,
            ..Sampling::default()
        };
        // Token 2 alone holds ~0.84 of the mass, so top_p = 0.5 leaves only it.
        let scores = vec![0.0f32, 1.0, 3.0];
        let mut rng = SeededRng::new(s.seed);
        for _ in 0..20 {
            assert_eq!(choose(&mut scores.clone(), &s, &mut rng), Some(2));
        }
        let wide = Sampling {
            top_p: None,
            ..s.clone()
        };
        let draw = |seed| {
            let mut rng = SeededRng::new(seed);
            (0..50)
                .map(|_| choose(&mut scores.clone(), &wide, &mut rng).unwrap_or(99))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert!(
            draw(1).iter().any(|&t| t != 2),
            "sampling never left the top token"
        );
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let s = Sampling {
            temperature: 1.0,
            min_p: Some(0.5),
            ..Sampling::default()
        };
        // p ~ [0.04, 0.11, 0.84]: only token 2 is within half of the top probability.
        let mut rng = SeededRng::new(0);
        for _ in 0..20 {
            assert_eq!(choose(&mut [0.0f32, 1.0, 3.0], &s, &mut rng), Some(2));
        }
    }
}
