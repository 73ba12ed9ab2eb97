//! The `labels`, `prompt` and `grammar` stages: small declarations stored as JSON entries.

mod stage;

pub use stage::{
    EntryFileError, GRAMMAR_FILE, GrammarConfig, GrammarFile, GrammarStage, LABELS_FILE,
    LabelsConfig, LabelsFile, LabelsStage, PROMPT_FILE, PromptConfig, PromptFile, PromptStage,
    read_grammar, read_labels, read_prompt,
};
