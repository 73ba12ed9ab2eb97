//! The `split`, `sample` and `shuffle` stages: row tables in, row tables out.

pub(crate) mod stage;

pub(crate) use stage::{SampleConfig, SampleStage, SplitConfig, SplitMethod, SplitStage};
