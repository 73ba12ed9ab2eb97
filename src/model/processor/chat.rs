//! Conversations and the model's chat template, rendered like transformers' `apply_chat_template`.
//!
//! The template is the checkpoint's Jinja source (`chat_template.jinja`, or `chat_template` in
//! `tokenizer_config.json`), rendered with minijinja configured as transformers configures
//! Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls) plus the Python string and dict methods
//! Hub templates call (`strip`, `startswith`, `items`, ...), `raise_exception`, and the special
//! tokens (`bos_token`, `eos_token`, ...) from the tokenizer config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::file_error::FileError;
use minijinja::value::Value;
use minijinja::{Environment, Error as JinjaError, ErrorKind, State};
use serde_json::Value as Json;

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role name templates compare against.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One piece of a message: an image placeholder or text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Image,
    Text(String),
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub parts: Vec<Part>,
}

/// A conversation in the order the template renders it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

impl Conversation {
    /// An empty conversation.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a system turn.
    pub(crate) fn system(self, text: impl Into<String>) -> Self {
        self.push(Role::System, vec![Part::Text(text.into())])
    }

    /// Appends a user turn with one image first and the text second (what LFM2-VL was tuned on).
    pub fn user_image(self, text: impl Into<String>) -> Self {
        self.push(Role::User, vec![Part::Image, Part::Text(text.into())])
    }

    /// Appends an assistant turn.
    pub(crate) fn assistant(self, text: impl Into<String>) -> Self {
        self.push(Role::Assistant, vec![Part::Text(text.into())])
    }

    /// Appends a turn made of arbitrary parts.
    pub(crate) fn push(mut self, role: Role, parts: Vec<Part>) -> Self {
        self.messages.push(Message { role, parts });
        self
    }

    /// The standard classification prompt: optional system turn, then the image and question.
    pub fn image_question(system: Option<&str>, question: &str) -> Self {
        let conv = Self::new();
        let conv = match system {
            Some(s) => conv.system(s),
            None => conv,
        };
        conv.user_image(question)
    }

    /// Number of image parts, i.e. images the caller must supply.
    pub(crate) fn num_images(&self) -> usize {
        self.messages
            .iter()
            .flat_map(|m| &m.parts)
            .filter(|p| matches!(p, Part::Image))
            .count()
    }

    /// The `messages` list handed to the template. A message that is a single text part is a
    /// plain string (as people write system and assistant turns); anything else is a list of
    /// `{"type": "image"}` / `{"type": "text", "text": ...}` items, as transformers passes them.
    fn to_value(&self) -> Value {
        let messages: Vec<Value> = self
            .messages
            .iter()
            .map(|m| {
                let content = match m.parts.as_slice() {
                    [Part::Text(t)] => Value::from(t.as_str()),
                    parts => Value::from(
                        parts
                            .iter()
                            .map(|p| {
                                let mut item = BTreeMap::new();
                                match p {
                                    Part::Image => {
                                        item.insert("type", Value::from("image"));
                                    }
                                    Part::Text(t) => {
                                        item.insert("type", Value::from("text"));
                                        item.insert("text", Value::from(t.as_str()));
                                    }
                                }
                                Value::from(item)
                            })
                            .collect::<Vec<_>>(),
                    ),
                };
                let mut msg = BTreeMap::new();
                msg.insert("role", Value::from(m.role.as_str()));
                msg.insert("content", content);
                Value::from(msg)
            })
            .collect();
        Value::from(messages)
    }
}

/// Errors loading or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file could not be read.
    #[error(transparent)]
    File(#[from] FileError),
    /// `tokenizer_config.json` is not valid JSON.
    #[error("`{path}` is not valid JSON: {message}")]
    Json { path: PathBuf, message: String },
    /// Neither `chat_template.jinja` nor a `chat_template` key exists.
    #[error(
        "no chat template in `{0}` (expected `chat_template.jinja` or `chat_template` in `tokenizer_config.json`)"
    )]
    Missing(PathBuf),
    /// The template does not parse.
    #[error("chat template does not compile: {0}")]
    Compile(#[source] JinjaError),
    /// Rendering failed (including the template's own `raise_exception`).
    #[error("chat template failed to render: {0}")]
    Render(#[source] JinjaError),
}

/// Special token strings templates refer to (`{{ bos_token }}` ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

impl TemplateTokens {
    /// Reads `bos_token` etc. from `tokenizer_config.json`, then `special_tokens_map.json` for
    /// any still missing. Values may be strings or `{"content": ...}` objects.
    pub(crate) fn from_model_dir(dir: &Path) -> Result<Self, TemplateError> {
        let mut tokens = Self::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let Some(json) = read_json(&dir.join(name))? else {
                continue;
            };
            let get = |key: &str| token_string(json.get(key));
            tokens.bos_token = tokens.bos_token.or_else(|| get("bos_token"));
            tokens.eos_token = tokens.eos_token.or_else(|| get("eos_token"));
            tokens.pad_token = tokens.pad_token.or_else(|| get("pad_token"));
            tokens.unk_token = tokens.unk_token.or_else(|| get("unk_token"));
        }
        Ok(tokens)
    }
}

