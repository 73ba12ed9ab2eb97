//! Typed output grammars (`GrammarSpec`) and their lowering to llguidance's `TopLevelGrammar`.
//!
//! The plan maps a pipeline's `grammar NAME = ...` declaration onto a [`GrammarSpec`]; nothing here
//! sees pipeline syntax. Typed JSON field lists become JSON Schema with every non-optional field
//! required and no extra properties, so the model cannot wander off into fields nobody reads.

use llguidance::api::TopLevelGrammar;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::decode::error::DecodeError;

/// The most whitespace flexible JSON allows between two tokens of the answer: enough for pretty
/// printing a few levels deep, few enough that a model cannot loop on blanks forever.
const MAX_JSON_WHITESPACE: usize = 16;

/// An output grammar, as declared in a pipeline or on the command line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrammarSpec {
    /// One of the labels, verbatim, is the whole answer.
    Choice { labels: Vec<String> },
    /// A JSON value matching `schema`, built by [`GrammarSpec::json_object`] or given directly.
    Json {
        schema: Value,
        whitespace: Whitespace,
    },
    /// A regular expression (Rust `regex` syntax) the whole answer matches.
    Regex(String),
    /// A context-free grammar in llguidance's Lark dialect.
    Lark(String),
    /// A raw JSON Schema (`infer --json-schema`) with compact whitespace, unless the schema sets
    /// its own `x-guidance` options: flexible blanks let a weak model spend its budget on them.
    JsonSchema(Value),
}

/// Whitespace between JSON tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Whitespace {
    /// Accept `{"pred_class":"dog"}`, `{"pred_class": "dog"}` and short runs of blanks/newlines.
    #[default]
    Flexible,
    /// Accept no whitespace at all: `{"pred_class":"dog"}` only.
    Compact,
}

/// One field of a JSON object answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonField {
    pub name: String,
    pub ty: FieldType,
    /// Optional fields may be left out; all others are required.
    pub optional: bool,
}

impl JsonField {
    /// A required field.
    pub fn required(name: impl Into<String>, ty: FieldType) -> Self {
        Self {
            name: name.into(),
            ty,
            optional: false,
        }
    }

    /// A field the answer may leave out.
    pub fn optional(name: impl Into<String>, ty: FieldType) -> Self {
        Self {
            name: name.into(),
            ty,
            optional: true,
        }
    }
}

/// The type of a JSON field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// One of these strings (the label set, typically).
    Enum(Vec<String>),
    String {
        /// The most characters the string may hold.
        max_len: Option<usize>,
        /// A regular expression the string's content matches.
        pattern: Option<String>,
    },
    /// An integer; bounds keep it short (without both, any length is valid JSON).
    Integer {
        minimum: Option<i64>,
        maximum: Option<i64>,
    },
    /// A number; with both bounds it has no exponent and a bounded integer part. Unbounded
    /// numbers may have exponents too large for an `f64`, which then fail to parse.
    Number {
        minimum: Option<f64>,
        maximum: Option<f64>,
    },
    Boolean,
    Array {
        items: Box<FieldType>,
        /// The most items the array may hold.
        max_items: Option<usize>,
    },
    Object(Vec<JsonField>),
}

impl GrammarSpec {
    /// A choice among `labels`.
    pub fn choice<S: Into<String>>(labels: impl IntoIterator<Item = S>) -> Self {
        Self::Choice {
            labels: labels.into_iter().map(Into::into).collect(),
        }
    }

    /// A JSON object with `fields`, lowered to JSON Schema.
    pub fn json_object(fields: &[JsonField], whitespace: Whitespace) -> Result<Self, DecodeError> {
        Ok(Self::Json {
            schema: object_schema(fields)?,
            whitespace,
        })
    }

    /// The canonical form used in cache keys.
    pub(crate) fn cache_key(&self) -> String {
        // Serialising plain data into a String cannot fail; fall back to Debug just in case.
        serde_json::to_string(self).unwrap_or_else(|_| format!("{self:?}"))
    }

    /// The labels of a choice, or of the string enum of a JSON object's field `label_field`.
    pub(crate) fn labels(&self, label_field: Option<&str>) -> Option<Vec<String>> {
        match self {
            Self::Choice { labels } => Some(labels.clone()),
            Self::Json { schema, .. } | Self::JsonSchema(schema) => {
                let values = schema["properties"][label_field?]["enum"].as_array()?;
                // Only an enum of strings is a label set.
                values
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect()
            }
            Self::Regex(_) | Self::Lark(_) => None,
        }
    }

    /// Lowers to llguidance's grammar, checking what llguidance would not check for us.
    pub(crate) fn to_llguidance(&self) -> Result<TopLevelGrammar, DecodeError> {
        match self {
            Self::Choice { labels } => {
                check_labels(labels)?;
                let alternatives: Vec<String> = labels.iter().map(|l| lark_literal(l)).collect();
                Ok(TopLevelGrammar::from_lark(format!(
                    "start: {}\n",
                    alternatives.join(" | ")
                )))
            }
            Self::Json { schema, whitespace } => Ok(TopLevelGrammar::from_json_schema(
                with_whitespace(schema.clone(), *whitespace)?,
            )),
            Self::JsonSchema(schema) => Ok(TopLevelGrammar::from_json_schema(with_whitespace(
                schema.clone(),
                Whitespace::Compact,
            )?)),
            Self::Regex(rx) => Ok(TopLevelGrammar::from_regex(rx)),
            Self::Lark(src) => {
                if src.trim().is_empty() {
                    return Err(DecodeError::Compile {
                        message: "the Lark grammar is empty".to_string(),
                    });
                }
                Ok(TopLevelGrammar::from_lark(src.clone()))
            }
        }
    }
}

