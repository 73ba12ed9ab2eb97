//! The `labels`, `prompt` and `grammar` stages: small declarations stored as JSON entries.

pub mod stage;

pub use stage::{
    EntryFileError, GRAMMAR_FILE, GrammarFile, GrammarStage, LABELS_FILE, LabelsFile, LabelsStage,
    PROMPT_FILE, PromptFile, PromptStage, grammar_spec, read_grammar, read_labels, read_prompt,
};