/// A special token entry: `"<s>"` or `{"content": "<s>", ...}`.
pub(crate) fn token_string(value: Option<&Json>) -> Option<String> {
    match value? {
        Json::String(s) => Some(s.clone()),
        Json::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Reads a JSON file, `None` when it does not exist.
pub(crate) fn read_json(path: &Path) -> Result<Option<Json>, TemplateError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(FileError::read(path))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TemplateError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template with its special tokens.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    tokens: TemplateTokens,
}

impl ChatTemplate {
    /// Compiles Jinja `source`.
    pub(crate) fn new(
        source: impl Into<String>,
        tokens: TemplateTokens,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks (see `_compile_jinja_template`).
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(TemplateError::Compile)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(python_method);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.into())
            .map_err(TemplateError::Compile)?;
        Ok(Self { env, tokens })
    }

    /// Loads the template of a model directory: `chat_template.jinja` if present, else the
    /// `chat_template` key of `tokenizer_config.json` (a string, or a list of named templates
    /// from which `default` is taken).
    pub fn from_model_dir(dir: &Path) -> Result<Self, TemplateError> {
        let tokens = TemplateTokens::from_model_dir(dir)?;
        let file = dir.join("chat_template.jinja");
        if file.is_file() {
            let source = std::fs::read_to_string(&file).map_err(FileError::read(&file))?;
            return Self::new(source, tokens);
        }
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let source = match config.as_ref().and_then(|c| c.get("chat_template")) {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Array(items)) => items
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_string),
            _ => None,
        };
        match source {
            Some(source) => Self::new(source, tokens),
            None => Err(TemplateError::Missing(dir.to_path_buf())),
        }
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends where the assistant's
    /// answer begins.
    pub fn render(
        &self,
        conversation: &Conversation,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(TemplateError::Compile)?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", conversation.to_value());
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        let t = &self.tokens;
        for (key, value) in [
            ("bos_token", &t.bos_token),
            ("eos_token", &t.eos_token),
            ("pad_token", &t.pad_token),
            ("unk_token", &t.unk_token),
        ] {
            if let Some(v) = value {
                ctx.insert(key, Value::from(v.as_str()));
            }
        }
        template
            .render(Value::from(ctx))
            .map_err(TemplateError::Render)
    }
}

/// Hub templates call this to reject malformed conversations.
fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// Python `str` and `dict` methods used by Hub chat templates, which Jinja2 exposes natively.
fn python_method(
    _state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, JinjaError> {
    if let Some(s) = value.as_str() {
        return string_method(s, method, args);
    }
    if value.kind() == minijinja::value::ValueKind::Map {
        return map_method(value, method, args);
    }
    Err(JinjaError::from(ErrorKind::UnknownMethod))
}

fn arg_str<'a>(args: &'a [Value], i: usize, method: &str) -> Result<Option<&'a str>, JinjaError> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| {
            JinjaError::new(
                ErrorKind::InvalidOperation,
                format!("`{method}` expects string arguments"),
            )
        }),
    }
}

