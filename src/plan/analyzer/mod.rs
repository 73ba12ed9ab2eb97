//! Checking: AST of all files → typed [`Plan`], collecting every diagnostic on the way.
//!
//! Declarations are resolved on demand (depth-first, memoised), so nodes come out in
//! topological order and a reference loop is found as the resolver re-enters a declaration it is
//! still building. A declaration that fails yields no node; whatever depends on it is skipped
//! without further messages, so one mistake gives one diagnostic, not a cascade.

mod decls;
mod executor;
mod export;
mod fields;
mod grammar;
mod scalars;
mod stages;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::dsl::ast::{Call, Decl, DeclKind, Expr, ExprKind, Field, FieldValue, Ident};
use crate::dsl::diagnostic::{Code, Diagnostic, did_you_mean};
use crate::dsl::loader::{Loaded, LoadedFile};
use crate::dsl::parser::join_or;
use crate::dsl::span::{SourceMap, Span};
use crate::plan::params::{
    DataRef, GrammarSpec, JsonType, NodeParams, NodeRef, ParamValue, SampleParams, ShuffleParams,
};
use crate::plan::{CheckResult, Node, NodeId, PipelineSettings, Plan};
use crate::read_policy::ReadPolicy;

/// Checks loaded files (root first) into a plan; `root` names the pipeline when it declares none.
pub(crate) fn check(
    loaded: Loaded,
    root: &Path,
    overrides: &[(String, String)],
    reads: &ReadPolicy,
) -> CheckResult {
    let Loaded {
        mut sources,
        files,
        mut diagnostics,
    } = loaded;
    if files.is_empty() {
        return CheckResult {
            plan: None,
            diagnostics,
            sources,
        };
    }
    let declares_something = files.iter().any(|f| {
        f.ast
            .items
            .iter()
            .any(|i| matches!(i, crate::dsl::ast::Item::Decl(_)))
            || !f.ast.broken.is_empty()
    });
    if !declares_something && !diagnostics.iter().any(Diagnostic::is_error) {
        // An empty file (or only comments) would otherwise pass as a pipeline of 0 stages.
        diagnostics.push(
            Diagnostic::error(
                Code::NoDeclarations,
                format!("`{}` declares nothing", root.display()),
            )
            .at(Span::new(files[0].id, 0, 0))
            .with_hint(
                "a pipeline declares its datasets, prompts, models and evals \
                 (`dataset NAME { ... }`, see README.md); is this the right file?",
            ),
        );
        return CheckResult {
            plan: None,
            diagnostics,
            sources,
        };
    }
    let mut a = Analyzer::new(&files, &mut sources, reads.clone());
    let clean = !diagnostics.iter().any(Diagnostic::is_error);
    let settings = a.run(root, overrides, clean);
    let Analyzer {
        diags,
        nodes,
        files_read: local,
        ..
    } = a;
    diagnostics.extend(diags);
    let mut files_read: Vec<PathBuf> = sources.files().map(|(_, f)| f.path.clone()).collect();
    for path in local {
        if !files_read.contains(&path) {
            files_read.push(path);
        }
    }
    let plan = (!diagnostics.iter().any(Diagnostic::is_error)).then(|| Plan {
        settings,
        nodes,
        files: files_read,
        reads: reads.clone(),
    });
    CheckResult {
        plan,
        diagnostics,
        sources,
    }
}

/// The kinds of value a field can ask for by reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Model,
    /// What an eval runs: a model, a fine-tune, or an export of either.
    EvalModel,
    Prompt,
    Labels,
    Grammar,
    Eval,
}

impl Want {
    fn describe(self) -> &'static str {
        match self {
            Want::Model => "a model (a `model` or a `finetune`)",
            Want::EvalModel => "a model (a `model`, a `finetune` or an `export`)",
            Want::Prompt => "a prompt",
            Want::Labels => "a label list",
            Want::Grammar => "a grammar",
            Want::Eval => "an eval",
        }
    }

    fn accepts(self, kind: DeclKind) -> bool {
        matches!(
            (self, kind),
            (Want::Model, DeclKind::Model | DeclKind::Finetune)
                | (
                    Want::EvalModel,
                    DeclKind::Model | DeclKind::Finetune | DeclKind::Export
                )
                | (Want::Prompt, DeclKind::Prompt)
                | (Want::Labels, DeclKind::Labels)
                | (Want::Grammar, DeclKind::Grammar)
                | (Want::Eval, DeclKind::Eval)
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    Todo,
    Active,
    Done(Option<NodeId>),
}

struct DeclInfo<'f> {
    decl: &'f Decl,
    dir: &'f Path,
}

