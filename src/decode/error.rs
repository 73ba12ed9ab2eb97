//! The errors of the decode layer: loading a vocabulary, compiling a grammar, stepping a constraint,
//! building canonical answers and scoring labels.

use crate::file_error::FileError;
use std::path::PathBuf;

/// What can go wrong in `decode`.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("cannot read tokenizer")]
    ReadTokenizer(#[source] FileError),
    #[error("cannot load tokenizer `{}`: {message}", path.display())]
    LoadTokenizer { path: PathBuf, message: String },
    #[error("unsupported tokenizer: {0}")]
    UnsupportedTokenizer(String),
    #[error("end-of-sequence token `{0}` is not in the tokenizer")]
    UnknownEos(String),
    #[error("the model vocabulary ({model}) is smaller than the tokenizer's ({tokenizer})")]
    VocabTooSmall { model: usize, tokenizer: usize },
    #[error("the grammar has no labels")]
    NoLabels,
    #[error("label `{label}` {reason}")]
    BadLabel { label: String, reason: &'static str },
    #[error("label `{0}` is listed twice")]
    DuplicateLabel(String),
    #[error("JSON field `{field}` {reason}")]
    BadField { field: String, reason: String },
    #[error("invalid grammar: {message}")]
    Compile { message: String },
    #[error("the grammar can never be satisfied: {message}")]
    Impossible { message: String },
    #[error("token {token} is not allowed by the grammar here")]
    TokenNotAllowed { token: u32 },
    #[error("the grammar matcher failed: {message}")]
    Matcher { message: String },
    #[error(
        "a budget of {budget} new tokens cannot hold an answer: the shortest answer found for the grammar, `{answer}`, takes {needed} tokens; allow at least {needed} (`--max-new-tokens`, or `max_new_tokens` in the eval)"
    )]
    BudgetTooSmall {
        budget: usize,
        needed: usize,
        answer: String,
    },
    #[error("the sequence already ended")]
    Finished,
    #[error("no canonical answer for this grammar: {reason}")]
    NoCanonicalAnswer { reason: String },
    #[error("label `{0}` is not one of the grammar's labels")]
    UnknownLabel(String),
    #[error("the answer `{text}` for label `{label}` is not accepted by the grammar: {reason}")]
    AnswerRejected {
        label: String,
        text: String,
        reason: String,
    },
    #[error("the model scorer failed")]
    Scorer(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(
        "the model scorer returned {got} rows of logits for {expected} prefixes, or a row not of the vocabulary size"
    )]
    ScorerShape { expected: usize, got: usize },
    #[error("every label has zero probability under the model")]
    Degenerate,
}