/// Rejects label lists no grammar or evaluation can work with.
pub(crate) fn check_labels(labels: &[String]) -> Result<(), DecodeError> {
    if labels.is_empty() {
        return Err(DecodeError::NoLabels);
    }
    let mut seen = std::collections::HashSet::new();
    for label in labels {
        let bad = |reason| {
            Err(DecodeError::BadLabel {
                label: label.clone(),
                reason,
            })
        };
        if label.trim().is_empty() {
            return bad("is empty");
        }
        // Answers are compared after trimming, so padded labels could never match.
        if label.trim() != label {
            return bad("starts or ends with whitespace");
        }
        if label.chars().any(char::is_control) {
            return bad("contains a control character");
        }
        if !seen.insert(label.as_str()) {
            return Err(DecodeError::DuplicateLabel(label.clone()));
        }
    }
    Ok(())
}

/// A Lark string literal for `s`: JSON string escaping, which Lark literals accept for the
/// characters labels may hold (no control characters, see `check_labels`).
fn lark_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Adds llguidance's `x-guidance` whitespace options unless the schema sets its own.
fn with_whitespace(mut schema: Value, whitespace: Whitespace) -> Result<Value, DecodeError> {
    let Some(obj) = schema.as_object_mut() else {
        return Err(DecodeError::Compile {
            message: format!("a JSON Schema must be an object, found `{schema}`"),
        });
    };
    if !obj.contains_key("x-guidance") {
        let opts = match whitespace {
            Whitespace::Flexible => json!({
                "whitespace_pattern": format!("[\\x20\\x0A\\x0D\\x09]{{1,{MAX_JSON_WHITESPACE}}}"),
            }),
            Whitespace::Compact => json!({ "whitespace_flexible": false }),
        };
        obj.insert("x-guidance".to_string(), opts);
    }
    Ok(schema)
}

/// JSON Schema of an object with `fields`, in declaration order.
pub(crate) fn object_schema(fields: &[JsonField]) -> Result<Value, DecodeError> {
    if fields.is_empty() {
        return Err(DecodeError::BadField {
            field: String::new(),
            reason: "list is empty: an object answer needs at least one field".to_string(),
        });
    }
    let mut properties = Map::new();
    let mut required = Vec::new();
    for f in fields {
        if properties.contains_key(&f.name) {
            return Err(DecodeError::BadField {
                field: f.name.clone(),
                reason: "is declared twice".to_string(),
            });
        }
        properties.insert(f.name.clone(), field_schema(&f.name, &f.ty)?);
        if !f.optional {
            required.push(Value::String(f.name.clone()));
        }
    }
    Ok(json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    }))
}

fn with_bounds<T: Into<Value>>(mut schema: Value, minimum: Option<T>, maximum: Option<T>) -> Value {
    if let Some(obj) = schema.as_object_mut() {
        if let Some(m) = minimum {
            obj.insert("minimum".into(), m.into());
        }
        if let Some(m) = maximum {
            obj.insert("maximum".into(), m.into());
        }
    }
    schema
}

fn field_schema(name: &str, ty: &FieldType) -> Result<Value, DecodeError> {
    Ok(match ty {
        FieldType::Enum(labels) => {
            check_labels(labels).map_err(|e| DecodeError::BadField {
                field: name.to_string(),
                reason: e.to_string(),
            })?;
            json!({ "type": "string", "enum": labels })
        }
        FieldType::String { max_len, pattern } => {
            let mut s = Map::new();
            s.insert("type".into(), "string".into());
            if let Some(n) = max_len {
                s.insert("maxLength".into(), (*n).into());
            }
            if let Some(p) = pattern {
                s.insert("pattern".into(), p.clone().into());
            }
            Value::Object(s)
        }
        FieldType::Integer { minimum, maximum } => {
            with_bounds(json!({ "type": "integer" }), *minimum, *maximum)
        }
        FieldType::Number { minimum, maximum } => {
            if minimum.iter().chain(maximum).any(|b| !b.is_finite()) {
                return Err(DecodeError::BadField {
                    field: name.to_string(),
                    reason: "has a bound that is not a finite number".to_string(),
                });
            }
            with_bounds(json!({ "type": "number" }), *minimum, *maximum)
        }
        FieldType::Boolean => json!({ "type": "boolean" }),
        FieldType::Array { items, max_items } => {
            let mut s = Map::new();
            s.insert("type".into(), "array".into());
            s.insert("items".into(), field_schema(name, items)?);
            if let Some(n) = max_items {
                s.insert("maxItems".into(), (*n).into());
            }
            Value::Object(s)
        }
        FieldType::Object(fields) => object_schema(fields).map_err(|e| match e {
            DecodeError::BadField { field, reason } => DecodeError::BadField {
                field: format!("{name}.{field}"),
                reason,
            },
            other => other,
        })?,
    })
}
