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
use crate::exec::{Stage, StageContext, StageError, StageOutcome};
use crate::plan::params::{GrammarParams, GrammarSpec, LabelsParams, PromptParams};
use crate::plan::{Plan, sort_keys};

/// File of a `labels` entry.
pub const LABELS_FILE: &str = "labels.json";
/// File of a `prompt` entry.
pub const PROMPT_FILE: &str = "prompt.json";
/// File of a `grammar` entry.
pub const GRAMMAR_FILE: &str = "grammar.json";

/// Bumped when the JSON written by these stages changes shape.
const SIMPLE_CODE_VERSION: u32 = 1;

/// Errors reading a small JSON entry back.
#[derive(Debug, thiserror::Error)]
pub enum EntryFileError {
    #[error("cannot read `{path}`")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    std::fs::write(ctx.out_path(name), text)?;
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, EntryFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| EntryFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| EntryFileError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The content of a `labels` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelsFile {
    pub values: Vec<String>,
}

/// Reads the label list of a `labels` entry.
pub fn read_labels(entry: &CacheEntry) -> Result<LabelsFile, EntryFileError> {
    read_json(&entry.path(LABELS_FILE))
}

/// `labels NAME = [...]`.
pub struct LabelsStage {
    file: LabelsFile,
}

impl LabelsStage {
    pub fn new(params: &LabelsParams) -> Self {
        Self {
            file: LabelsFile {
                values: params.values.clone(),
            },
        }
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
pub struct PromptFile {
    pub system: Option<String>,
    pub user: String,
    /// Pipeline params (after `--set`) in scope of the templates.
    pub params: BTreeMap<String, Value>,
}

impl PromptFile {
    /// The templates as plan parameters (what [`crate::stages::prompt::render_prompt`] takes).
    pub fn prompt_params(&self) -> PromptParams {
        PromptParams {
            system: self.system.clone(),
            user: self.user.clone(),
        }
    }
}

/// Reads a `prompt` entry.
pub fn read_prompt(entry: &CacheEntry) -> Result<PromptFile, EntryFileError> {
    read_json(&entry.path(PROMPT_FILE))
}

/// `prompt NAME { system = …  user = … }`.
pub struct PromptStage {
    file: PromptFile,
}

impl PromptStage {
    /// The pipeline params the templates mention are part of the stage, so a `--set` that
    /// changes one of them reruns what the prompt feeds, and other params leave it cached.
    pub fn new(params: &PromptParams, plan: &Plan) -> Self {
        let used = template_names(params);
        let params_json = plan
            .settings
            .params
            .iter()
            .filter(|(k, _)| used.as_ref().is_none_or(|u| u.contains(k.as_str())))
            .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or(Value::Null)))
            .collect();
        Self {
            file: PromptFile {
                system: params.system.clone(),
                user: params.user.clone(),
                params: params_json,
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
pub struct GrammarFile {
    /// The grammar parameters as the plan serialises them.
    pub grammar: Value,
    /// The equivalent JSON Schema of `json {…}` and `json_schema(…)` grammars.
    pub json_schema: Option<Value>,
}

/// Names the prompt's templates read from their context. A template that does not compile
/// (the checker rejects those) counts as reading every name, keeping every param in scope.
fn template_names(params: &PromptParams) -> Option<std::collections::HashSet<String>> {
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

/// Reads a `grammar` entry.
pub fn read_grammar(entry: &CacheEntry) -> Result<GrammarFile, EntryFileError> {
    read_json(&entry.path(GRAMMAR_FILE))
}

/// `grammar NAME = …`.
pub struct GrammarStage {
    file: GrammarFile,
}

impl GrammarStage {
    pub fn new(params: &GrammarParams) -> Self {
        let json_schema = match &params.spec {
            GrammarSpec::Json { schema } => Some(schema.to_json_schema()),
            GrammarSpec::JsonSchema { schema, .. } => Some(schema.clone()),
            GrammarSpec::OneOf { .. } | GrammarSpec::Regex { .. } | GrammarSpec::Lark { .. } => {
                None
            }
        };
        Self {
            file: GrammarFile {
                grammar: sort_keys(serde_json::to_value(params).unwrap_or(Value::Null)),
                json_schema,
            },
        }
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

/// The decoder's view of a declared grammar: what `decode` compiles into token masks.
pub fn grammar_spec(params: &GrammarParams) -> crate::decode::GrammarSpec {
    use crate::decode::{GrammarSpec as Decode, Whitespace as DecodeWhitespace};
    let whitespace = match params.whitespace {
        crate::plan::params::Whitespace::Flexible => DecodeWhitespace::Flexible,
        crate::plan::params::Whitespace::Compact => DecodeWhitespace::Compact,
    };
    match &params.spec {
        GrammarSpec::OneOf { values, .. } => Decode::Choice {
            labels: values.clone(),
        },
        GrammarSpec::Json { schema } => Decode::Json {
            schema: schema.to_json_schema(),
            whitespace,
        },
        GrammarSpec::JsonSchema { schema, .. } => Decode::Json {
            schema: schema.clone(),
            whitespace,
        },
        GrammarSpec::Regex { pattern } => Decode::Regex(pattern.clone()),
        GrammarSpec::Lark { grammar } => Decode::Lark(grammar.clone()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn plan_of(text: &str) -> Plan {
        let result = crate::plan::check_source(Path::new("/tmp/simple_test.vp"), text, &[]);
        let rendered = crate::plan::render_diagnostics(&result, false);
        result.plan.unwrap_or_else(|| panic!("{rendered}"))
    }

    #[test]
    fn prompt_params_cover_only_the_params_its_templates_read() {
        let text = r#"
            pipeline p { seed = 1 }
            param tone = "kind"
            param n_eval = 10
            prompt ask { system = "Be {{ tone }}." user = "{% for l in labels %}{{ l }} {% endfor %}" }
        "#;
        let plan = plan_of(text);
        let Some(crate::plan::NodeParams::Prompt(p)) = plan.find("ask").map(|n| &n.params) else {
            panic!("no prompt");
        };
        let stage = PromptStage::new(p, &plan);
        let params = stage.params();
        assert_eq!(params["params"], json!({ "tone": "kind" }));
        assert_eq!(params["user"], "{% for l in labels %}{{ l }} {% endfor %}");
    }

    #[test]
    fn grammar_entry_carries_the_json_schema() {
        let plan = plan_of(
            r#"
            pipeline p { seed = 1 }
            labels animals = ["cat", "dog"]
            grammar g = json { pred_class: one_of(animals) }
            "#,
        );
        let Some(crate::plan::NodeParams::Grammar(g)) = plan.find("g").map(|n| &n.params) else {
            panic!("no grammar");
        };
        let stage = GrammarStage::new(g);
        let schema = stage.file.json_schema.clone().expect("schema");
        assert_eq!(
            schema["properties"]["pred_class"]["enum"],
            json!(["cat", "dog"])
        );
        assert_eq!(stage.params(), stage.file.grammar);
    }

    /// `json_schema(...)` compacts whitespace unless told otherwise, so a small token budget is
    /// not spent on blanks; `whitespace: "flexible"` still opts back in.
    #[test]
    fn json_schema_grammars_default_to_compact_whitespace() {
        let decode = |decl: &str| {
            let plan = plan_of(&format!("pipeline p {{ seed = 1 }}\ngrammar g = {decl}\n"));
            let Some(crate::plan::NodeParams::Grammar(g)) = plan.find("g").map(|n| &n.params)
            else {
                panic!("no grammar");
            };
            grammar_spec(g)
        };
        let schema =
            r#"{ type: "object", properties: { a: { type: "string" } }, required: ["a"] }"#;
        let ws = |spec: crate::decode::GrammarSpec| match spec {
            crate::decode::GrammarSpec::Json { whitespace, .. } => whitespace,
            other => panic!("not JSON: {other:?}"),
        };
        use crate::decode::Whitespace as W;
        assert_eq!(ws(decode(&format!("json_schema({schema})"))), W::Compact);
        assert_eq!(
            ws(decode(&format!(
                "json_schema({schema}, whitespace: \"flexible\")"
            ))),
            W::Flexible
        );
    }
}
