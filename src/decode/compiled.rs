//! Compiling a [`GrammarSpec`] once per tokenizer into a [`CompiledGrammar`], and the
//! [`GrammarCache`] that keeps compiled grammars by (canonical spec, tokenizer hash).
//!
//! Compilation also computes the first step's mask: a grammar that allows nothing at its start
//! (an empty label list is caught earlier, an unsatisfiable regex or schema here) is an error at
//! compile time rather than a surprise at the first decoding step. Each sequence then gets a cheap
//! [`Constraint`] cloned from the compiled matcher; clones share llguidance's lexer cache, so masks
//! get faster as more sequences run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use llguidance::Matcher;

use crate::decode::completion::shortest_completion;
use crate::decode::constraint::{Constraint, TokenMask};
use crate::decode::error::DecodeError;
use crate::decode::spec::GrammarSpec;
use crate::decode::vocab::Vocab;

/// A grammar compiled for one vocabulary, ready to hand out per-sequence constraints.
pub struct CompiledGrammar {
    spec: GrammarSpec,
    vocab: Arc<Vocab>,
    matcher: Matcher,
    first_mask: TokenMask,
    warnings: Vec<String>,
    /// The shortest answer found (see `completion`), searched on first use.
    shortest: OnceLock<Option<Vec<u32>>>,
}

impl std::fmt::Debug for CompiledGrammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledGrammar")
            .field("spec", &self.spec)
            .field("vocab", &self.vocab)
            .field("first_mask_allowed", &self.first_mask.count())
            .finish()
    }
}

impl CompiledGrammar {
    /// Compiles `spec` for `vocab` (prefer [`GrammarCache::compile`], which reuses results).
    pub fn compile(spec: &GrammarSpec, vocab: &Arc<Vocab>) -> Result<Self, DecodeError> {
        let grammar = spec.to_llguidance()?;
        let parser = vocab
            .factory()
            .create_parser(grammar)
            .map_err(|e| classify_compile_error(&e.to_string()))?;
        let mut matcher = Matcher::new(Ok(parser));
        let warnings = matcher.grammar_warnings();
        // The matcher reports a grammar that allows nothing as a failed first mask
        // (`NoExtensionBias`), which is the user's grammar being empty, not an internal error.
        let first = matcher
            .compute_mask_or_eos()
            .map_err(|e| DecodeError::Impossible {
                message: format!("no token can start an answer ({e})"),
            })?;
        let first_mask = TokenMask::from_vob(&first, vocab);
        let eos_only = first_mask.count() == 1 && first_mask.is_allowed(vocab.eos());
        if first_mask.count() == 0 {
            return Err(DecodeError::Impossible {
                message: "no token can start an answer".to_string(),
            });
        }
        if eos_only {
            // The empty answer is the only one: surely a declaration mistake, not a grammar.
            return Err(DecodeError::Impossible {
                message: "the only answer it accepts is the empty one".to_string(),
            });
        }
        Ok(Self {
            spec: spec.clone(),
            vocab: vocab.clone(),
            matcher,
            first_mask,
            warnings,
            shortest: OnceLock::new(),
        })
    }

    /// A fresh constraint for one sequence.
    pub fn constraint(self: &Arc<Self>) -> Constraint {
        Constraint::new(self.clone(), self.matcher.clone())
    }

    pub(crate) fn spec(&self) -> &GrammarSpec {
        &self.spec
    }

    pub fn vocab(&self) -> &Arc<Vocab> {
        &self.vocab
    }

    /// What llguidance warned about while compiling (e.g. schema keywords it approximates).
    pub(crate) fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The tokens of the shortest complete answer found (`None` when the search gave up): what
    /// a token budget must hold at least.
    pub fn shortest_answer(&self) -> Option<&[u32]> {
        self.shortest
            .get_or_init(|| shortest_completion(&self.matcher, &self.vocab))
            .as_deref()
    }

    /// Refuses a token budget (`max_new_tokens`) that cannot hold the shortest answer, naming how
    /// many tokens it needs, so that nothing is generated only to end in an invalid answer.
    pub fn check_budget(&self, max_tokens: usize) -> Result<(), DecodeError> {
        match self.shortest_answer() {
            Some(answer) if answer.len() > max_tokens => Err(DecodeError::BudgetTooSmall {
                budget: max_tokens,
                needed: answer.len(),
                answer: self.vocab.decode(answer),
            }),
            _ => Ok(()),
        }
    }

    pub(crate) fn first_mask(&self) -> &TokenMask {
        &self.first_mask
    }
}

/// llguidance reports unsatisfiable schemas and empty regexes as plain compile errors; name them.
fn classify_compile_error(message: &str) -> DecodeError {
    let lower = message.to_lowercase();
    if lower.contains("unsatisfiable") || lower.contains("no match") || lower.contains("empty") {
        DecodeError::Impossible {
            message: message.to_string(),
        }
    } else {
        DecodeError::Compile {
            message: message.to_string(),
        }
    }
}

type CacheKey = (blake3::Hash, String);

/// Compiled grammars by (tokenizer hash, canonical spec), shared across threads and stages.
#[derive(Default)]
pub struct GrammarCache {
    entries: Mutex<HashMap<CacheKey, Arc<CompiledGrammar>>>,
}

impl GrammarCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The compiled `spec` for `vocab`, compiling it on first use. Errors are not cached, so a
    /// failing declaration reports the same error each time it is asked for.
    pub fn compile(
        &self,
        spec: &GrammarSpec,
        vocab: &Arc<Vocab>,
    ) -> Result<Arc<CompiledGrammar>, DecodeError> {
        let key = (vocab.hash(), spec.cache_key());
        if let Some(hit) = self.lock().get(&key) {
            return Ok(hit.clone());
        }
        // Compile outside the lock: a slow grammar must not stall lookups of others. Two threads
        // racing on the same key both compile; the first insert wins and both get equal results.
        let compiled = Arc::new(CompiledGrammar::compile(spec, vocab)?);
        Ok(self.lock().entry(key).or_insert(compiled).clone())
    }

    /// How many compiled grammars are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Arc<CompiledGrammar>>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts),
        // so a poisoned lock is still safe to use.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
