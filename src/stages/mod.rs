//! Stage implementations: each stage kind the executor can run, and [`lower`], which builds
//! them from a checked plan.

pub mod data;
pub mod declared;
pub mod eval;
pub mod finetune;
pub mod lower;
pub mod model;
pub mod prompt;
pub mod report;
pub mod rows;
