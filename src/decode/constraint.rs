//! The per-sequence side of a grammar: which tokens may come next ([`TokenMask`]) and what was
//! chosen ([`Constraint::commit`]).
//!
//! The model's generation loop asks [`Constraint::allowed_tokens`] before each step, sets every
//! logit outside the mask to -inf, picks a token and commits it. When the answer is complete and
//! nothing may follow, the mask holds EOS alone (forced EOS); once EOS is committed the sequence is
//! finished.
//!
//! With a token budget ([`Constraint::limit_tokens`]) the constraint also keeps a way to finish
//! the answer within the tokens left (see `completion`): when the shortest completion found takes
//! every token left, the mask holds only its next token, and [`Constraint::budget_override`]
//! replaces a chosen token after which no completion fits by that token. So an answer cut by the
//! budget still parses, and a budget too small for any answer is refused before generating.
//!
//! A mask takes microseconds against a model step of tens of milliseconds, so the loop may simply
//! compute it inline; llguidance's advice to overlap it with the GPU step only matters for much
//! larger grammars. The first mask comes precomputed from compilation; the first real mask of a
//! grammar builds lexer states lazily (milliseconds, once, shared by every later sequence).

use std::sync::Arc;

use llguidance::Matcher;
use toktrie::SimpleVob;

use crate::decode::compiled::CompiledGrammar;
use crate::decode::completion::{completes, may_end, shortest_completion};
use crate::decode::error::DecodeError;
use crate::decode::vocab::Vocab;

/// A set of token ids over the model's whole vocabulary, as 32-bit words: token `t` is allowed when
/// bit `t % 32` of word `t / 32` is set (llguidance's `SimpleVob` layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u32>,
    len: usize,
}

impl TokenMask {
    /// Copies llguidance's set, sized to the model vocabulary, keeping only ids with text and EOS.
    pub(crate) fn from_vob(vob: &SimpleVob, vocab: &Vocab) -> Self {
        let len = vocab.model_vocab_size();
        let n_words = len.div_ceil(32);
        let mut words = vec![0u32; n_words];
        let src = vob.as_slice();
        let n = n_words.min(src.len());
        words[..n].copy_from_slice(&src[..n]);
        // Ids past the tokenizer have no bytes so llguidance never sets them; clearing them here
        // keeps that promise even for a grammar or a toktrie that would.
        let limit = vocab.tokenizer_size();
        if limit < len {
            let mut start = limit / 32;
            if !limit.is_multiple_of(32) {
                words[start] &= (1u32 << (limit % 32)) - 1;
                start += 1;
            }
            words[start..].fill(0);
        }
        Self { words, len }
    }

    /// Only `id` is allowed.
    pub(crate) fn singleton(id: u32, len: usize) -> Self {
        let mut words = vec![0u32; len.div_ceil(32)];
        if (id as usize) < len {
            words[id as usize / 32] |= 1 << (id % 32);
        }
        Self { words, len }
    }

    pub fn is_allowed(&self, id: u32) -> bool {
        (id as usize) < self.len && self.words[id as usize / 32] & (1 << (id % 32)) != 0
    }

