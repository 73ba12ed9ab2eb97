//! Output grammars: declared answers compiled into per-step token masks with llguidance, answers
//! parsed back into labels, and exact label scoring.
//!
//! Flow: a [`GrammarSpec`] (choice, typed JSON object, raw JSON Schema, regex, Lark) is compiled
//! once per tokenizer ([`Vocab`]) into a [`CompiledGrammar`], kept in a [`GrammarCache`]. Each
//! sequence gets a cheap [`Constraint`]: before every step the model's loop asks for the
//! [`TokenMask`] of allowed tokens, and commits the token it chose. [`AnswerParser`] reads the text
//! back into an [`Answer`]; [`answer_text`] is the answer a fine-tune learns for a label, and it is
//! accepted by the same grammar.
//!
//! # Label scoring versus greedy constrained decoding
//!
//! Greedy constrained decoding commits, token by token, to the most likely *allowed* token. It
//! answers with one label and no calibrated confidence, and its first step decides on the first
//! token alone: with labels `cat`, `catamaran` and `dog`, a model that puts 0.6 on the token `cat`
//! and 0.4 on `dog`, then splits the mass after `cat` evenly between ending and `amaran`, answers
//! `cat` (0.3) although `dog` (0.4) is the most probable complete answer. Likewise, with only
//! `cat` and `catamaran`, greedy follows the more likely token after `cat` even when the longer
//! label's later tokens make it the less likely answer overall.
//!
//! [`LabelScorer`] (`scoring = labels`) instead computes every label's exact probability: the sum
//! of log-softmax values over its complete answer tokens, EOS included, normalised over the labels.
//! Labels that share a prefix share the model queries for it (one query per trie node, answered
//! from the prompt's KV cache), so it costs about as much as generating the longest answer and
//! gives the full class distribution (log loss, ROC/AUC, calibration, top-k). The two methods agree
//! whenever the labels' first tokens differ and each label is a single token; they can disagree
//! when labels share a prefix or span several tokens, as above.
//!
//! **Architecture Invariant:** nothing here sees pipeline syntax or model tensors; the plan maps
//! declarations onto [`GrammarSpec`], and the model is reached through [`PrefixScorer`] and the
//! masks it applies.

mod answer;
mod bench;
mod compiled;
mod completion;
mod constraint;
mod error;
mod scoring;
mod spec;
mod text_check;
mod vocab;

pub use answer::{Answer, AnswerParser, InvalidReason, answer_text};
pub use bench::{BenchConfig, BenchReport, CAR_MAKERS, GrammarBench, bench_grammars, bench_specs};
pub use compiled::{CompiledGrammar, GrammarCache};
pub use constraint::{Constraint, TokenMask};
pub use error::DecodeError;
pub use scoring::{LabelScorer, LabelScores, PrefixScorer, argmax, greedy_decode, log_softmax};
pub use spec::{FieldType, GrammarSpec, JsonField, Whitespace};
pub use vocab::{Vocab, VocabConfig};
