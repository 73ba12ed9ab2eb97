//! The `labels`, `prompt` and `grammar` stages: small declarations stored as JSON entries.
//!
//! They compute nothing, but as exec nodes their fingerprints cascade: editing a prompt's text
//! changes the prompt entry's fingerprint and so every eval that reads it, and nothing else.
//! Each entry holds one JSON file that consumers read back with the `read_*` functions here.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cache::CacheEntry;
use crate::cache::sort_keys;
use crate::exec::{Stage, StageContext, StageError, StageOutcome};
use crate::file_error::FileError;
use crate::stages::prompt::PromptTemplates;

/// File of a `labels` entry.
pub(crate) const LABELS_FILE: &str = "labels.json";
/// File of a `prompt` entry.
pub(crate) const PROMPT_FILE: &str = "prompt.json";
/// File of a `grammar` entry.
pub(crate) const GRAMMAR_FILE: &str = "grammar.json";

/// Bumped when the JSON written by these stages changes shape.
const SIMPLE_CODE_VERSION: u32 = 1;

/// Errors reading a small JSON entry back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EntryFileError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("`{path}` is not the expected JSON")]
    Json {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn write_json(
    ctx: &StageContext<'_>,
    name: &str,
    value: &impl Serialize,
) -> Result<(), StageError> {
    let text = serde_json::to_string_pretty(value)?;
    let path = ctx.out_path(name);
    std::fs::write(&path, text).map_err(FileError::write(&path))?;
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, EntryFileError> {
    let text = std::fs::read_to_string(path).map_err(FileError::read(path))?;
    serde_json::from_str(&text).map_err(|source| EntryFileError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The content of a `labels` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct LabelsFile {
    pub values: Vec<String>,
}

/// A `labels` stage's list: what its entry holds.
pub(crate) type LabelsConfig = LabelsFile;

/// `labels NAME = [...]`.
pub(crate) struct LabelsStage {
    file: LabelsFile,
}

impl LabelsStage {
    pub(crate) fn from_config(config: LabelsConfig) -> Self {
        Self { file: config }
    }
}

impl Stage for LabelsStage {
    fn kind(&self) -> &'static str {
        "labels"
    }

    fn code_version(&self) -> u32 {
        SIMPLE_CODE_VERSION
    }

    fn params(&self) -> Value {
        json!({ "values": self.file.values })
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        write_json(ctx, LABELS_FILE, &self.file)?;
        Ok(StageOutcome {
            metadata: json!({ "labels": self.file.values.len() }),
            ..StageOutcome::default()
        })
    }
}

/// The content of a `prompt` entry: the templates and the pipeline params they may read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct PromptFile {
    pub system: Option<String>,
    pub user: String,
    /// Pipeline params (after `--set`) in scope of the templates.
    pub params: BTreeMap<String, Value>,
}

impl PromptFile {
    /// The templates (what [`crate::stages::prompt::render_prompt`] takes).
    pub(crate) fn templates(&self) -> PromptTemplates {
        PromptTemplates {
            system: self.system.clone(),
            user: self.user.clone(),
        }
    }
}

/// Reads a `prompt` entry.
pub(crate) fn read_prompt(entry: &CacheEntry) -> Result<PromptFile, EntryFileError> {
    read_json(&entry.path(PROMPT_FILE))
}

/// A `prompt` stage's templates and the pipeline's params (after `--set`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PromptConfig {
    pub templates: PromptTemplates,
    /// Every pipeline param; the stage keeps those its templates read.
    pub pipeline_params: BTreeMap<String, Value>,
}

/// `prompt NAME { system = …  user = … }`.
pub(crate) struct PromptStage {
    file: PromptFile,
}

impl PromptStage {
    /// The pipeline params the templates mention are part of the stage, so a `--set` that
    /// changes one of them reruns what the prompt feeds, and other params leave it cached.
    pub(crate) fn from_config(config: PromptConfig) -> Self {
        let used = template_names(&config.templates);
        let params = config
            .pipeline_params
            .into_iter()
            .filter(|(k, _)| used.as_ref().is_none_or(|u| u.contains(k.as_str())))
            .collect();
        Self {
            file: PromptFile {
                system: config.templates.system,
                user: config.templates.user,
                params,
            },
        }
    }
}

impl Stage for PromptStage {
    fn kind(&self) -> &'static str {
        "prompt"
    }

    fn code_version(&self) -> u32 {
        SIMPLE_CODE_VERSION
    }

    fn params(&self) -> Value {
        sort_keys(serde_json::to_value(&self.file).unwrap_or(Value::Null))
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        write_json(ctx, PROMPT_FILE, &self.file)?;
        Ok(StageOutcome::default())
    }
}

/// The content of a `grammar` entry: the declaration and, for `json {…}`, its JSON Schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct GrammarFile {
    /// The grammar parameters as the plan serialises them.
    pub grammar: Value,
    /// The equivalent JSON Schema of `json {…}` and `json_schema(…)` grammars.
    pub json_schema: Option<Value>,
}

/// Names the prompt's templates read from their context. A template that does not compile
/// (the checker rejects those) counts as reading every name, keeping every param in scope.
fn template_names(params: &PromptTemplates) -> Option<std::collections::HashSet<String>> {
    let env = minijinja::Environment::new();
    let mut names = std::collections::HashSet::new();
    for text in params.system.iter().chain(std::iter::once(&params.user)) {
        names.extend(
            env.template_from_str(text)
                .ok()?
                .undeclared_variables(false),
        );
    }
    Some(names)
}

/// A `grammar` stage's declaration and schema: what its entry holds.
pub(crate) type GrammarConfig = GrammarFile;

/// `grammar NAME = …`.
pub(crate) struct GrammarStage {
    file: GrammarFile,
}

impl GrammarStage {
    pub(crate) fn from_config(config: GrammarConfig) -> Self {
        Self { file: config }
    }
}

impl Stage for GrammarStage {
    fn kind(&self) -> &'static str {
        "grammar"
    }

    fn code_version(&self) -> u32 {
        SIMPLE_CODE_VERSION
    }

    fn params(&self) -> Value {
        // The schema is derived from the grammar, so the grammar alone identifies the entry.
        self.file.grammar.clone()
    }

    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        write_json(ctx, GRAMMAR_FILE, &self.file)?;
        Ok(StageOutcome::default())
    }
}
