//! The `split`, `sample` and `shuffle` stages: row tables in, row tables out.

pub mod stage;

pub use stage::{SampleConfig, SampleStage, SplitConfig, SplitMethod, SplitStage};
