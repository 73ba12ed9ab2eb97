//! Reading a model's answer back into a label (and fields), and writing the answer a fine-tune
//! should learn for a label.
//!
//! Parsing never fails: anything that is not an exact label (after trimming whitespace) or not
//! JSON holding a known label becomes [`Answer::Invalid`] with the raw text, so evaluation can count
//! it as wrong and report the invalid rate instead of dropping it. Under a regex, Lark or JSON
//! grammar an answer is valid only if that grammar accepts all of it (a full regex match, JSON
//! that validates against the schema), checked by [`TextCheck`].

use serde_json::{Map, Value};

use crate::decode::error::DecodeError;
use crate::decode::spec::{GrammarSpec, Whitespace};
use crate::decode::text_check::TextCheck;

/// A parsed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// One of the labels. `fields` holds the whole JSON object for JSON answers (label field
    /// included) and is empty for plain answers.
    Label {
        label: String,
        index: usize,
        fields: Map<String, Value>,
    },
    /// A JSON answer where no label was expected.
    Json(Value),
    /// A free-text answer where no label was expected (trimmed).
    Text(String),
    /// Unparsable or outside the label set: counted as wrong by evaluation.
    Invalid { raw: String, reason: InvalidReason },
}

impl Answer {
    /// The label, for a valid labelled answer.
    pub fn label(&self) -> Option<&str> {
        match self {
            Self::Label { label, .. } => Some(label),
            _ => None,
        }
    }

    pub fn is_valid(&self) -> bool {
        !matches!(self, Self::Invalid { .. })
    }
}

/// Why an answer is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidReason {
    /// A plain answer that is not one of the labels.
    NotALabel,
    /// Not JSON at all (the parser's message).
    NotJson(String),
    /// JSON, but not an object where an object with a label field was expected.
    NotAnObject,
    /// The object lacks the label field.
    MissingLabelField(String),
    /// The label field holds something other than a known label.
    UnknownLabel(Value),
    /// The output grammar does not accept the whole answer (a partial regex match, JSON that
    /// does not validate against its schema).
    NotInGrammar,
}

impl std::fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotALabel => write!(f, "not one of the labels"),
            Self::NotJson(e) => write!(f, "not JSON: {e}"),
            Self::NotAnObject => write!(f, "not a JSON object"),
            Self::MissingLabelField(field) => write!(f, "no `{field}` field"),
            Self::UnknownLabel(v) => write!(f, "`{v}` is not one of the labels"),
            Self::NotInGrammar => write!(f, "not accepted by the output grammar"),
        }
    }
}

/// How answers are read back: plain text or JSON, with or without a label set.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerParser {
    format: AnswerFormat,
    labels: Option<Vec<String>>,
    /// The grammar a valid answer must match in full (none for a choice: the label test is it).
    check: Option<TextCheck>,
}

#[derive(Debug, Clone, PartialEq)]
enum AnswerFormat {
    Plain,
    Json { label_field: Option<String> },
}

impl AnswerParser {
    /// The answer is exactly one of `labels`.
    pub fn choice(labels: Vec<String>) -> Self {
        Self {
            format: AnswerFormat::Plain,
            labels: Some(labels),
            check: None,
        }
    }

    /// The answer is JSON; with `label_field`, an object whose field of that name holds one of
    /// `labels`.
    pub(crate) fn json(label_field: Option<String>, labels: Option<Vec<String>>) -> Self {
        Self {
            format: AnswerFormat::Json { label_field },
            labels,
            check: None,
        }
    }

    /// Any text is a valid answer.
    pub(crate) fn text() -> Self {
        Self {
            format: AnswerFormat::Plain,
            labels: None,
            check: None,
        }
    }

    /// The parser for answers under `spec`. `labels` overrides the labels the spec names (the
    /// evaluation's label list); regex and Lark answers are read as plain labels when given some.
    pub fn for_grammar(
        spec: &GrammarSpec,
        label_field: Option<&str>,
        labels: Option<&[String]>,
    ) -> Self {
        let labels = labels
            .map(<[String]>::to_vec)
            .or_else(|| spec.labels(label_field));
        match spec {
            GrammarSpec::Choice { .. } => Self::choice_or_text(labels),
            GrammarSpec::Regex(_) | GrammarSpec::Lark(_) => Self {
                check: Some(TextCheck::new(spec)),
                ..Self::choice_or_text(labels)
            },
            GrammarSpec::Json { schema, .. } | GrammarSpec::JsonSchema(schema) => {
                // Without a named field, a schema whose only required field is an enum names it.
                let field = match label_field {
                    Some(f) => Some(f.to_string()),
                    None => single_label_field(schema, None).ok(),
                };
                let labels = labels.or_else(|| spec.labels(field.as_deref()));
                Self {
                    check: Some(TextCheck::new(spec)),
                    ..Self::json(field, labels)
                }
            }
        }
    }

