//! The `labels`, `prompt` and `grammar` stages: small declarations stored as JSON entries.

mod stage;

pub(crate) use stage::{
    GrammarConfig, GrammarStage, LabelsConfig, LabelsStage, PromptConfig, PromptStage, read_prompt,
};
