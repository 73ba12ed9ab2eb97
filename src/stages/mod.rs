//! Stage implementations: each stage kind the executor can run.

pub mod data;
pub mod eval;
pub mod prompt;
pub mod report;