    fn choice_or_text(labels: Option<Vec<String>>) -> Self {
        match labels {
            Some(labels) => Self::choice(labels),
            None => Self::text(),
        }
    }

    pub fn parse(&self, raw: &str) -> Answer {
        let invalid = |reason| Answer::Invalid {
            raw: raw.to_string(),
            reason,
        };
        let text = raw.trim();
        if let Some(check) = &self.check
            && !check.accepts(text)
            && !check.accepts(raw)
        {
            // JSON that does not even parse says so; anything else is simply not the grammar's.
            if matches!(self.format, AnswerFormat::Json { .. })
                && let Err(e) = serde_json::from_str::<Value>(text)
            {
                return invalid(InvalidReason::NotJson(e.to_string()));
            }
            return invalid(InvalidReason::NotInGrammar);
        }
        match &self.format {
            AnswerFormat::Plain => match &self.labels {
                None => Answer::Text(text.to_string()),
                Some(labels) => match labels.iter().position(|l| l == text) {
                    Some(index) => Answer::Label {
                        label: labels[index].clone(),
                        index,
                        fields: Map::new(),
                    },
                    None => invalid(InvalidReason::NotALabel),
                },
            },
            AnswerFormat::Json { label_field } => {
                let value: Value = match serde_json::from_str(text) {
                    Ok(v) => v,
                    Err(e) => return invalid(InvalidReason::NotJson(e.to_string())),
                };
                let Some(field) = label_field else {
                    return Answer::Json(value);
                };
                let Value::Object(fields) = value else {
                    return invalid(InvalidReason::NotAnObject);
                };
                let Some(found) = fields.get(field) else {
                    return invalid(InvalidReason::MissingLabelField(field.clone()));
                };
                let index = match (&self.labels, found.as_str()) {
                    (Some(labels), Some(s)) => labels.iter().position(|l| l == s),
                    // Without a label set any string names a label; there is no index to give.
                    (None, Some(_)) => None,
                    (_, None) => return invalid(InvalidReason::UnknownLabel(found.clone())),
                };
                match (index, found.as_str()) {
                    (Some(index), Some(s)) => Answer::Label {
                        label: s.to_string(),
                        index,
                        fields,
                    },
                    (None, Some(_)) if self.labels.is_none() => Answer::Json(Value::Object(fields)),
                    _ => invalid(InvalidReason::UnknownLabel(found.clone())),
                }
            }
        }
    }
}

/// The answer text a fine-tune should learn for `label` under `spec`: the label itself for a
/// choice, `{"pred_class": "dog"}` for a JSON object whose only required field is the label enum
/// (`{"pred_class":"dog"}` with compact whitespace). Other grammars have no answer determined by
/// the label alone.
pub fn answer_text(
    spec: &GrammarSpec,
    label: &str,
    label_field: Option<&str>,
) -> Result<String, DecodeError> {
    match spec {
        GrammarSpec::Choice { labels } => {
            if labels.iter().any(|l| l == label) {
                Ok(label.to_string())
            } else {
                Err(DecodeError::UnknownLabel(label.to_string()))
            }
        }
        GrammarSpec::Json { schema, whitespace } => {
            json_answer(schema, *whitespace, label, label_field)
        }
        GrammarSpec::JsonSchema(schema) => {
            json_answer(schema, Whitespace::Compact, label, label_field)
        }
        GrammarSpec::Regex(_) | GrammarSpec::Lark(_) => Err(DecodeError::NoCanonicalAnswer {
            reason: "only choice and JSON object grammars determine an answer from a label"
                .to_string(),
        }),
    }
}

/// The label field of a JSON object schema whose single required property is a string enum.
pub(crate) fn single_label_field(
    schema: &Value,
    label_field: Option<&str>,
) -> Result<String, DecodeError> {
    let no = |reason: String| Err(DecodeError::NoCanonicalAnswer { reason });
    let Some(props) = schema["properties"].as_object() else {
        return no("the schema is not an object with properties".to_string());
    };
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let field = match (label_field, required.as_slice()) {
        (Some(f), _) => f.to_string(),
        (None, [only]) => (*only).to_string(),
        (None, _) => {
            return no("name the label field: the schema has no single required field".to_string());
        }
    };
    if let Some(other) = required.iter().find(|r| **r != field) {
        return no(format!(
            "field `{other}` is required too, and a label alone does not give its value"
        ));
    }
    if !props.get(&field).is_some_and(|p| p["enum"].is_array()) {
        return no(format!("field `{field}` is not an enum of labels"));
    }
    Ok(field)
}