struct Analyzer<'f, 's> {
    files: &'f [LoadedFile],
    sources: &'s mut SourceMap,
    decls: Vec<DeclInfo<'f>>,
    by_name: HashMap<&'f str, usize>,
    params: BTreeMap<String, (ParamValue, Span)>,
    state: Vec<State>,
    stack: Vec<usize>,
    nodes: Vec<Node>,
    anonymous: HashMap<String, NodeId>,
    /// Local files the pipeline reads besides its sources (data, model folders).
    files_read: Vec<PathBuf>,
    /// Where the pipeline may read; every path it names is checked against it.
    reads: ReadPolicy,
    seed: u64,
    diags: Vec<Diagnostic>,
    templates: minijinja::Environment<'static>,
    /// Names of declarations with syntax errors.
    broken: Vec<String>,
    /// Params read by some value.
    used_params: Vec<String>,
}

/// A field's lookup table plus the declaration it belongs to (for messages).
struct Fields<'f> {
    map: HashMap<&'f str, &'f Field>,
    owner: String,
    name_span: Span,
}

impl<'f> Fields<'f> {
    fn get(&self, name: &str) -> Option<&'f Field> {
        self.map.get(name).copied()
    }

    fn expr(&self, name: &str) -> Option<&'f Expr> {
        match &self.get(name)?.value {
            FieldValue::Expr(e) => Some(e),
            FieldValue::Block(_) => None,
        }
    }
}

/// Call arguments by name (positional ones given their parameter's name).
struct Args<'f> {
    map: HashMap<&'static str, &'f Expr>,
    /// Keyword arguments of open-ended calls (`synthetic(...)` options).
    extra: Vec<(&'f Ident, &'f Expr)>,
    callee: &'f str,
    span: Span,
}

impl<'f> Args<'f> {
    fn get(&self, name: &str) -> Option<&'f Expr> {
        self.map.get(name).copied()
    }
}

impl<'f, 's> Analyzer<'f, 's> {
    fn new(files: &'f [LoadedFile], sources: &'s mut SourceMap, reads: ReadPolicy) -> Self {
        let templates = minijinja::Environment::new();
        Analyzer {
            files,
            sources,
            decls: Vec::new(),
            by_name: HashMap::new(),
            params: BTreeMap::new(),
            state: Vec::new(),
            stack: Vec::new(),
            nodes: Vec::new(),
            anonymous: HashMap::new(),
            files_read: Vec::new(),
            reads,
            seed: 0,
            diags: Vec::new(),
            templates,
            broken: Vec::new(),
            used_params: Vec::new(),
        }
    }

