//! Prompt templates: a `prompt` declaration's minijinja text rendered for one row.
//!
//! In scope of both templates: `labels` (the eval's or fine-tune's label list), the row's fields
//! (`row_id`, `label`, `image_id`) and every pipeline `param` by name. Undefined names are an
//! error rather than empty text, so a typo in a template cannot silently change every prompt.
//! The result becomes a [`Conversation`] (system turn, then a user turn with the image first
//! and the text second) that the model's own chat template renders.
//!
//! A template may come from someone else's pipeline file, so a render is bounded: minijinja's
//! fuel caps its work (and the memory it allocates), and the output is cut off at
//! [`MAX_PROMPT_BYTES`]. Either is an error naming the template, the row and the line.

use std::collections::BTreeMap;

use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value};

use serde::{Deserialize, Serialize};

use crate::model::chat::Conversation;

/// A `prompt` declaration's templates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTemplates {
    /// The system turn's template, if any.
    pub system: Option<String>,
    /// The user turn's template.
    pub user: String,
}

/// The row fields a template can read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowContext {
    pub row_id: String,
    pub image_id: String,
    /// The row's true label (available to templates, e.g. for few-shot or training prompts).
    pub label: Option<String>,
}

/// The rendered templates of one row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedPrompt {
    pub system: Option<String>,
    pub user: String,
}

impl RenderedPrompt {
    /// The conversation LFM2-VL sees: optional system turn, then the image and the user text.
    pub(crate) fn conversation(&self) -> Conversation {
        Conversation::image_question(self.system.as_deref(), &self.user)
    }
}

/// The work one template render may do, in minijinja fuel (about one instruction, or 64 bytes of
/// data made): a prompt that loops over a few thousand labels needs well under a tenth of it.
pub(crate) const TEMPLATE_FUEL: u64 = 1_000_000;

/// The longest rendered template: far past any model's context, short of filling memory.
pub(crate) const MAX_PROMPT_BYTES: usize = 1 << 20;

/// Errors rendering a prompt template.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("prompt template `{which}` does not compile")]
    Compile {
        which: &'static str,
        #[source]
        source: minijinja::Error,
    },
    #[error("prompt template `{which}` failed for row `{row_id}`")]
    Render {
        which: &'static str,
        row_id: String,
        #[source]
        source: minijinja::Error,
    },
    #[error(
        "prompt template `{which}` for row `{row_id}` stopped at line {line}: it exceeded its work \
         budget ({TEMPLATE_FUEL} steps); a loop or filter runs too long for a prompt"
    )]
    OutOfFuel {
        which: &'static str,
        row_id: String,
        line: usize,
    },
    #[error(
        "prompt template `{which}` for row `{row_id}` was stopped: its output exceeds the {} MiB \
         limit for a prompt",
        MAX_PROMPT_BYTES >> 20
    )]
    // minijinja gives a failed write no line, so this names none.
    TooLong { which: &'static str, row_id: String },
}

/// A sink that refuses to grow past [`MAX_PROMPT_BYTES`].
struct BoundedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_PROMPT_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("prompt too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders `prompt`'s templates for `row`.
///
/// `params` are the pipeline's params as JSON (as a prompt entry stores them).
pub fn render_prompt(
    prompt: &PromptTemplates,
    labels: &[String],
    row: &RowContext,
    params: &BTreeMap<String, serde_json::Value>,
) -> Result<RenderedPrompt, PromptError> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(TEMPLATE_FUEL));
    let mut scope: BTreeMap<String, Value> = params
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), param_value(v)?)))
        .collect();
    // Row fields and labels win over a param of the same name: they are what the row is.
    scope.insert("labels".to_owned(), Value::from(labels.to_vec()));
    scope.insert("row_id".to_owned(), Value::from(row.row_id.as_str()));
    scope.insert("image_id".to_owned(), Value::from(row.image_id.as_str()));
    scope.insert(
        "label".to_owned(),
        row.label.as_deref().map_or(Value::from(()), Value::from),
    );
    let ctx = Value::from(scope);
    let render = |which: &'static str, text: &str| -> Result<String, PromptError> {
        let template = env
            .template_from_str(text)
            .map_err(|source| PromptError::Compile { which, source })?;
        let mut out = BoundedOutput {
            bytes: Vec::new(),
            overflowed: false,
        };
        let rendered = template.render_captured_to(&ctx, &mut out).map(drop);
        match rendered {
            // minijinja writes only whole `str`s, so the bytes are utf-8.
            Ok(()) => Ok(String::from_utf8_lossy(&out.bytes).into_owned()),
            Err(source) => {
                let row_id = row.row_id.clone();
                Err(if out.overflowed {
                    PromptError::TooLong { which, row_id }
                } else if source.kind() == ErrorKind::OutOfFuel {
                    PromptError::OutOfFuel {
                        which,
                        row_id,
                        line: source.line().unwrap_or(1),
                    }
                } else {
                    PromptError::Render {
                        which,
                        row_id,
                        source,
                    }
                })
            }
        }
    };
    let system = prompt
        .system
        .as_deref()
        .map(|s| render("system", s))
        .transpose()?;
    let user = render("user", &prompt.user)?;
    Ok(RenderedPrompt { system, user })
}

