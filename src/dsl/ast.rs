//! The syntax tree of a pipeline file: what was written, with a span on every node.
//!
//! Built by [`crate::dsl::parser`] from pest pairs (which never leave the parser) and consumed by
//! the analyzer in [`crate::plan`]. Nothing here knows what a field means.

use std::fmt;

use crate::dsl::span::Span;

/// One parsed file.
#[derive(Clone, Debug, Default)]
pub struct File {
    pub items: Vec<Item>,
    /// Names of declarations that had a syntax error (their uses are not reported again).
    pub broken: Vec<Ident>,
}

/// A top-level item.
#[derive(Clone, Debug)]
pub enum Item {
    Import(Import),
    Decl(Decl),
}

/// `import "other.vp"`.
#[derive(Clone, Debug)]
pub struct Import {
    pub path: StrLit,
    pub span: Span,
}

/// `KIND NAME { ... }` or `KIND NAME = value`.
#[derive(Clone, Debug)]
pub struct Decl {
    pub kind: DeclKind,
    pub kind_span: Span,
    pub name: Ident,
    pub body: Body,
    pub span: Span,
}

/// The declaration keywords.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeclKind {
    Pipeline,
    Param,
    Labels,
    Dataset,
    Split,
    Prompt,
    Model,
    Grammar,
    Eval,
    Finetune,
    Export,
    Report,
    /// `executor slurm { ... }`: run settings, not a stage.
    Executor,
}

impl DeclKind {
    pub(crate) fn from_keyword(word: &str) -> Option<DeclKind> {
        Some(match word {
            "pipeline" => DeclKind::Pipeline,
            "param" => DeclKind::Param,
            "labels" => DeclKind::Labels,
            "dataset" => DeclKind::Dataset,
            "split" => DeclKind::Split,
            "prompt" => DeclKind::Prompt,
            "model" => DeclKind::Model,
            "grammar" => DeclKind::Grammar,
            "eval" => DeclKind::Eval,
            "finetune" => DeclKind::Finetune,
            "export" => DeclKind::Export,
            "report" => DeclKind::Report,
            "executor" => DeclKind::Executor,
            _ => return None,
        })
    }

    pub(crate) fn keyword(self) -> &'static str {
        match self {
            DeclKind::Pipeline => "pipeline",
            DeclKind::Param => "param",
            DeclKind::Labels => "labels",
            DeclKind::Dataset => "dataset",
            DeclKind::Split => "split",
            DeclKind::Prompt => "prompt",
            DeclKind::Model => "model",
            DeclKind::Grammar => "grammar",
            DeclKind::Eval => "eval",
            DeclKind::Finetune => "finetune",
            DeclKind::Export => "export",
            DeclKind::Report => "report",
            DeclKind::Executor => "executor",
        }
    }
}

impl fmt::Display for DeclKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.keyword())
    }
}

/// What follows a declaration's name.
#[derive(Clone, Debug)]
pub enum Body {
    Block(Block),
    Value(Expr),
}

/// `{ field ... }`.
#[derive(Clone, Debug)]
pub struct Block {
    pub fields: Vec<Field>,
    pub span: Span,
}

/// `name = value` or `name { ... }`.
#[derive(Clone, Debug)]
pub struct Field {
    pub name: Ident,
    pub value: FieldValue,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum FieldValue {
    Expr(Expr),
    Block(Block),
}

impl FieldValue {}

/// A name as written.
#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A value.
#[derive(Clone, Debug)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum ExprKind {
    Str(StrLit),
    Int(i64),
    Float(f64),
    Bool(bool),
    List(Vec<Expr>),
    Map(Vec<Entry>),
    /// `a` or `a.b`.
    Path(Vec<Ident>),
    Call(Call),
    /// `json(args) { field: type, ... }`.
    Json {
        args: Vec<Arg>,
        fields: Vec<Entry>,
    },
    /// `value -> { key: label, ... }`.
    Mapping {
        base: Box<Expr>,
        entries: Vec<Entry>,
    },
    /// A literal the parser already reported (e.g. an int out of range); checked no further.
    Invalid,
}

impl ExprKind {
    /// What this value is, in words, for "expected X, found Y" messages.
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            ExprKind::Str(_) => "a string",
            ExprKind::Int(_) => "an integer",
            ExprKind::Float(_) => "a number",
            ExprKind::Bool(_) => "a boolean",
            ExprKind::List(_) => "a list",
            ExprKind::Map(_) => "a map",
            ExprKind::Path(_) => "a reference",
            ExprKind::Call(_) => "a call",
            ExprKind::Json { .. } => "a json grammar",
            ExprKind::Mapping { .. } => "a label mapping",
            ExprKind::Invalid => "an invalid value",
        }
    }
}

/// `callee(args)`.
#[derive(Clone, Debug)]
pub struct Call {
    pub callee: Ident,
    pub args: Vec<Arg>,
}

/// A positional (`key == None`) or keyword argument.
#[derive(Clone, Debug)]
pub struct Arg {
    pub key: Option<Ident>,
    pub value: Expr,
}

/// `key: value` in a map, with `?` after the value marking an optional JSON field.
#[derive(Clone, Debug)]
pub struct Entry {
    pub key: Key,
    pub value: Expr,
    pub optional: bool,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct Key {
    pub kind: KeyKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum KeyKind {
    Name(String),
    Str(String),
    Int(i64),
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::Name(s) | KeyKind::Str(s) => f.write_str(s),
            KeyKind::Int(i) => write!(f, "{i}"),
        }
    }
}

/// A string literal after escape processing / indentation stripping.
///
/// `origin` maps byte offsets of `value` back to the file: each `(value_offset, file_offset)`
/// pair starts a run where both advance together, so a template error on line 3 of a prompt
/// points at the right line of the pipeline file.
#[derive(Clone, Debug)]
pub struct StrLit {
    pub value: String,
    pub span: Span,
    pub origin: Vec<(u32, u32)>,
}

impl StrLit {
    /// The span (one character wide, or empty at the end) in the file of byte `offset` of `value`.
    pub(crate) fn span_of_offset(&self, offset: usize) -> Span {
        let offset = u32::try_from(offset).unwrap_or(u32::MAX);
        let file_offset = self
            .origin
            .iter()
            .rev()
            .find(|(v, _)| *v <= offset)
            .map_or(self.span.start, |(v, f)| f + (offset - v));
        let file_offset = file_offset.clamp(self.span.start, self.span.end);
        Span {
            file: self.span.file,
            start: file_offset,
            end: file_offset,
        }
    }
}