    fn error(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    /// Whether the pipeline may read `path` (the `what` written as `written` at `span`); an
    /// error naming where it resolves to and the flag that allows it if not.
    fn expect_readable(&mut self, path: &Path, written: &str, what: &str, span: Span) -> bool {
        match self.reads.check(path) {
            Ok(_) => true,
            Err(refused) => {
                self.error(
                    Diagnostic::error(
                        Code::Io,
                        format!("cannot read {what} `{written}`: it {}", refused.reason()),
                    )
                    .at_with(span, "outside the pipeline's folder")
                    .with_hint(refused.hint()),
                );
                false
            }
        }
    }

    fn run(
        &mut self,
        root: &Path,
        overrides: &[(String, String)],
        clean: bool,
    ) -> PipelineSettings {
        let mut pipeline: Option<&'f Decl> = None;
        let mut executor: Option<&'f Decl> = None;
        // Imported files first (the reverse of load order), so that a name declared both in an
        // import and in the importing file is reported where the importer redeclares it.
        for (file_index, file) in self.files.iter().enumerate().rev() {
            self.broken
                .extend(file.ast.broken.iter().map(|i| i.name.clone()));
            for item in &file.ast.items {
                let crate::dsl::ast::Item::Decl(decl) = item else {
                    continue;
                };
                if decl.kind == DeclKind::Pipeline {
                    // Only the root file's `pipeline` counts: an imported file's settings must
                    // not change the pipeline that imports it.
                    if file_index == 0 {
                        match pipeline {
                            Some(first) => self.error(
                                Diagnostic::error(
                                    Code::DuplicateName,
                                    "the `pipeline` declaration appears twice",
                                )
                                .at(decl.kind_span.to(decl.name.span))
                                .also(first.name.span, "first declared here")
                                .with_hint("a file declares at most one pipeline"),
                            ),
                            None => pipeline = Some(decl),
                        }
                    }
                    continue;
                }
                if decl.kind == DeclKind::Executor {
                    // Like `pipeline`: how the root file runs, never an import's say.
                    if file_index == 0 {
                        match executor {
                            Some(first) => self.error(
                                Diagnostic::error(
                                    Code::DuplicateName,
                                    "the `executor` declaration appears twice",
                                )
                                .at(decl.kind_span.to(decl.name.span))
                                .also(first.name.span, "first declared here")
                                .with_hint("a file declares at most one executor block"),
                            ),
                            None => executor = Some(decl),
                        }
                    }
                    continue;
                }
                if let Some(&first) = self.by_name.get(decl.name.name.as_str()) {
                    let first_span = self.decls[first].decl.name.span;
                    self.error(
                        Diagnostic::error(
                            Code::DuplicateName,
                            format!("duplicate name `{}`", decl.name.name),
                        )
                        .at_with(decl.name.span, "declared again here")
                        .also(first_span, "first declared here")
                        .with_hint(
                            "every declaration needs its own name, across imported files too",
                        ),
                    );
                    continue;
                }
                self.by_name.insert(&decl.name.name, self.decls.len());
                self.decls.push(DeclInfo {
                    decl,
                    dir: &file.dir,
                });
                self.state.push(State::Todo);
            }
        }
        self.collect_params();
        self.apply_overrides(overrides);
        let name = match pipeline {
            Some(decl) => {
                self.pipeline_seed(decl);
                decl.name.name.clone()
            }
            None => root.file_stem().map_or_else(
                || "pipeline".to_owned(),
                |s| s.to_string_lossy().into_owned(),
            ),
        };
        let executor = executor.and_then(|decl| self.build_executor(decl));
        for idx in 0..self.decls.len() {
            if self.decls[idx].decl.kind != DeclKind::Param {
                let span = self.decls[idx].decl.name.span;
                self.resolve(idx, span);
            }
        }
        // Uses that failed to resolve would make their targets look unused: only warn on a
        // pipeline that is otherwise clean.
        if clean && !self.diags.iter().any(Diagnostic::is_error) {
            self.warn_unused();
        }
        PipelineSettings {
            name,
            seed: self.seed,
            params: self
                .params
                .iter()
                .map(|(k, (v, _))| (k.clone(), v.clone()))
                .collect(),
            executor,
        }
    }

    /// Labels, prompts, grammars and params of the root file that nothing uses do nothing;
    /// shared (imported) files may well declare more than one pipeline needs.
    fn warn_unused(&mut self) {
        let Some(root) = self.files.first().map(|f| f.id) else {
            return;
        };
        let used: Vec<NodeId> = self.nodes.iter().flat_map(|n| n.inputs.clone()).collect();
        for idx in 0..self.decls.len() {
            let decl = self.decls[idx].decl;
            if decl.span.file != root {
                continue;
            }
            let unused = match (decl.kind, self.state[idx]) {
                (
                    DeclKind::Labels | DeclKind::Prompt | DeclKind::Grammar,
                    State::Done(Some(id)),
                ) => !used.contains(&id),
                (DeclKind::Param, _) => !self.used_params.contains(&decl.name.name),
                _ => false,
            };
            if unused {
                self.diags.push(
                    Diagnostic::warning(
                        Code::Unused,
                        format!(
                            "{} `{}` is declared but never used",
                            decl.kind, decl.name.name
                        ),
                    )
                    .at(decl.name.span)
                    .with_hint("use it in a stage, or remove it"),
                );
            }
        }
    }

    // ----- params and settings -----

    fn collect_params(&mut self) {
        for idx in 0..self.decls.len() {
            let decl = self.decls[idx].decl;
            if decl.kind != DeclKind::Param {
                continue;
            }
            self.state[idx] = State::Done(None);
            let Some(expr) = self.expect_value_body(decl) else {
                continue;
            };
            let value = match &expr.kind {
                ExprKind::Int(i) => ParamValue::Int(*i),
                ExprKind::Float(f) => ParamValue::Float(*f),
                ExprKind::Bool(b) => ParamValue::Bool(*b),
                ExprKind::Str(s) => ParamValue::Str(s.value.clone()),
                ExprKind::Invalid => continue,
                other => {
                    self.error(
                        Diagnostic::error(
                            Code::WrongType,
                            format!(
                                "expected a string, number or boolean as the default of param `{}`, found {}",
                                decl.name.name,
                                other.describe()
                            ),
                        )
                        .at(expr.span)
                        .with_hint("params are scalars that `--set name=value` can override"),
                    );
                    continue;
                }
            };
            self.params
                .insert(decl.name.name.clone(), (value, decl.name.span));
        }
    }

    fn apply_overrides(&mut self, overrides: &[(String, String)]) {
        for (name, raw) in overrides {
            let Some((current, span)) = self.params.get(name).cloned() else {
                let hint = did_you_mean(name, self.params.keys().map(String::as_str))
                    .unwrap_or_else(|| {
                        if self.params.is_empty() {
                            "this pipeline declares no params".to_owned()
                        } else {
                            format!(
                                "declared params: {}",
                                self.params
                                    .keys()
                                    .map(|k| format!("`{k}`"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        }
                    });
                self.error(
                    Diagnostic::error(
                        Code::BadOverride,
                        format!("unknown param `{name}` in `--set {name}={raw}`"),
                    )
                    .with_hint(hint),
                );
                continue;
            };
            let parsed = match current {
                ParamValue::Int(_) => raw.trim().parse::<i64>().ok().map(ParamValue::Int),
                ParamValue::Float(_) => raw
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .map(ParamValue::Float),
                ParamValue::Bool(_) => match raw.trim() {
                    "true" => Some(ParamValue::Bool(true)),
                    "false" => Some(ParamValue::Bool(false)),
                    _ => None,
                },
                ParamValue::Str(_) => Some(ParamValue::Str(raw.clone())),
            };
            match parsed {
                Some(value) => {
                    self.params.insert(name.clone(), (value, span));
                }
                None => self.error(
                    Diagnostic::error(
                        Code::BadOverride,
                        format!(
                            "cannot set param `{name}` to `{raw}`: expected {}",
                            current.type_name()
                        ),
                    )
                    .also(
                        span,
                        format!("`{name}` is declared here with default {current}"),
                    ),
                ),
            }
        }
    }

    fn pipeline_seed(&mut self, decl: &'f Decl) {
        let Some(block) = self.expect_block_body(decl) else {
            return;
        };
        let fields = self.fields(block, decl, &["seed"]);
        if let Some(e) = fields.expr("seed")
            && let Some(seed) = self.expect_count(e, "seed", 0)
        {
            self.seed = seed;
        }
    }

    // ----- resolution -----

    fn resolve(&mut self, idx: usize, at: Span) -> Option<NodeId> {
        match self.state[idx] {
            State::Done(result) => return result,
            State::Active => {
                let start = self.stack.iter().position(|i| *i == idx).unwrap_or(0);
                let path: Vec<String> = self.stack[start..]
                    .iter()
                    .chain(std::iter::once(&idx))
                    .map(|i| format!("`{}`", self.decls[*i].decl.name.name))
                    .collect();
                self.error(
                    Diagnostic::error(
                        Code::Cycle,
                        format!("dependency cycle: {}", path.join(" → ")),
                    )
                    .at_with(at, "this reference closes the cycle")
                    .with_hint("a stage cannot depend, directly or not, on its own output"),
                );
                // Every declaration of the loop fails, so the loop is reported once.
                return None;
            }
            State::Todo => {}
        }
        self.state[idx] = State::Active;
        self.stack.push(idx);
        let result = self.build(idx);
        self.stack.pop();
        self.state[idx] = State::Done(result);
        result
    }

    fn build(&mut self, idx: usize) -> Option<NodeId> {
        let decl = self.decls[idx].decl;
        let params = match decl.kind {
            DeclKind::Labels => NodeParams::Labels(self.build_labels(decl)?),
            DeclKind::Dataset => NodeParams::Dataset(self.build_dataset(idx)?),
            DeclKind::Split => NodeParams::Split(self.build_split(decl)?),
            DeclKind::Prompt => NodeParams::Prompt(self.build_prompt(idx)?),
            DeclKind::Model => NodeParams::Model(self.build_model(idx)?),
            DeclKind::Grammar => {
                let expr = self.expect_value_body(decl)?;
                NodeParams::Grammar(self.build_grammar(expr, self.decls[idx].dir)?)
            }
            DeclKind::Eval => NodeParams::Eval(self.build_eval(decl)?),
            DeclKind::Finetune => NodeParams::Finetune(self.build_finetune(decl)?),
            DeclKind::Export => NodeParams::Export(self.build_export(decl)?),
            DeclKind::Report => NodeParams::Report(self.build_report(decl)?),
            DeclKind::Param | DeclKind::Pipeline | DeclKind::Executor => return None,
        };
        Some(self.push_node(decl.name.name.clone(), params, decl.span, false))
    }

    fn push_node(
        &mut self,
        name: String,
        params: NodeParams,
        span: Span,
        anonymous: bool,
    ) -> NodeId {
        let id = NodeId(self.nodes.len());
        let inputs = references(&params);
        self.nodes.push(Node {
            id,
            name,
            params,
            inputs,
            span,
            anonymous,
        });
        id
    }

    fn node_ref(&self, id: NodeId) -> NodeRef {
        NodeRef {
            id,
            name: self.nodes[id.0].name.clone(),
        }
    }

    /// Looks a name up among declarations, reporting it when unknown.
    fn lookup(&mut self, ident: &Ident) -> Option<usize> {
        if let Some(&idx) = self.by_name.get(ident.name.as_str()) {
            return Some(idx);
        }
        if self.params.contains_key(&ident.name) || self.broken.contains(&ident.name) {
            return None;
        }
        let candidates: Vec<&str> = self
            .by_name
            .keys()
            .copied()
            .chain(self.params.keys().map(String::as_str))
            .collect();
        let hint = did_you_mean(&ident.name, candidates);
        self.error(
            Diagnostic::error(
                Code::UnknownReference,
                format!("unknown reference `{}`", ident.name),
            )
            .at_with(ident.span, "not declared in this file or its imports")
            .with_hint_opt(hint),
        );
        None
    }

    /// How a value reads in "found ..." (a declaration by kind and name, a literal by kind).
    fn found(&self, expr: &Expr) -> String {
        if let ExprKind::Path(parts) = &expr.kind
            && let Some(first) = parts.first()
        {
            if let Some((v, _)) = self.params.get(&first.name) {
                return format!("param `{}` ({})", first.name, v.type_name());
            }
            if let Some(&idx) = self.by_name.get(first.name.as_str()) {
                return format!("{} `{}`", self.decls[idx].decl.kind, first.name);
            }
            return format!("`{}`", first.name);
        }
        expr.kind.describe().to_owned()
    }

    fn wrong_type(&mut self, expr: &Expr, expected: &str, field: &str) {
        let found = self.found(expr);
        self.error(
            Diagnostic::error(
                Code::WrongType,
                format!("expected {expected} for `{field}`, found {found}"),
            )
            .at(expr.span),
        );
    }

    /// A reference to a declaration of the wanted kind, resolved to its node.
    fn expect_node(&mut self, expr: &'f Expr, want: Want, field: &str) -> Option<NodeRef> {
        let ExprKind::Path(parts) = &expr.kind else {
            if !matches!(expr.kind, ExprKind::Invalid) {
                self.wrong_type(expr, want.describe(), field);
            }
            return None;
        };
        let first = parts.first()?;
        let Some(idx) = self.lookup(first) else {
            if self.params.contains_key(&first.name) {
                self.wrong_type(expr, want.describe(), field);
            }
            return None;
        };
        if !want.accepts(self.decls[idx].decl.kind) {
            self.wrong_type(expr, want.describe(), field);
            return None;
        }
        if let Some(member) = parts.get(1) {
            self.error(
                Diagnostic::error(
                    Code::UnknownReference,
                    format!(
                        "{} `{}` has no member `{}`",
                        self.decls[idx].decl.kind, first.name, member.name
                    ),
                )
                .at(member.span)
                .with_hint("only splits have members (`my_split.train`)"),
            );
            return None;
        }
        let id = self.resolve(idx, expr.span)?;
        Some(self.node_ref(id))
    }

    /// A table: a dataset, a split member, or an inline `sample(...)` / `shuffle(...)`.
    fn expect_data(&mut self, expr: &'f Expr, field: &str) -> Option<DataRef> {
        const EXPECTED: &str =
            "data (a dataset, a split member such as `s.train`, `sample(...)` or `shuffle(...)`)";
        match &expr.kind {
            ExprKind::Path(parts) => {
                let first = parts.first()?;
                let Some(idx) = self.lookup(first) else {
                    if self.params.contains_key(&first.name) {
                        self.wrong_type(expr, EXPECTED, field);
                    }
                    return None;
                };
                let kind = self.decls[idx].decl.kind;
                match kind {
                    DeclKind::Dataset => {
                        if let Some(member) = parts.get(1) {
                            self.error(
                                Diagnostic::error(
                                    Code::UnknownReference,
                                    format!(
                                        "dataset `{}` has no member `{}`",
                                        first.name, member.name
                                    ),
                                )
                                .at(member.span)
                                .with_hint("only splits have members (`my_split.train`)"),
                            );
                            return None;
                        }
                        let id = self.resolve(idx, expr.span)?;
                        Some(DataRef {
                            node: self.node_ref(id),
                            member: None,
                        })
                    }
                    DeclKind::Split => {
                        let id = self.resolve(idx, expr.span)?;
                        let members: Vec<String> = match &self.nodes[id.0].params {
                            NodeParams::Split(s) => s.ratios.keys().cloned().collect(),
                            _ => Vec::new(),
                        };
                        let Some(member) = parts.get(1) else {
                            let list: Vec<String> = members
                                .iter()
                                .map(|m| format!("`{}.{m}`", first.name))
                                .collect();
                            self.error(
                                Diagnostic::error(
                                    Code::WrongType,
                                    format!(
                                        "expected {EXPECTED} for `{field}`, found split `{}`",
                                        first.name
                                    ),
                                )
                                .at(expr.span)
                                .with_hint(format!(
                                    "name one of its members: {}",
                                    join_or(&list.iter().map(String::as_str).collect::<Vec<_>>())
                                )),
                            );
                            return None;
                        };
                        if !members.contains(&member.name) {
                            let hint =
                                did_you_mean(&member.name, members.iter().map(String::as_str))
                                    .unwrap_or_else(|| {
                                        format!(
                                            "its members are {}",
                                            members
                                                .iter()
                                                .map(|m| format!("`{m}`"))
                                                .collect::<Vec<_>>()
                                                .join(", ")
                                        )
                                    });
                            self.error(
                                Diagnostic::error(
                                    Code::UnknownReference,
                                    format!(
                                        "split `{}` has no member `{}`",
                                        first.name, member.name
                                    ),
                                )
                                .at(member.span)
                                .with_hint(hint),
                            );
                            return None;
                        }
                        if let Some(extra) = parts.get(2) {
                            self.error(
                                Diagnostic::error(
                                    Code::UnknownReference,
                                    format!(
                                        "`{}.{}` has no member `{}`",
                                        first.name, member.name, extra.name
                                    ),
                                )
                                .at(extra.span),
                            );
                            return None;
                        }
                        Some(DataRef {
                            node: self.node_ref(id),
                            member: Some(member.name.clone()),
                        })
                    }
                    _ => {
                        self.wrong_type(expr, EXPECTED, field);
                        None
                    }
                }
            }
            ExprKind::Call(call) if matches!(call.callee.name.as_str(), "sample" | "shuffle") => {
                self.build_sample(call, expr.span)
            }
            ExprKind::Invalid => None,
            _ => {
                self.wrong_type(expr, EXPECTED, field);
                None
            }
        }
    }

    fn build_sample(&mut self, call: &'f Call, span: Span) -> Option<DataRef> {
        let is_sample = call.callee.name == "sample";
        let args = if is_sample {
            self.call_args(call, &["data", "n"], &["seed"], false)?
        } else {
            self.call_args(call, &["data"], &["seed"], false)?
        };
        let source = self
            .required_arg(&args, "data")
            .and_then(|e| self.expect_data(e, "data"));
        let n = if is_sample {
            self.required_arg(&args, "n")
                .and_then(|e| self.expect_count(e, "n", 1))
        } else {
            Some(0)
        };
        let seed = match args.get("seed") {
            Some(e) => self.expect_count(e, "seed", 0),
            None => Some(self.seed),
        };
        let (source, n, seed) = (source?, n?, seed?);
        let (name, params) = if is_sample {
            (
                format!("sample({},{n},{seed})", source.display_name()),
                NodeParams::Sample(SampleParams { source, n, seed }),
            )
        } else {
            (
                format!("shuffle({},{seed})", source.display_name()),
                NodeParams::Shuffle(ShuffleParams { source, seed }),
            )
        };
        let id = match self.anonymous.get(&name) {
            Some(&id) => id,
            None => {
                let id = self.push_node(name.clone(), params, span, true);
                self.anonymous.insert(name, id);
                id
            }
        };
        Some(DataRef {
            node: self.node_ref(id),
            member: None,
        })
    }
}

/// The node ids a node's parameters refer to, in order, without duplicates.
fn references(params: &NodeParams) -> Vec<NodeId> {
    let mut ids: Vec<NodeId> = Vec::new();
    let mut add = |r: &NodeRef| {
        if !ids.contains(&r.id) {
            ids.push(r.id);
        }
    };
    match params {
        NodeParams::Labels(_) | NodeParams::Prompt(_) | NodeParams::Model(_) => {}
        NodeParams::Dataset(d) => {
            if let Some(l) = &d.labels {
                add(&l.node);
            }
        }
        NodeParams::Split(s) => add(&s.source.node),
        NodeParams::Sample(s) => add(&s.source.node),
        NodeParams::Shuffle(s) => add(&s.source.node),
        NodeParams::Grammar(g) => match &g.spec {
            GrammarSpec::OneOf {
                labels: Some(l), ..
            } => add(l),
            GrammarSpec::Json { schema } => json_refs(schema, &mut add),
            _ => {}
        },
        NodeParams::Eval(e) => {
            add(&e.model);
            add(&e.data.node);
            add(&e.prompt);
            add(&e.labels.node);
            if let Some(o) = &e.output {
                add(o);
            }
        }
        NodeParams::Finetune(f) => {
            add(&f.base);
            add(&f.data.node);
            if let Some(d) = &f.eval_data {
                add(&d.node);
            }
            add(&f.prompt);
            if let Some(l) = &f.labels {
                add(&l.node);
            }
            if let Some(o) = &f.output {
                add(o);
            }
        }
        NodeParams::Export(x) => add(&x.model),
        NodeParams::Report(r) => r.compare.iter().for_each(add),
    }
    ids
}

fn json_refs(ty: &JsonType, add: &mut impl FnMut(&NodeRef)) {
    match ty {
        JsonType::Object { fields } => fields.iter().for_each(|f| json_refs(&f.ty, add)),
        JsonType::Array { items, .. } => json_refs(items, add),
        JsonType::Enum {
            labels: Some(l), ..
        } => add(l),
        _ => {}
    }
}