    /// Number of allowed ids.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Number of ids covered (the model's vocabulary size).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The allowed ids in increasing order.
    pub fn allowed(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some(i as u32 * 32 + bit)
            })
        })
    }

    /// The bit words by value, e.g. for `TokenSet::from_words` without a copy.
    pub(crate) fn into_words(self) -> Vec<u32> {
        self.words
    }

    /// Sets the logits of disallowed ids to -inf (logits beyond the mask's length too).
    pub fn apply_to_logits(&self, logits: &mut [f32]) {
        for (chunk_idx, chunk) in logits.chunks_mut(32).enumerate() {
            let w = self.words.get(chunk_idx).copied().unwrap_or(0);
            // Most words of a grammar mask are all-disallowed; fill those without bit tests.
            if w == 0 {
                chunk.fill(f32::NEG_INFINITY);
                continue;
            }
            if w == u32::MAX {
                continue;
            }
            for (bit, l) in chunk.iter_mut().enumerate() {
                if w & (1 << bit) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// One sequence's position in a compiled grammar.
pub struct Constraint {
    grammar: Arc<CompiledGrammar>,
    matcher: Matcher,
    tokens: Vec<u32>,
    finished: bool,
    /// With a token budget: the most answer tokens (EOS included) and a completion from here
    /// that fits in what is left.
    budget: Option<Budget>,
}

struct Budget {
    max_tokens: usize,
    /// Tokens that complete the answer from the current state; never longer than the tokens left.
    plan: Vec<u32>,
    /// What [`Constraint::budget_override`] worked out for the token about to be committed.
    pending: Option<(u32, Vec<u32>)>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("tokens", &self.tokens)
            .field("finished", &self.finished)
            .field("plan", &self.budget.as_ref().map(|b| &b.plan))
            .finish()
    }
}

impl Constraint {
    pub(crate) fn new(grammar: Arc<CompiledGrammar>, matcher: Matcher) -> Self {
        Self {
            grammar,
            matcher,
            tokens: Vec::new(),
            finished: false,
            budget: None,
        }
    }

    /// Limits the answer to `max_tokens` tokens (EOS included, as `max_new_tokens` counts them):
    /// from now on every step leaves a way to complete the answer in the tokens left. A budget
    /// smaller than the shortest answer is an error naming the tokens it needs. When the search
    /// for a completion gives up (see `completion`), the answer is not limited.
    pub fn limit_tokens(&mut self, max_tokens: usize) -> Result<(), DecodeError> {
        let plan = if self.tokens.is_empty() {
            self.grammar.shortest_answer().map(<[u32]>::to_vec)
        } else {
            shortest_completion(&self.matcher, self.grammar.vocab())
        };
        let Some(plan) = plan else {
            self.budget = None;
            return Ok(());
        };
        let left = max_tokens.saturating_sub(self.tokens.len());
        if plan.len() > left {
            return Err(DecodeError::BudgetTooSmall {
                budget: max_tokens,
                needed: self.tokens.len() + plan.len(),
                answer: self.grammar.vocab().decode(&plan),
            });
        }
        self.budget = Some(Budget {
            max_tokens,
            plan,
            pending: None,
        });
        Ok(())
    }

    /// With a budget: the token to take instead of `token` (just chosen from the mask) because no
    /// completion would fit after it, namely the next token of the current completion, or EOS
    /// where the answer may end here; `None` keeps `token`. Call it right before
    /// [`Constraint::commit`]ing the token it settles on.
    pub fn budget_override(&mut self, token: u32) -> Result<Option<u32>, DecodeError> {
        if self.finished {
            return Err(DecodeError::Finished);
        }
        let eos = self.grammar.vocab().eos();
        let used = self.tokens.len();
        let Some(budget) = self.budget.as_mut() else {
            return Ok(None);
        };
        budget.pending = None;
        if token == eos {
            return Ok(None);
        }
        if budget.plan.first() == Some(&token) {
            budget.pending = Some((token, budget.plan[1..].to_vec()));
            return Ok(None);
        }
        let left = budget.max_tokens.saturating_sub(used + 1);
        let mut after = self.matcher.clone();
        if !matches!(after.try_consume_tokens(&[token]), Ok(1)) {
            // Not allowed at all: `commit` reports it.
            return Ok(None);
        }
        let plan = if may_end(&mut after) {
            Some(Vec::new())
        } else if budget.plan.len() <= left && completes(&after, &budget.plan) {
            // Inside a string, say: what closed it before still closes it.
            Some(budget.plan.clone())
        } else {
            shortest_completion(&after, self.grammar.vocab())
        };
        if let Some(plan) = plan.filter(|p| p.len() <= left) {
            budget.pending = Some((token, plan));
            return Ok(None);
        }
        Ok(Some(match budget.plan.first() {
            Some(&next) => {
                budget.pending = Some((next, budget.plan[1..].to_vec()));
                next
            }
            None => eos,
        }))
    }

    /// The tokens allowed next: EOS alone once the answer is complete and cannot be extended.
    /// An empty mask cannot happen for a grammar that compiled (every state is reachable only
    /// through allowed tokens), but a dead end is reported as an error rather than returned.
    pub fn allowed_tokens(&mut self) -> Result<TokenMask, DecodeError> {
        if self.finished {
            return Err(DecodeError::Finished);
        }
        if let Some(budget) = &self.budget
            && let Some(&next) = budget.plan.first()
            && budget.plan.len() >= budget.max_tokens.saturating_sub(self.tokens.len())
        {
            // The completion takes every token left: follow it.
            let vocab = self.grammar.vocab();
            return Ok(TokenMask::singleton(next, vocab.model_vocab_size()));
        }
        if self.tokens.is_empty() {
            return Ok(self.grammar.first_mask().clone());
        }
        let vocab = self.grammar.vocab();
        if self.matcher.is_stopped() {
            return self.stopped_mask();
        }
        let vob = self.matcher.compute_mask().map_err(|e| self.failure(e))?;
        let mask = TokenMask::from_vob(&vob, vocab);
        if mask.count() == 0 {
            return Err(DecodeError::Impossible {
                message: format!("no token may follow `{}`", vocab.decode(&self.tokens)),
            });
        }
        Ok(mask)
    }

    /// Records the chosen token; a token the grammar does not allow here is an error and leaves
    /// the constraint as it was.
    pub fn commit(&mut self, token: u32) -> Result<(), DecodeError> {
        if self.finished {
            return Err(DecodeError::Finished);
        }
        let vocab = self.grammar.vocab();
        if token == vocab.eos() {
            let may_end = self.matcher.is_stopped()
                || self.matcher.is_accepting().map_err(|e| self.failure(e))?;
            if !may_end {
                return Err(DecodeError::TokenNotAllowed { token });
            }
            self.finished = true;
            return Ok(());
        }
        if token as usize >= vocab.tokenizer_size() || self.matcher.is_stopped() {
            return Err(DecodeError::TokenNotAllowed { token });
        }
        let consumed = self
            .matcher
            .try_consume_tokens(&[token])
            .map_err(|e| self.failure(e))?;
        if consumed != 1 {
            return Err(DecodeError::TokenNotAllowed { token });
        }
        self.tokens.push(token);
        self.follow_budget(token);
        Ok(())
    }

    /// Whether EOS was committed.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Whether the answer so far is complete (EOS would be accepted now).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }

    /// The committed answer tokens, EOS excluded.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The committed answer as text.
    pub fn text(&self) -> String {
        self.grammar.vocab().decode(&self.tokens)
    }

    /// Moves the budget's completion past the committed `token`: what `budget_override` found,
    /// or (for a token committed without asking it) a fresh search; no completion, no budget.
    fn follow_budget(&mut self, token: u32) {
        let Some(budget) = self.budget.as_mut() else {
            return;
        };
        match budget.pending.take() {
            Some((t, plan)) if t == token => budget.plan = plan,
            _ => match shortest_completion(&self.matcher, self.grammar.vocab()) {
                Some(plan) => budget.plan = plan,
                None => self.budget = None,
            },
        }
    }

    fn stopped_mask(&self) -> Result<TokenMask, DecodeError> {
        // A matcher stops on its own when the answer is complete and cannot grow; anything else
        // (an internal error, a lexer limit) is a failure, not a reason to end quietly.
        if let Some(message) = self.matcher.get_error() {
            return Err(DecodeError::Matcher { message });
        }
        let vocab = self.grammar.vocab();
        Ok(TokenMask::singleton(vocab.eos(), vocab.model_vocab_size()))
    }

    fn failure(&self, e: impl std::fmt::Display) -> DecodeError {
        DecodeError::Matcher {
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiled grammars are shared across threads; constraints move to worker threads.
    #[test]
    fn grammar_types_cross_threads() {
        fn shared<T: Send + Sync>() {}
        fn sent<T: Send>() {}
        shared::<CompiledGrammar>();
        shared::<crate::decode::GrammarCache>();
        shared::<Vocab>();
        sent::<Constraint>();
    }

    #[test]
    fn mask_words_follow_the_simplevob_layout() {
        let m = TokenMask::singleton(33, 70);
        assert_eq!(m.words, &[0, 2, 0]);
        assert_eq!(m.allowed().collect::<Vec<_>>(), vec![33]);
        assert_eq!(m.count(), 1);
        let mut logits = vec![0.0f32; 70];
        m.apply_to_logits(&mut logits);
        assert_eq!(logits.iter().filter(|l| l.is_finite()).count(), 1);
        assert!(logits[33].is_finite());
        assert!(!TokenMask::singleton(80, 70).is_allowed(80));
    }
}