fn string_method(s: &str, method: &str, args: &[Value]) -> Result<Value, JinjaError> {
    let chars = arg_str(args, 0, method)?;
    let strip_set = |c: char| match chars {
        Some(set) => set.contains(c),
        None => c.is_whitespace(),
    };
    let out = match method {
        "strip" => Value::from(s.trim_matches(strip_set)),
        "lstrip" => Value::from(s.trim_start_matches(strip_set)),
        "rstrip" => Value::from(s.trim_end_matches(strip_set)),
        "upper" => Value::from(s.to_uppercase()),
        "lower" => Value::from(s.to_lowercase()),
        "startswith" => Value::from(chars.is_some_and(|p| s.starts_with(p))),
        "endswith" => Value::from(chars.is_some_and(|p| s.ends_with(p))),
        "replace" => {
            let (Some(from), Some(to)) = (chars, arg_str(args, 1, method)?) else {
                return Err(JinjaError::new(
                    ErrorKind::MissingArgument,
                    "`replace` expects two strings",
                ));
            };
            Value::from(s.replace(from, to))
        }
        "split" => {
            let parts: Vec<Value> = match chars {
                Some(sep) if !sep.is_empty() => s.split(sep).map(Value::from).collect(),
                _ => s.split_whitespace().map(Value::from).collect(),
            };
            Value::from(parts)
        }
        "title" => Value::from(
            s.split(' ')
                .map(|w| {
                    let mut cs = w.chars();
                    match cs.next() {
                        Some(f) => f
                            .to_uppercase()
                            .chain(cs.flat_map(char::to_lowercase))
                            .collect(),
                        None => String::new(),
                    }
                })
                .collect::<Vec<String>>()
                .join(" "),
        ),
        _ => return Err(JinjaError::from(ErrorKind::UnknownMethod)),
    };
    Ok(out)
}

fn map_method(map: &Value, method: &str, args: &[Value]) -> Result<Value, JinjaError> {
    let keys = || -> Result<Vec<Value>, JinjaError> { Ok(map.try_iter()?.collect()) };
    match method {
        "keys" => Ok(Value::from(keys()?)),
        "values" => Ok(Value::from(
            keys()?
                .iter()
                .map(|k| map.get_item(k))
                .collect::<Result<Vec<_>, _>>()?,
        )),
        "items" => Ok(Value::from(
            keys()?
                .into_iter()
                .map(|k| {
                    let v = map.get_item(&k)?;
                    Ok(Value::from(vec![k, v]))
                })
                .collect::<Result<Vec<_>, JinjaError>>()?,
        )),
        "get" => {
            let key = args.first().ok_or_else(|| {
                JinjaError::new(ErrorKind::MissingArgument, "`get` expects a key")
            })?;
            let v = map.get_item(key)?;
            Ok(if v.is_undefined() {
                args.get(1).cloned().unwrap_or(Value::from(()))
            } else {
                v
            })
        }
        _ => Err(JinjaError::from(ErrorKind::UnknownMethod)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> TemplateTokens {
        TemplateTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            ..TemplateTokens::default()
        }
    }

    #[test]
    fn renders_like_lfm2_vl_template() -> Result<(), TemplateError> {
        // The LFM2-VL-450M template's structure (content as string or parts).
        let src = "{{bos_token}}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}\
{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}\
{% if content['type'] == 'image' %}{{ '<image>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}\
{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}";
        let t = ChatTemplate::new(src, tokens())?;
        let conv = Conversation::image_question(Some("Be brief."), "What is it?");
        assert_eq!(
            t.render(&conv, true)?,
            "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>What is it?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(conv.num_images(), 1);
        let trained = conv.assistant("A cat.");
        assert!(
            t.render(&trained, false)?
                .ends_with("<|im_start|>assistant\nA cat.<|im_end|>\n")
        );
        Ok(())
    }

    #[test]
    fn trim_blocks_and_python_methods() -> Result<(), TemplateError> {
        let src = "{% for m in messages %}\n  {{ m.content.strip().upper() }}|{{ m.content.startswith(' hi') }}\n{% endfor %}\
{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}";
        let t = ChatTemplate::new(src, tokens())?;
        let out = t.render(
            &Conversation::new().push(Role::User, vec![Part::Text(" hi there ".into())]),
            false,
        )?;
        assert_eq!(out, "  HI THERE|True\na=1");
        Ok(())
    }

    #[test]
    fn template_from_tokenizer_config_with_object_tokens() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>"}, "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}]}"#,
        )?;
        let t = ChatTemplate::from_model_dir(dir.path())?;
        assert_eq!(
            t.render(
                &Conversation::new().push(Role::User, vec![Part::Text("hi".into())]),
                false
            )?,
            "<s>hi"
        );
        let empty = tempfile::tempdir()?;
        assert!(matches!(
            ChatTemplate::from_model_dir(empty.path()),
            Err(TemplateError::Missing(_))
        ));
        Ok(())
    }

    #[test]
    fn raise_exception_and_bad_templates_are_errors() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", tokens()),
            Err(TemplateError::Compile(_))
        ));
        let t = ChatTemplate::new("{{ raise_exception('no system allowed') }}", tokens());
        let rendered = t.and_then(|t| t.render(&Conversation::new(), false));
        assert!(
            matches!(rendered, Err(TemplateError::Render(e)) if e.to_string().contains("no system allowed"))
        );
    }
}
