//! Stage implementations: each stage kind the executor can run, and [`lower`], which builds
//! them from a checked plan.

pub mod data;
pub mod dataset;
pub mod eval;
pub mod lower;
pub mod model_node;
pub mod prompt;
pub mod report;
pub mod row_ops;
pub mod simple;
pub mod train_stage;