/// A param's template value: booleans, integers, floats and strings as the DSL has them
/// (params are never anything else; other JSON is left out of scope).
fn param_value(value: &serde_json::Value) -> Option<Value> {
    Some(match value {
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::from(i),
            None => Value::from(n.as_f64()?),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::chat::{Part, Role};

    fn labels() -> Vec<String> {
        vec!["cat".to_owned(), "dog".to_owned()]
    }

    #[test]
    fn labels_row_fields_and_params_are_in_scope() {
        let prompt = PromptTemplates {
            system: Some("You are a {{ role }}.".to_owned()),
            user: "Row {{ row_id }} ({{ label }}):\n{% for l in labels %}- {{ l }}\n{% endfor %}Answer."
                .to_owned(),
        };
        let mut params = BTreeMap::new();
        params.insert("role".to_owned(), serde_json::json!("vet"));
        let row = RowContext {
            row_id: "cat/0001.jpg".to_owned(),
            image_id: "abc".to_owned(),
            label: Some("cat".to_owned()),
        };
        let rendered = render_prompt(&prompt, &labels(), &row, &params).unwrap();
        assert_eq!(rendered.system.as_deref(), Some("You are a vet."));
        assert_eq!(
            rendered.user,
            "Row cat/0001.jpg (cat):\n- cat\n- dog\nAnswer."
        );
        let conv = rendered.conversation();
        assert_eq!(conv.messages.len(), 2);
        assert_eq!(conv.messages[0].role, Role::System);
        assert_eq!(
            conv.messages[1].parts,
            vec![Part::Image, Part::Text(rendered.user.clone())]
        );
    }

    #[test]
    fn undefined_names_and_bad_syntax_are_errors() {
        let row = RowContext::default();
        let typo = PromptTemplates {
            system: None,
            user: "{{ lables }}".to_owned(),
        };
        let err = render_prompt(&typo, &labels(), &row, &BTreeMap::new()).unwrap_err();
        assert!(
            matches!(err, PromptError::Render { which: "user", .. }),
            "{err}"
        );
        let broken = PromptTemplates {
            system: Some("{% for %}".to_owned()),
            user: "ok".to_owned(),
        };
        let err = render_prompt(&broken, &labels(), &row, &BTreeMap::new()).unwrap_err();
        assert!(
            matches!(
                err,
                PromptError::Compile {
                    which: "system",
                    ..
                }
            ),
            "{err}"
        );
        let no_system = PromptTemplates {
            system: None,
            user: "x".to_owned(),
        };
        let rendered = render_prompt(&no_system, &labels(), &row, &BTreeMap::new()).unwrap();
        assert_eq!(rendered.conversation().messages.len(), 1);
    }

    /// Params come as JSON (how a prompt entry stores them) and render as the DSL wrote them:
    /// integers without a fraction, floats with one.
    #[test]
    fn json_params_render_as_written() {
        let params: BTreeMap<String, serde_json::Value> = [
            ("n", serde_json::json!(3)),
            ("t", serde_json::json!(0.5)),
            ("w", serde_json::json!(2.0)),
            ("s", serde_json::json!("x")),
            ("b", serde_json::json!(true)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let prompt = PromptTemplates {
            system: None,
            user: "{{ n }} {{ t }} {{ w }} {{ s }} {{ b }}".to_owned(),
        };
        let rendered = render_prompt(&prompt, &[], &RowContext::default(), &params).unwrap();
        // minijinja prints booleans the Python way (`True`), as it did for the typed params.
        assert_eq!(rendered.user, "3 0.5 2.0 x True");
    }
}
