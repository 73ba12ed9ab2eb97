//! Output grammars: `one_of`, `json { ... }` types, regex, JSON Schema, Lark.

use std::path::Path;

use crate::dsl::ast::{Entry, Expr, ExprKind};
use crate::dsl::diagnostic::{Code, Diagnostic, did_you_mean};
use crate::dsl::span::Span;
use crate::plan::params::{
    GrammarParams, GrammarSpec, JsonField, JsonType, NodeParams, NodeRef, Whitespace,
};
use crate::read_limits::{ReadKind, read_text_bounded};

use super::{Analyzer, Args, Want};

impl<'f> Analyzer<'f, '_> {
    /// Builds a grammar and, for the kinds whose text the checker cannot read itself (regex, Lark,
    /// JSON Schema), compiles it once so a syntax error or an impossible grammar is reported here,
    /// with its position, rather than when an eval runs.
    pub(super) fn build_grammar(&mut self, expr: &'f Expr, dir: &Path) -> Option<GrammarParams> {
        let params = self.build_grammar_unchecked(expr, dir)?;
        if let Err(message) = compile_check(&params) {
            self.error(
                Diagnostic::error(
                    Code::BadValue,
                    format!("this grammar cannot be compiled: {message}"),
                )
                .at(expr.span)
                .with_hint("fix the regex, Lark or JSON Schema text"),
            );
            return None;
        }
        Some(params)
    }

    fn build_grammar_unchecked(&mut self, expr: &'f Expr, dir: &Path) -> Option<GrammarParams> {
        const EXPECTED: &str = "a grammar (`one_of(labels)`, `json { ... }`, `regex(\"...\")`, `json_schema(...)` or `lark(\"\"\"...\"\"\")`)";
        match &expr.kind {
            ExprKind::Json { args, fields } => {
                let whitespace = self.whitespace_arg(args)?;
                let schema = self.json_object(fields)?;
                Some(GrammarParams {
                    spec: GrammarSpec::Json { schema },
                    whitespace,
                })
            }
            ExprKind::Call(call) => {
                let (spec, whitespace) = match call.callee.name.as_str() {
                    "one_of" => {
                        let args = self.call_args(call, &["labels"], &["whitespace"], false)?;
                        let ws = self.whitespace_of(&args);
                        let ty = self
                            .required_arg(&args, "labels")
                            .and_then(|e| self.one_of_values(e));
                        let Some(JsonType::Enum { labels, values }) = ty else {
                            return None;
                        };
                        (Some(GrammarSpec::OneOf { labels, values }), ws)
                    }
                    "regex" => {
                        let args = self.call_args(call, &["pattern"], &["whitespace"], false)?;
                        let ws = self.whitespace_of(&args);
                        let pattern = self
                            .required_arg(&args, "pattern")
                            .and_then(|e| self.expect_str(e, "pattern"));
                        (pattern.map(|pattern| GrammarSpec::Regex { pattern }), ws)
                    }
                    "lark" => {
                        let args = self.call_args(call, &["grammar"], &["whitespace"], false)?;
                        let ws = self.whitespace_of(&args);
                        let grammar = self
                            .required_arg(&args, "grammar")
                            .and_then(|e| self.expect_str(e, "grammar"));
                        (grammar.map(|grammar| GrammarSpec::Lark { grammar }), ws)
                    }
                    "json_schema" => {
                        let args = self.call_args(call, &["schema"], &["whitespace"], false)?;
                        // Compact by default: flexible blanks let a weak model spend its token
                        // budget on tabs and newlines and never close the object.
                        let ws = match args.get("whitespace") {
                            Some(_) => self.whitespace_of(&args),
                            None => Some(Whitespace::Compact),
                        };
                        let spec = self
                            .required_arg(&args, "schema")
                            .and_then(|e| self.json_schema(e, dir));
                        (spec, ws)
                    }
                    other => {
                        self.error(
                            Diagnostic::error(
                                Code::WrongType,
                                format!("expected {EXPECTED}, found `{other}(...)`"),
                            )
                            .at(call.callee.span)
                            .with_hint_opt(did_you_mean(
                                other,
                                ["one_of", "json", "regex", "json_schema", "lark"],
                            )),
                        );
                        return None;
                    }
                };
                Some(GrammarParams {
                    spec: spec?,
                    whitespace: whitespace?,
                })
            }
            ExprKind::Invalid => None,
            _ => {
                self.wrong_type(expr, EXPECTED, "grammar");
                None
            }
        }
    }

    pub(super) fn whitespace_of(&mut self, args: &Args<'f>) -> Option<Whitespace> {
        match args.get("whitespace") {
            Some(e) => self
                .expect_word(e, "whitespace", &["flexible", "compact"])
                .map(|w| {
                    if w == "compact" {
                        Whitespace::Compact
                    } else {
                        Whitespace::Flexible
                    }
                }),
            None => Some(Whitespace::Flexible),
        }
    }

    /// The `(whitespace: ...)` arguments of `json(...) { ... }`.
    pub(super) fn whitespace_arg(
        &mut self,
        args: &'f [crate::dsl::ast::Arg],
    ) -> Option<Whitespace> {
        let mut ws = Some(Whitespace::Flexible);
        for arg in args {
            match &arg.key {
                Some(k) if k.name == "whitespace" => {
                    ws = self
                        .expect_word(&arg.value, "whitespace", &["flexible", "compact"])
                        .map(|w| {
                            if w == "compact" {
                                Whitespace::Compact
                            } else {
                                Whitespace::Flexible
                            }
                        });
                }
                Some(k) => {
                    self.error(
                        Diagnostic::error(
                            Code::UnknownField,
                            format!("unknown argument `{}` to `json`", k.name),
                        )
                        .at(k.span)
                        .with_hint_opt(
                            did_you_mean(&k.name, ["whitespace"])
                                .or(Some("`json` takes `whitespace`".to_owned())),
                        ),
                    );
                    ws = None;
                }
                None => {
                    self.error(
                        Diagnostic::error(
                            Code::UnknownField,
                            "`json(...)` takes only named arguments",
                        )
                        .at(arg.value.span)
                        .with_hint("e.g. `json(whitespace: \"compact\") { ... }`"),
                    );
                    ws = None;
                }
            }
        }
        ws
    }

    pub(super) fn json_object(&mut self, entries: &'f [Entry]) -> Option<JsonType> {
        let mut fields: Vec<JsonField> = Vec::new();
        let mut ok = true;
        for entry in entries {
            let name = entry.key.kind.to_string();
            if fields.iter().any(|f| f.name == name) {
                self.error(
                    Diagnostic::error(
                        Code::DuplicateField,
                        format!("json field `{name}` is declared twice"),
                    )
                    .at(entry.key.span),
                );
                ok = false;
                continue;
            }
            match self.json_type(&entry.value, &name) {
                Some(ty) => fields.push(JsonField {
                    name,
                    ty,
                    optional: entry.optional,
                }),
                None => ok = false,
            }
        }
        ok.then_some(JsonType::Object { fields })
    }

    pub(super) fn json_type(&mut self, expr: &'f Expr, field: &str) -> Option<JsonType> {
        const EXPECTED: &str = "a json type (`string`, `number`, `integer`, `boolean`, `one_of(labels)`, `[type]` or `{ ... }`)";
        match &expr.kind {
            ExprKind::Path(parts) if parts.len() == 1 => match parts[0].name.as_str() {
                "string" => Some(JsonType::String {
                    max_len: None,
                    pattern: None,
                }),
                "number" => Some(JsonType::Number {
                    min: None,
                    max: None,
                }),
                "integer" => Some(JsonType::Integer {
                    min: None,
                    max: None,
                }),
                "boolean" => Some(JsonType::Boolean),
                _ => {
                    // A bare label list means "one of these labels".
                    let node = self.expect_node(expr, Want::Labels, field)?;
                    let values = self.labels_values(&node);
                    Some(JsonType::Enum {
                        labels: Some(node),
                        values,
                    })
                }
            },
            ExprKind::Map(entries)
            | ExprKind::Json {
                fields: entries, ..
            } => self.json_object(entries),
            ExprKind::List(items) => {
                let [item] = items.as_slice() else {
                    self.error(
                        Diagnostic::error(
                            Code::WrongType,
                            format!(
                                "expected one item type in `[...]` for `{field}`, found {}",
                                items.len()
                            ),
                        )
                        .at(expr.span)
                        .with_hint("write `[string]` for a list of strings"),
                    );
                    return None;
                };
                let items = self.json_type(item, field)?;
                Some(JsonType::Array {
                    items: Box::new(items),
                    min_items: None,
                    max_items: None,
                })
            }
            ExprKind::Call(call) => match call.callee.name.as_str() {
                "one_of" => {
                    let args = self.call_args(call, &["labels"], &[], false)?;
                    self.required_arg(&args, "labels")
                        .and_then(|e| self.one_of_values(e))
                }
                "string" => {
                    let args = self.call_args(call, &[], &["max_len", "pattern"], false)?;
                    let max_len = match args.get("max_len") {
                        Some(e) => self.expect_count(e, "max_len", 1).map(Some),
                        None => Some(None),
                    };
                    let pattern = self.optional_str_arg(&args, "pattern");
                    Some(JsonType::String {
                        max_len: max_len?,
                        pattern: pattern?,
                    })
                }
                "integer" => {
                    let args = self.call_args(call, &[], &["min", "max"], false)?;
                    let min = match args.get("min") {
                        Some(e) => self.expect_int(e, "min").map(Some),
                        None => Some(None),
                    };
                    let max = match args.get("max") {
                        Some(e) => self.expect_int(e, "max").map(Some),
                        None => Some(None),
                    };
                    Some(JsonType::Integer {
                        min: min?,
                        max: max?,
                    })
                }
                "number" => {
                    let args = self.call_args(call, &[], &["min", "max"], false)?;
                    let min = match args.get("min") {
                        Some(e) => self.expect_f64(e, "min").map(Some),
                        None => Some(None),
                    };
                    let max = match args.get("max") {
                        Some(e) => self.expect_f64(e, "max").map(Some),
                        None => Some(None),
                    };
                    Some(JsonType::Number {
                        min: min?,
                        max: max?,
                    })
                }
                "array" => {
                    let args =
                        self.call_args(call, &["items"], &["min_items", "max_items"], false)?;
                    let items = self
                        .required_arg(&args, "items")
                        .and_then(|e| self.json_type(e, field));
                    let min_items = match args.get("min_items") {
                        Some(e) => self.expect_count(e, "min_items", 0).map(Some),
                        None => Some(None),
                    };
                    let max_items = match args.get("max_items") {
                        Some(e) => self.expect_count(e, "max_items", 1).map(Some),
                        None => Some(None),
                    };
                    Some(JsonType::Array {
                        items: Box::new(items?),
                        min_items: min_items?,
                        max_items: max_items?,
                    })
                }
                other => {
                    self.error(
                        Diagnostic::error(
                            Code::WrongType,
                            format!("expected {EXPECTED} for `{field}`, found `{other}(...)`"),
                        )
                        .at(call.callee.span)
                        .with_hint_opt(did_you_mean(
                            other,
                            ["one_of", "string", "integer", "number", "array"],
                        )),
                    );
                    None
                }
            },
            ExprKind::Invalid => None,
            _ => {
                self.wrong_type(expr, EXPECTED, field);
                None
            }
        }
    }

    /// `one_of(labels_ref)` or `one_of(["a", "b"])`.
    pub(super) fn one_of_values(&mut self, expr: &'f Expr) -> Option<JsonType> {
        if let ExprKind::List(_) = &expr.kind {
            let values = self.expect_str_list(expr, "one_of")?;
            if values.is_empty() {
                self.error(
                    Diagnostic::error(Code::BadValue, "`one_of` needs at least one value")
                        .at(expr.span),
                );
                return None;
            }
            return Some(JsonType::Enum {
                labels: None,
                values,
            });
        }
        let node = self.expect_node(expr, Want::Labels, "one_of")?;
        let values = self.labels_values(&node);
        Some(JsonType::Enum {
            labels: Some(node),
            values,
        })
    }

    pub(super) fn json_schema(&mut self, expr: &'f Expr, dir: &Path) -> Option<GrammarSpec> {
        if let ExprKind::Map(_) = &expr.kind {
            let schema = self.expr_to_json(expr)?;
            return Some(GrammarSpec::JsonSchema { schema, file: None });
        }
        let file = self.expect_local_path(expr, "schema", dir)?;
        let text = match read_text_bounded(&file.resolved, ReadKind::JsonSchema) {
            Ok(t) => t,
            Err(e) => {
                self.error(
                    Diagnostic::error(
                        Code::Io,
                        format!("cannot read json schema `{}`: {}", file.path, e),
                    )
                    .at(expr.span),
                );
                return None;
            }
        };
        let id = self.sources.add(&file.resolved, text.clone());
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(schema) => Some(GrammarSpec::JsonSchema {
                schema,
                file: Some(file),
            }),
            Err(e) => {
                let src = self.sources.get(id);
                let at = src.map_or(0, |s| s.line_start(e.line()) + e.column().saturating_sub(1));
                self.error(
                    Diagnostic::error(
                        Code::BadValue,
                        format!(
                            "json schema `{}` is not valid json: {}",
                            file.path,
                            strip_position(&e.to_string())
                        ),
                    )
                    .at(Span::new(id, at, at + 1))
                    .also(expr.span, "read from here"),
                );
                None
            }
        }
    }

    pub(super) fn expr_to_json(&mut self, expr: &Expr) -> Option<serde_json::Value> {
        use serde_json::Value;
        Some(match &expr.kind {
            ExprKind::Str(s) => Value::String(s.value.clone()),
            ExprKind::Int(i) => Value::from(*i),
            ExprKind::Float(f) => Value::from(*f),
            ExprKind::Bool(b) => Value::Bool(*b),
            ExprKind::List(items) => Value::Array(
                items
                    .iter()
                    .map(|i| self.expr_to_json(i))
                    .collect::<Option<Vec<_>>>()?,
            ),
            ExprKind::Map(entries) => {
                let mut map = serde_json::Map::new();
                for e in entries {
                    map.insert(e.key.kind.to_string(), self.expr_to_json(&e.value)?);
                }
                Value::Object(map)
            }
            _ => {
                self.wrong_type(
                    expr,
                    "a json value (string, number, boolean, list or map)",
                    "schema",
                );
                return None;
            }
        })
    }

    /// An eval's `output`: a grammar declaration or an inline grammar (an anonymous node).
    pub(super) fn expect_grammar(
        &mut self,
        expr: &'f Expr,
        owner: &str,
        dir: &Path,
    ) -> Option<NodeRef> {
        if let ExprKind::Path(_) = &expr.kind {
            return self.expect_node(expr, Want::Grammar, "output");
        }
        let params = self.build_grammar(expr, dir)?;
        let name = format!("{owner}/output");
        let id = self.push_node(name, NodeParams::Grammar(params), expr.span, true);
        Some(self.node_ref(id))
    }
}

/// serde_json appends " at line L column C"; the diagnostic shows the position itself.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// Compiles regex, Lark and JSON Schema grammars against a byte-level vocabulary: any text is
/// expressible in it, so a grammar that fails here fails with every tokenizer.
fn compile_check(params: &GrammarParams) -> Result<(), String> {
    use crate::decode::{CompiledGrammar, Vocab};
    use std::sync::{Arc, OnceLock};
    // Labels and `json {…}` grammars are built by vlmpipe and always compile.
    if let GrammarSpec::OneOf { .. } | GrammarSpec::Json { .. } = &params.spec {
        return Ok(());
    }
    let spec = params.decode_spec();
    static BYTES: OnceLock<Result<Arc<Vocab>, String>> = OnceLock::new();
    let vocab = BYTES.get_or_init(|| {
        let mut tokens: Vec<Vec<u8>> = vec![b"<eos>".to_vec()];
        tokens.extend((0..=255u8).map(|b| vec![b]));
        Vocab::from_token_bytes(tokens, 0, None)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    });
    let vocab = vocab.as_ref().map_err(Clone::clone)?;
    CompiledGrammar::compile(&spec, vocab)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
