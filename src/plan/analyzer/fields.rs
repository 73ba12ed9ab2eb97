//! Declaration bodies, block fields and call arguments: shape checks shared by every kind.

use std::collections::HashMap;

use crate::dsl::ast::{Block, Body, Call, Decl, DeclKind, Expr, Field, FieldValue};
use crate::dsl::diagnostic::{Code, Diagnostic, did_you_mean};
use crate::dsl::span::Span;

use super::{Analyzer, Args, Fields};

impl<'f> Analyzer<'f, '_> {
    pub(super) fn expect_value_body(&mut self, decl: &'f Decl) -> Option<&'f Expr> {
        match &decl.body {
            Body::Value(e) => Some(e),
            Body::Block(b) => {
                self.error(
                    Diagnostic::error(
                        Code::WrongType,
                        format!("`{}` declarations take `= value`, found a block", decl.kind),
                    )
                    .at(b.span)
                    .with_hint(value_example(decl.kind, &decl.name.name)),
                );
                None
            }
        }
    }

    pub(super) fn expect_block_body(&mut self, decl: &'f Decl) -> Option<&'f Block> {
        match &decl.body {
            Body::Block(b) => Some(b),
            Body::Value(e) => {
                self.error(
                    Diagnostic::error(
                        Code::WrongType,
                        format!(
                            "`{}` declarations take a block `{{ ... }}`, found `= value`",
                            decl.kind
                        ),
                    )
                    .at(e.span)
                    .with_hint(format!(
                        "write `{} {} {{ field = value ... }}`",
                        decl.kind, decl.name.name
                    )),
                );
                None
            }
        }
    }

    pub(super) fn fields(&mut self, block: &'f Block, decl: &Decl, allowed: &[&str]) -> Fields<'f> {
        let owner = format!("{} `{}`", decl.kind, decl.name.name);
        self.fields_of(block, owner, decl.name.span, allowed)
    }

    pub(super) fn fields_of(
        &mut self,
        block: &'f Block,
        owner: String,
        name_span: Span,
        allowed: &[&str],
    ) -> Fields<'f> {
        let mut map: HashMap<&'f str, &'f Field> = HashMap::new();
        for field in &block.fields {
            let name = field.name.name.as_str();
            if !allowed.contains(&name) {
                let hint = did_you_mean(name, allowed.iter().copied()).unwrap_or_else(|| {
                    format!(
                        "{owner} takes {}",
                        allowed
                            .iter()
                            .map(|a| format!("`{a}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                });
                self.error(
                    Diagnostic::error(
                        Code::UnknownField,
                        format!("unknown field `{name}` in {owner}"),
                    )
                    .at(field.name.span)
                    .with_hint(hint),
                );
                continue;
            }
            if let Some(first) = map.get(name) {
                let first_span = first.name.span;
                self.error(
                    Diagnostic::error(
                        Code::DuplicateField,
                        format!("field `{name}` is set twice in {owner}"),
                    )
                    .at_with(field.name.span, "set again here")
                    .also(first_span, "first set here"),
                );
                continue;
            }
            map.insert(name, field);
        }
        Fields {
            map,
            owner,
            name_span,
        }
    }

    pub(super) fn required_expr(&mut self, fields: &Fields<'f>, name: &str) -> Option<&'f Expr> {
        match fields.get(name) {
            Some(field) => match &field.value {
                FieldValue::Expr(e) => Some(e),
                FieldValue::Block(b) => {
                    self.error(
                        Diagnostic::error(
                            Code::WrongType,
                            format!(
                                "expected `{name} = value` in {}, found a block",
                                fields.owner
                            ),
                        )
                        .at(b.span),
                    );
                    None
                }
            },
            None => {
                self.error(
                    Diagnostic::error(
                        Code::MissingField,
                        format!("missing field `{name}` in {}", fields.owner),
                    )
                    .at(fields.name_span)
                    .with_hint(format!("add `{name} = ...` to the block")),
                );
                None
            }
        }
    }

    /// An optional `name = value` field (a nested block there is reported).
    pub(super) fn optional_expr(&mut self, fields: &Fields<'f>, name: &str) -> Option<&'f Expr> {
        let field = fields.get(name)?;
        match &field.value {
            FieldValue::Expr(e) => Some(e),
            FieldValue::Block(b) => {
                self.error(
                    Diagnostic::error(
                        Code::WrongType,
                        format!(
                            "expected `{name} = value` in {}, found a block",
                            fields.owner
                        ),
                    )
                    .at(b.span),
                );
                None
            }
        }
    }

    /// Maps a call's arguments to parameter names. `open` keeps unknown keywords in `extra`.
    pub(super) fn call_args(
        &mut self,
        call: &'f Call,
        positional: &[&'static str],
        keywords: &[&'static str],
        open: bool,
    ) -> Option<Args<'f>> {
        let callee = call.callee.name.as_str();
        let span = call.callee.span;
        let mut map: HashMap<&'static str, &'f Expr> = HashMap::new();
        let mut extra = Vec::new();
        let mut ok = true;
        let mut next_positional = 0;
        for arg in &call.args {
            let name: &'static str = match &arg.key {
                None => {
                    let Some(name) = positional.get(next_positional) else {
                        self.error(
                            Diagnostic::error(
                                Code::UnknownField,
                                format!(
                                    "too many arguments to `{callee}`: expected at most {} without a name",
                                    positional.len()
                                ),
                            )
                            .at(arg.value.span)
                            .with_hint(format!(
                                "name the argument, e.g. `{}: ...`",
                                keywords.first().copied().unwrap_or("name")
                            )),
                        );
                        ok = false;
                        continue;
                    };
                    next_positional += 1;
                    name
                }
                Some(key) => {
                    let found = positional
                        .iter()
                        .chain(keywords)
                        .find(|k| **k == key.name)
                        .copied();
                    match found {
                        Some(name) => name,
                        None if open => {
                            extra.push((key, &arg.value));
                            continue;
                        }
                        None => {
                            let all: Vec<&str> =
                                positional.iter().chain(keywords).copied().collect();
                            let hint =
                                did_you_mean(&key.name, all.iter().copied()).unwrap_or_else(|| {
                                    format!(
                                        "`{callee}` takes {}",
                                        all.iter()
                                            .map(|a| format!("`{a}`"))
                                            .collect::<Vec<_>>()
                                            .join(", ")
                                    )
                                });
                            self.error(
                                Diagnostic::error(
                                    Code::UnknownField,
                                    format!("unknown argument `{}` to `{callee}`", key.name),
                                )
                                .at(key.span)
                                .with_hint(hint),
                            );
                            ok = false;
                            continue;
                        }
                    }
                }
            };
            if map.insert(name, &arg.value).is_some() {
                self.error(
                    Diagnostic::error(
                        Code::DuplicateField,
                        format!("argument `{name}` is given twice to `{callee}`"),
                    )
                    .at(arg.value.span),
                );
                ok = false;
            }
        }
        ok.then_some(Args {
            map,
            extra,
            callee: &call.callee.name,
            span,
        })
    }

    pub(super) fn required_arg(&mut self, args: &Args<'f>, name: &str) -> Option<&'f Expr> {
        let found = args.get(name);
        if found.is_none() {
            self.error(
                Diagnostic::error(
                    Code::MissingField,
                    format!("missing argument `{name}` to `{}`", args.callee),
                )
                .at(args.span)
                .with_hint(format!("add `{name}: ...` to the call")),
            );
        }
        found
    }
}

fn value_example(kind: DeclKind, name: &str) -> String {
    let value = match kind {
        DeclKind::Labels => "[\"cat\", \"dog\"]",
        DeclKind::Split => "stratified(data, train: 0.9, test: 0.1)",
        DeclKind::Model => "hf(\"LiquidAI/LFM2-VL-450M\")",
        DeclKind::Grammar => "one_of(labels)",
        DeclKind::Param => "100",
        _ => "...",
    };
    format!("write `{kind} {name} = {value}`")
}