fn json_answer(
    schema: &Value,
    whitespace: Whitespace,
    label: &str,
    label_field: Option<&str>,
) -> Result<String, DecodeError> {
    let field = single_label_field(schema, label_field)?;
    let known = schema["properties"][&field]["enum"]
        .as_array()
        .is_some_and(|values| values.iter().any(|v| v.as_str() == Some(label)));
    if !known {
        return Err(DecodeError::UnknownLabel(label.to_string()));
    }
    let key = Value::String(field).to_string();
    let value = Value::String(label.to_string()).to_string();
    Ok(match whitespace {
        // The spacing models (and people) write by default, e.g. Python's `json.dumps`.
        Whitespace::Flexible => format!("{{{key}: {value}}}"),
        Whitespace::Compact => format!("{{{key}:{value}}}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::spec::{FieldType, JsonField};

    fn labels() -> Vec<String> {
        vec!["cat".to_string(), "dog".to_string()]
    }

    #[test]
    fn plain_answers_match_exactly_after_trimming() {
        let p = AnswerParser::choice(labels());
        assert_eq!(p.parse(" dog\n").label(), Some("dog"));
        assert!(!p.parse("Dog").is_valid());
        assert!(!p.parse("pug").is_valid());
        assert!(!p.parse("").is_valid());
        match p.parse("pug") {
            Answer::Invalid { raw, reason } => {
                assert_eq!(raw, "pug");
                assert_eq!(reason, InvalidReason::NotALabel);
            }
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn json_answers_keep_other_fields() {
        let p = AnswerParser::json(Some("pred_class".to_string()), Some(labels()));
        let a = p.parse(r#"{"pred_class": "cat", "confidence": 0.9}"#);
        match a {
            Answer::Label {
                label,
                index,
                fields,
            } => {
                assert_eq!((label.as_str(), index), ("cat", 0));
                assert_eq!(fields["confidence"], serde_json::json!(0.9));
            }
            other => panic!("expected a label, got {other:?}"),
        }
        assert!(matches!(
            p.parse(r#"{"pred_class": "pug"}"#),
            Answer::Invalid {
                reason: InvalidReason::UnknownLabel(_),
                ..
            }
        ));
        assert!(matches!(
            p.parse(r#"{"class": "cat"}"#),
            Answer::Invalid {
                reason: InvalidReason::MissingLabelField(_),
                ..
            }
        ));
        assert!(matches!(
            p.parse(r#"{"pred_class": "cat""#),
            Answer::Invalid {
                reason: InvalidReason::NotJson(_),
                ..
            }
        ));
        assert!(matches!(
            p.parse(r#"["cat"]"#),
            Answer::Invalid {
                reason: InvalidReason::NotAnObject,
                ..
            }
        ));
    }

    #[test]
    fn answer_texts_follow_whitespace_mode() {
        let fields = [JsonField::required("pred_class", FieldType::Enum(labels()))];
        let flexible = GrammarSpec::json_object(&fields, Whitespace::Flexible).unwrap();
        let compact = GrammarSpec::json_object(&fields, Whitespace::Compact).unwrap();
        assert_eq!(
            answer_text(&flexible, "dog", None).unwrap(),
            r#"{"pred_class": "dog"}"#
        );
        assert_eq!(
            answer_text(&compact, "dog", None).unwrap(),
            r#"{"pred_class":"dog"}"#
        );
        assert!(matches!(
            answer_text(&flexible, "pug", None),
            Err(DecodeError::UnknownLabel(_))
        ));
        let two = [
            JsonField::required("pred_class", FieldType::Enum(labels())),
            JsonField::required(
                "confidence",
                FieldType::Number {
                    minimum: None,
                    maximum: None,
                },
            ),
        ];
        let two = GrammarSpec::json_object(&two, Whitespace::Flexible).unwrap();
        assert!(matches!(
            answer_text(&two, "dog", Some("pred_class")),
            Err(DecodeError::NoCanonicalAnswer { .. })
        ));
        let choice = GrammarSpec::choice(labels());
        assert_eq!(answer_text(&choice, "cat", None).unwrap(), "cat");
    }
}
