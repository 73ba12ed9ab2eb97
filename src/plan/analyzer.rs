//! Checking: AST of all files → typed [`Plan`], collecting every diagnostic on the way.
//!
//! Declarations are resolved on demand (depth-first, memoised), so nodes come out in
//! topological order and a reference loop is found as the resolver re-enters a declaration it is
//! still building. A declaration that fails yields no node; whatever depends on it is skipped
//! without further messages, so one mistake gives one diagnostic, not a cascade.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::dsl::ast::{
    Block, Body, Call, Decl, DeclKind, Entry, Expr, ExprKind, Field, FieldValue, Ident, KeyKind,
    StrLit,
};
use crate::dsl::diagnostic::{Code, Diagnostic, did_you_mean};
use crate::dsl::loader::{Loaded, LoadedFile, lowercase_io};
use crate::dsl::parser::join_or;
use crate::dsl::span::{SourceMap, Span};
use crate::plan::params::{
    DataRef, DataSource, DatasetParams, Dtype, EvalParams, FinetuneParams, GrammarParams,
    GrammarSpec, JsonField, JsonType, KeepFilter, LFM2_TEXT_TARGETS, LFM2_VL_OTHER_TARGETS,
    LabelMapEntry, LabelSet, LabelSpec, LabelsParams, LocalPath, LoraParams, LossOn, MapKey,
    ModelParams, ModelSource, NodeParams, NodeRef, ParamValue, PromptParams, ReportParams,
    SampleParams, Schedule, Scoring, ShuffleParams, SplitMethod, SplitParams, Whitespace,
};
use crate::plan::{CheckResult, Node, NodeId, PipelineSettings, Plan};

/// Checks loaded files (root first) into a plan; `root` names the pipeline when it declares none.
pub(crate) fn check(loaded: Loaded, root: &Path, overrides: &[(String, String)]) -> CheckResult {
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
    let mut a = Analyzer::new(&files, &mut sources);
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
    Prompt,
    Labels,
    Grammar,
    Eval,
}

impl Want {
    fn describe(self) -> &'static str {
        match self {
            Want::Model => "a model (a `model` or a `finetune`)",
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
    fn new(files: &'f [LoadedFile], sources: &'s mut SourceMap) -> Self {
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

    fn run(
        &mut self,
        root: &Path,
        overrides: &[(String, String)],
        clean: bool,
    ) -> PipelineSettings {
        let mut pipeline: Option<&'f Decl> = None;
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
            DeclKind::Report => NodeParams::Report(self.build_report(decl)?),
            DeclKind::Param | DeclKind::Pipeline => return None,
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

    // ----- bodies, fields, arguments -----

    fn expect_value_body(&mut self, decl: &'f Decl) -> Option<&'f Expr> {
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

    fn expect_block_body(&mut self, decl: &'f Decl) -> Option<&'f Block> {
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

    fn fields(&mut self, block: &'f Block, decl: &Decl, allowed: &[&str]) -> Fields<'f> {
        let owner = format!("{} `{}`", decl.kind, decl.name.name);
        self.fields_of(block, owner, decl.name.span, allowed)
    }

    fn fields_of(
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

    fn required_expr(&mut self, fields: &Fields<'f>, name: &str) -> Option<&'f Expr> {
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
    fn optional_expr(&mut self, fields: &Fields<'f>, name: &str) -> Option<&'f Expr> {
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
    fn call_args(
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

    fn required_arg(&mut self, args: &Args<'f>, name: &str) -> Option<&'f Expr> {
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

    // ----- scalars -----

    /// A literal scalar, or the value of a param named by a bare reference.
    fn scalar(&mut self, expr: &Expr) -> Option<ParamValue> {
        match &expr.kind {
            ExprKind::Int(i) => Some(ParamValue::Int(*i)),
            ExprKind::Float(f) => Some(ParamValue::Float(*f)),
            ExprKind::Bool(b) => Some(ParamValue::Bool(*b)),
            ExprKind::Str(s) => Some(ParamValue::Str(s.value.clone())),
            ExprKind::Path(parts) if parts.len() == 1 => {
                let value = self.params.get(&parts[0].name).map(|(v, _)| v.clone());
                if value.is_some() && !self.used_params.contains(&parts[0].name) {
                    self.used_params.push(parts[0].name.clone());
                }
                value
            }
            _ => None,
        }
    }

    /// Reports a scalar of the wrong type, or an unknown name where a scalar was expected.
    fn scalar_mismatch(&mut self, expr: &Expr, expected: &str, field: &str) {
        if let ExprKind::Path(parts) = &expr.kind
            && let Some(first) = parts.first()
            && !self.by_name.contains_key(first.name.as_str())
            && !self.params.contains_key(&first.name)
            && !self.broken.contains(&first.name)
        {
            self.lookup(first);
            return;
        }
        if !matches!(expr.kind, ExprKind::Invalid) {
            self.wrong_type(expr, expected, field);
        }
    }

    fn expect_int(&mut self, expr: &Expr, field: &str) -> Option<i64> {
        match self.scalar(expr) {
            Some(ParamValue::Int(i)) => Some(i),
            _ => {
                self.scalar_mismatch(expr, "an integer", field);
                None
            }
        }
    }

    /// A non-negative integer of at least `min`.
    fn expect_count(&mut self, expr: &Expr, field: &str, min: i64) -> Option<u64> {
        let i = self.expect_int(expr, field)?;
        if i < min {
            self.error(
                Diagnostic::error(
                    Code::BadValue,
                    format!("`{field}` must be at least {min}, found {i}"),
                )
                .at(expr.span),
            );
            return None;
        }
        u64::try_from(i).ok()
    }

    fn expect_u32(&mut self, expr: &Expr, field: &str, min: i64) -> Option<u32> {
        let n = self.expect_count(expr, field, min)?;
        match u32::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                self.error(
                    Diagnostic::error(Code::BadValue, format!("`{field}` is too large, found {n}"))
                        .at(expr.span)
                        .with_hint(format!("`{field}` must be below {}", u32::MAX)),
                );
                None
            }
        }
    }

    fn expect_f64(&mut self, expr: &Expr, field: &str) -> Option<f64> {
        match self.scalar(expr) {
            Some(ParamValue::Float(f)) => Some(f),
            Some(ParamValue::Int(i)) => Some(i as f64),
            _ => {
                self.scalar_mismatch(expr, "a number", field);
                None
            }
        }
    }

    /// A number in `lo..=hi` (`lo` excluded when `lo_open`).
    fn expect_f64_in(
        &mut self,
        expr: &Expr,
        field: &str,
        lo: f64,
        hi: f64,
        lo_open: bool,
    ) -> Option<f64> {
        let f = self.expect_f64(expr, field)?;
        let low_ok = if lo_open { f > lo } else { f >= lo };
        if !low_ok || f > hi {
            let range = match (lo_open, hi.is_finite()) {
                (true, true) => format!("above {lo} and at most {hi}"),
                (false, true) => format!("between {lo} and {hi}"),
                (true, false) => format!("above {lo}"),
                (false, false) => format!("at least {lo}"),
            };
            self.error(
                Diagnostic::error(
                    Code::BadValue,
                    format!("`{field}` must be {range}, found {f}"),
                )
                .at(expr.span),
            );
            return None;
        }
        Some(f)
    }

    fn expect_str(&mut self, expr: &Expr, field: &str) -> Option<String> {
        match self.scalar(expr) {
            Some(ParamValue::Str(s)) => Some(s),
            _ => {
                self.scalar_mismatch(expr, "a string", field);
                None
            }
        }
    }

    fn expect_bool(&mut self, expr: &Expr, field: &str) -> Option<bool> {
        match self.scalar(expr) {
            Some(ParamValue::Bool(b)) => Some(b),
            _ => {
                self.scalar_mismatch(expr, "`true` or `false`", field);
                None
            }
        }
    }

    /// One of a fixed set of words, written bare (`rgb_only`) or quoted (`"rgb_only"`).
    fn expect_word(
        &mut self,
        expr: &Expr,
        field: &str,
        choices: &[&'static str],
    ) -> Option<&'static str> {
        let word = match &expr.kind {
            ExprKind::Path(parts) if parts.len() == 1 => Some(parts[0].name.clone()),
            ExprKind::Str(s) => Some(s.value.clone()),
            _ => None,
        };
        let expected = join_or(
            &choices
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        let Some(word) = word else {
            self.wrong_type(expr, &expected, field);
            return None;
        };
        if let Some(c) = choices.iter().find(|c| **c == word) {
            return Some(c);
        }
        self.error(
            Diagnostic::error(
                Code::BadValue,
                format!("expected {expected} for `{field}`, found `{word}`"),
            )
            .at(expr.span)
            .with_hint_opt(did_you_mean(&word, choices.iter().copied())),
        );
        None
    }

    fn expect_str_list(&mut self, expr: &Expr, field: &str) -> Option<Vec<String>> {
        let ExprKind::List(items) = &expr.kind else {
            self.wrong_type(expr, "a list of strings", field);
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for item in items {
            match self.expect_str(item, field) {
                Some(s) => out.push(s),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn expect_local_path(&mut self, expr: &Expr, field: &str, dir: &Path) -> Option<LocalPath> {
        let path = self.expect_str(expr, field)?;
        if path.is_empty() {
            self.error(
                Diagnostic::error(Code::BadValue, format!("`{field}` must not be empty"))
                    .at(expr.span),
            );
            return None;
        }
        let resolved = dir.join(&path);
        if !resolved.exists() {
            self.diags.push(
                Diagnostic::warning(
                    Code::BadValue,
                    format!("local path `{path}` does not exist (yet)"),
                )
                .at(expr.span)
                .with_hint(format!(
                    "paths are relative to the pipeline file; looked for `{}`",
                    resolved.display()
                )),
            );
        }
        if !self.files_read.contains(&resolved) {
            self.files_read.push(resolved.clone());
        }
        Some(LocalPath { path, resolved })
    }

    // ----- declarations -----

    fn build_labels(&mut self, decl: &'f Decl) -> Option<LabelsParams> {
        let expr = self.expect_value_body(decl)?;
        let ExprKind::List(items) = &expr.kind else {
            self.wrong_type(expr, "a list of strings", &decl.name.name);
            return None;
        };
        if items.is_empty() {
            self.error(
                Diagnostic::error(
                    Code::BadValue,
                    format!("labels `{}` is empty", decl.name.name),
                )
                .at(expr.span)
                .with_hint("a classifier needs at least two labels"),
            );
            return None;
        }
        let mut values: Vec<String> = Vec::new();
        let mut ok = true;
        for item in items {
            let Some(value) = self.expect_str(item, &decl.name.name) else {
                ok = false;
                continue;
            };
            if value.trim().is_empty() {
                self.error(
                    Diagnostic::error(Code::BadValue, "a label must not be empty").at(item.span),
                );
                ok = false;
            } else if values.contains(&value) {
                self.error(
                    Diagnostic::error(
                        Code::DuplicateName,
                        format!("label `{value}` appears twice in `{}`", decl.name.name),
                    )
                    .at(item.span),
                );
                ok = false;
            }
            values.push(value);
        }
        ok.then_some(LabelsParams { values })
    }

    fn labels_values(&self, node: &NodeRef) -> Vec<String> {
        match &self.nodes[node.id.0].params {
            NodeParams::Labels(l) => l.values.clone(),
            _ => Vec::new(),
        }
    }

    fn expect_label_set(&mut self, expr: &'f Expr, field: &str) -> Option<LabelSet> {
        let node = self.expect_node(expr, Want::Labels, field)?;
        let values = self.labels_values(&node);
        Some(LabelSet { node, values })
    }

    fn build_dataset(&mut self, idx: usize) -> Option<DatasetParams> {
        let decl = self.decls[idx].decl;
        let dir = self.decls[idx].dir;
        let block = self.expect_block_body(decl)?;
        let f = self.fields(
            block,
            decl,
            &[
                "source",
                "image",
                "label",
                "labels",
                "keep",
                "max_image_size",
                "drop",
            ],
        );
        let source = self
            .required_expr(&f, "source")
            .and_then(|e| self.build_source(e, dir));
        let image = match self.optional_expr(&f, "image") {
            Some(e) => self.expect_str(e, "image"),
            None => Some("image".to_owned()),
        };
        let labels = match self.optional_expr(&f, "labels") {
            Some(e) => self.expect_label_set(e, "labels").map(Some),
            None => Some(None),
        };
        let label = self
            .required_expr(&f, "label")
            .and_then(|e| self.build_label_spec(e, labels.as_ref().and_then(|l| l.as_ref())));
        let keep = match self.optional_expr(&f, "keep") {
            Some(e) => self.expect_word(e, "keep", &["all", "rgb_only"]).map(|w| {
                if w == "rgb_only" {
                    KeepFilter::RgbOnly
                } else {
                    KeepFilter::All
                }
            }),
            None => Some(KeepFilter::All),
        };
        let max_image_size = match self.optional_expr(&f, "max_image_size") {
            Some(e) => self.expect_u32(e, "max_image_size", 1).map(Some),
            None => Some(None),
        };
        let drop = match self.optional_expr(&f, "drop") {
            Some(e) => self.expect_str_list(e, "drop"),
            None => Some(Vec::new()),
        };
        Some(DatasetParams {
            source: source?,
            image: image?,
            label: label?,
            labels: labels?,
            keep: keep?,
            max_image_size: max_image_size?,
            drop: drop?,
        })
    }

    fn build_source(&mut self, expr: &'f Expr, dir: &Path) -> Option<DataSource> {
        const EXPECTED: &str = "a data source (`hf(...)`, `parquet(...)`, `folder(...)`, `csv(...)`, `jsonl(...)` or `synthetic(...)`)";
        let ExprKind::Call(call) = &expr.kind else {
            self.wrong_type(expr, EXPECTED, "source");
            return None;
        };
        match call.callee.name.as_str() {
            "hf" => {
                let args =
                    self.call_args(call, &["repo"], &["split", "revision", "config"], false)?;
                let repo = self
                    .required_arg(&args, "repo")
                    .and_then(|e| self.expect_repo(e));
                let split = match args.get("split") {
                    Some(e) => self.expect_str(e, "split"),
                    None => Some("train".to_owned()),
                };
                let revision = self.optional_str_arg(&args, "revision")?;
                let config = self.optional_str_arg(&args, "config")?;
                Some(DataSource::Hf {
                    repo: repo?,
                    split: split?,
                    revision,
                    config,
                })
            }
            kind @ ("parquet" | "folder" | "csv" | "jsonl") => {
                let args = self.call_args(call, &["path"], &[], false)?;
                let path = self
                    .required_arg(&args, "path")
                    .and_then(|e| self.expect_local_path(e, "path", dir))?;
                Some(match kind {
                    "parquet" => DataSource::Parquet { path },
                    "folder" => DataSource::Folder { path },
                    "csv" => DataSource::Csv { path },
                    _ => DataSource::Jsonl { path },
                })
            }
            "synthetic" => {
                let args = self.call_args(call, &[], &["kind", "n", "seed"], true)?;
                let kind = self
                    .required_arg(&args, "kind")
                    .and_then(|e| self.expect_str(e, "kind"));
                let n = self
                    .required_arg(&args, "n")
                    .and_then(|e| self.expect_count(e, "n", 1));
                let seed = match args.get("seed") {
                    Some(e) => self.expect_count(e, "seed", 0),
                    None => Some(self.seed),
                };
                let mut options = BTreeMap::new();
                let mut ok = true;
                for (key, value) in &args.extra {
                    match self.scalar(value) {
                        Some(v) => {
                            options.insert(key.name.clone(), v);
                        }
                        None => {
                            self.scalar_mismatch(value, "a string, number or boolean", &key.name);
                            ok = false;
                        }
                    }
                }
                if !ok {
                    return None;
                }
                Some(DataSource::Synthetic {
                    kind: kind?,
                    n: n?,
                    seed: seed?,
                    options,
                })
            }
            other => {
                let hint = did_you_mean(
                    other,
                    ["hf", "parquet", "folder", "csv", "jsonl", "synthetic"],
                );
                self.error(
                    Diagnostic::error(
                        Code::WrongType,
                        format!("expected {EXPECTED} for `source`, found `{other}(...)`"),
                    )
                    .at(call.callee.span)
                    .with_hint_opt(hint),
                );
                None
            }
        }
    }

    fn optional_str_arg(&mut self, args: &Args<'f>, name: &str) -> Option<Option<String>> {
        match args.get(name) {
            Some(e) => self.expect_str(e, name).map(Some),
            None => Some(None),
        }
    }

    /// `owner/name` as the Hub spells repositories.
    fn expect_repo(&mut self, expr: &Expr) -> Option<String> {
        let repo = self.expect_str(expr, "repo")?;
        let mut parts = repo.split('/');
        let valid = matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty());
        if !valid {
            self.error(
                Diagnostic::error(
                    Code::BadValue,
                    format!("expected a hub repository `owner/name`, found `{repo}`"),
                )
                .at(expr.span)
                .with_hint("e.g. `hf(\"microsoft/cats_vs_dogs\")`"),
            );
            return None;
        }
        Some(repo)
    }

    fn build_label_spec(&mut self, expr: &'f Expr, labels: Option<&LabelSet>) -> Option<LabelSpec> {
        match &expr.kind {
            ExprKind::Str(s) => Some(LabelSpec {
                column: s.value.clone(),
                mapping: None,
            }),
            ExprKind::Mapping { base, entries } => {
                let column = self.expect_str(base, "label")?;
                let mapping = self.build_mapping(entries, expr.span, labels)?;
                Some(LabelSpec {
                    column,
                    mapping: Some(mapping),
                })
            }
            _ => {
                self.wrong_type(
                    expr,
                    "a column name, optionally with a mapping (`\"labels\" -> { 0: \"cat\" }`)",
                    "label",
                );
                None
            }
        }
    }

    fn build_mapping(
        &mut self,
        entries: &'f [Entry],
        span: Span,
        labels: Option<&LabelSet>,
    ) -> Option<Vec<LabelMapEntry>> {
        if entries.is_empty() {
            self.error(
                Diagnostic::error(Code::LabelMapping, "the label mapping is empty").at(span),
            );
            return None;
        }
        let mut out: Vec<LabelMapEntry> = Vec::new();
        let mut ok = true;
        for entry in entries {
            let key = match &entry.key.kind {
                KeyKind::Int(i) => MapKey::Int(*i),
                KeyKind::Str(s) | KeyKind::Name(s) => MapKey::Str(s.clone()),
            };
            let Some(label) = self.expect_str(&entry.value, "label") else {
                ok = false;
                continue;
            };
            if out.iter().any(|e| e.key == key) {
                self.error(
                    Diagnostic::error(
                        Code::LabelMapping,
                        format!("value `{}` is mapped twice", entry.key.kind),
                    )
                    .at(entry.key.span),
                );
                ok = false;
                continue;
            }
            if let Some(set) = labels
                && !set.values.contains(&label)
            {
                self.error(
                    Diagnostic::error(
                        Code::LabelMapping,
                        format!("label `{label}` is not in labels `{}`", set.node.name),
                    )
                    .at(entry.value.span)
                    .with_hint_opt(did_you_mean(&label, set.values.iter().map(String::as_str))),
                );
                ok = false;
            }
            out.push(LabelMapEntry { key, label });
        }
        if let Some(set) = labels {
            let missing: Vec<String> = set
                .values
                .iter()
                .filter(|v| !out.iter().any(|e| &e.label == *v))
                .map(|v| format!("`{v}`"))
                .collect();
            if !missing.is_empty() {
                self.error(
                    Diagnostic::error(
                        Code::LabelMapping,
                        format!(
                            "the label mapping misses {} of labels `{}`",
                            missing.join(", "),
                            set.node.name
                        ),
                    )
                    .at(span)
                    .with_hint(
                        "map a column value to every label, or remove the label from the list",
                    ),
                );
                ok = false;
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        ok.then_some(out)
    }

    fn build_split(&mut self, decl: &'f Decl) -> Option<SplitParams> {
        let expr = self.expect_value_body(decl)?;
        let ExprKind::Call(call) = &expr.kind else {
            self.wrong_type(expr, "`stratified(...)` or `random(...)`", &decl.name.name);
            return None;
        };
        let method = match call.callee.name.as_str() {
            "stratified" => SplitMethod::Stratified,
            "random" => SplitMethod::Random,
            other => {
                self.error(
                    Diagnostic::error(Code::WrongType, format!("expected `stratified(...)` or `random(...)` for split `{}`, found `{other}(...)`", decl.name.name))
                        .at(call.callee.span)
                        .with_hint_opt(did_you_mean(other, ["stratified", "random"])),
                );
                return None;
            }
        };
        let args = self.call_args(
            call,
            &["data"],
            &["train", "test", "validation", "seed"],
            false,
        )?;
        let source = self
            .required_arg(&args, "data")
            .and_then(|e| self.expect_data(e, "data"));
        let seed = match args.get("seed") {
            Some(e) => self.expect_count(e, "seed", 0),
            None => Some(self.seed),
        };
        let mut ratios = BTreeMap::new();
        let mut ok = true;
        for member in ["train", "test", "validation"] {
            if let Some(e) = args.get(member) {
                match self.expect_f64_in(e, member, 0.0, 1.0, true) {
                    Some(r) => {
                        ratios.insert(member.to_owned(), r);
                    }
                    None => ok = false,
                }
            }
        }
        if ok {
            let sum: f64 = ratios.values().sum();
            if ratios.is_empty() {
                self.error(
                    Diagnostic::error(
                        Code::SplitRatios,
                        format!("split `{}` names no members", decl.name.name),
                    )
                    .at(expr.span)
                    .with_hint("give ratios, e.g. `train: 0.9, test: 0.1`"),
                );
                ok = false;
            } else if (sum - 1.0).abs() > 1e-6 {
                let shown: Vec<String> = ratios.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                self.error(
                    Diagnostic::error(
                        Code::SplitRatios,
                        format!(
                            "split ratios of `{}` sum to {}, expected 1",
                            decl.name.name,
                            round6(sum)
                        ),
                    )
                    .at(expr.span)
                    .with_hint(format!(
                        "ratios are fractions of the data ({})",
                        shown.join(", ")
                    )),
                );
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        Some(SplitParams {
            source: source?,
            method,
            ratios,
            seed: seed?,
        })
    }

    fn build_prompt(&mut self, idx: usize) -> Option<PromptParams> {
        let decl = self.decls[idx].decl;
        let dir = self.decls[idx].dir;
        let block = self.expect_block_body(decl)?;
        let f = self.fields(block, decl, &["system", "user"]);
        let system = match self.optional_expr(&f, "system") {
            Some(e) => self.expect_template(e, "system", dir).map(Some),
            None => Some(None),
        };
        let user = self
            .required_expr(&f, "user")
            .and_then(|e| self.expect_template(e, "user", dir));
        Some(PromptParams {
            system: system?,
            user: user?,
        })
    }

    /// A template string (inline or `file("path")`) that compiles with minijinja.
    fn expect_template(&mut self, expr: &Expr, field: &str, dir: &Path) -> Option<String> {
        let lit: StrLit = match &expr.kind {
            ExprKind::Str(s) => s.clone(),
            ExprKind::Call(call) if call.callee.name == "file" => {
                let [arg] = call.args.as_slice() else {
                    self.error(
                        Diagnostic::error(Code::WrongType, "`file(...)` takes one path")
                            .at(expr.span),
                    );
                    return None;
                };
                let rel = self.expect_str(&arg.value, field)?;
                let path = dir.join(&rel);
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        let len = text.len();
                        let id = self.sources.add(&path, text.clone());
                        StrLit {
                            value: text,
                            span: Span::new(id, 0, len),
                            origin: vec![(0, 0)],
                        }
                    }
                    Err(e) => {
                        self.error(
                            Diagnostic::error(
                                Code::Io,
                                format!("cannot read template `{rel}`: {}", lowercase_io(&e)),
                            )
                            .at(arg.value.span)
                            .with_hint(format!(
                                "paths are relative to the pipeline file; looked for `{}`",
                                path.display()
                            )),
                        );
                        return None;
                    }
                }
            }
            _ => {
                if let Some(ParamValue::Str(s)) = self.scalar(expr) {
                    return Some(s);
                }
                self.wrong_type(expr, "a template string or `file(\"path\")`", field);
                return None;
            }
        };
        if let Err(e) = self.templates.template_from_str(&lit.value) {
            let line = e.line().unwrap_or(1);
            let (start, end) = line_bounds(&lit.value, line);
            let span = lit.span_of_offset(start).to(lit.span_of_offset(end));
            let detail = e
                .detail()
                .map_or_else(|| e.kind().to_string(), str::to_owned);
            self.error(
                Diagnostic::error(
                    Code::Template,
                    format!("template `{field}` does not compile: {}", detail.to_lowercase()),
                )
                .at_with(span, format!("line {line} of the template"))
                .with_hint("templates use minijinja (jinja2) syntax: `{{ value }}`, `{% for x in xs %}...{% endfor %}`"),
            );
            return None;
        }
        Some(lit.value)
    }

    fn build_model(&mut self, idx: usize) -> Option<ModelParams> {
        let decl = self.decls[idx].decl;
        let dir = self.decls[idx].dir;
        let expr = self.expect_value_body(decl)?;
        const EXPECTED: &str = "a model source (`hf(...)`, `local(...)` or `init(...)`)";
        let ExprKind::Call(call) = &expr.kind else {
            self.wrong_type(expr, EXPECTED, &decl.name.name);
            return None;
        };
        let (source, dtype) = match call.callee.name.as_str() {
            "hf" => {
                let args = self.call_args(call, &["repo"], &["revision", "dtype"], false)?;
                let repo = self
                    .required_arg(&args, "repo")
                    .and_then(|e| self.expect_repo(e));
                let revision = match args.get("revision") {
                    Some(e) => self.expect_str(e, "revision"),
                    None => Some("main".to_owned()),
                };
                let dtype = self.dtype_arg(&args);
                (
                    repo.zip(revision)
                        .map(|(repo, revision)| ModelSource::Hf { repo, revision }),
                    dtype,
                )
            }
            "local" => {
                let args = self.call_args(call, &["path"], &["dtype"], false)?;
                let path = self
                    .required_arg(&args, "path")
                    .and_then(|e| self.expect_local_path(e, "path", dir));
                (
                    path.map(|path| ModelSource::Local { path }),
                    self.dtype_arg(&args),
                )
            }
            "init" => {
                let args = self.call_args(call, &[], &["preset", "seed", "dtype"], false)?;
                let preset = self
                    .required_arg(&args, "preset")
                    .and_then(|e| self.expect_str(e, "preset"));
                let seed = match args.get("seed") {
                    Some(e) => self.expect_count(e, "seed", 0),
                    None => Some(self.seed),
                };
                (
                    preset
                        .zip(seed)
                        .map(|(preset, seed)| ModelSource::Init { preset, seed }),
                    self.dtype_arg(&args),
                )
            }
            other => {
                self.error(
                    Diagnostic::error(
                        Code::WrongType,
                        format!(
                            "expected {EXPECTED} for model `{}`, found `{other}(...)`",
                            decl.name.name
                        ),
                    )
                    .at(call.callee.span)
                    .with_hint_opt(did_you_mean(other, ["hf", "local", "init"])),
                );
                return None;
            }
        };
        Some(ModelParams {
            source: source?,
            dtype: dtype?,
        })
    }

    fn dtype_arg(&mut self, args: &Args<'f>) -> Option<Dtype> {
        let Some(e) = args.get("dtype") else {
            return Some(Dtype::F32);
        };
        self.expect_word(e, "dtype", &["f32", "f16", "bf16"])
            .map(|w| match w {
                "f16" => Dtype::F16,
                "bf16" => Dtype::Bf16,
                _ => Dtype::F32,
            })
    }

    // ----- grammars -----

    fn build_grammar(&mut self, expr: &'f Expr, dir: &Path) -> Option<GrammarParams> {
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
                        let ws = self.whitespace_of(&args);
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

    fn whitespace_of(&mut self, args: &Args<'f>) -> Option<Whitespace> {
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
    fn whitespace_arg(&mut self, args: &'f [crate::dsl::ast::Arg]) -> Option<Whitespace> {
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

    fn json_object(&mut self, entries: &'f [Entry]) -> Option<JsonType> {
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

    fn json_type(&mut self, expr: &'f Expr, field: &str) -> Option<JsonType> {
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
    fn one_of_values(&mut self, expr: &'f Expr) -> Option<JsonType> {
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

    fn json_schema(&mut self, expr: &'f Expr, dir: &Path) -> Option<GrammarSpec> {
        if let ExprKind::Map(_) = &expr.kind {
            let schema = self.expr_to_json(expr)?;
            return Some(GrammarSpec::JsonSchema { schema, file: None });
        }
        let file = self.expect_local_path(expr, "schema", dir)?;
        let text = match std::fs::read_to_string(&file.resolved) {
            Ok(t) => t,
            Err(e) => {
                self.error(
                    Diagnostic::error(
                        Code::Io,
                        format!(
                            "cannot read json schema `{}`: {}",
                            file.path,
                            lowercase_io(&e)
                        ),
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

    fn expr_to_json(&mut self, expr: &Expr) -> Option<serde_json::Value> {
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
    fn expect_grammar(&mut self, expr: &'f Expr, owner: &str, dir: &Path) -> Option<NodeRef> {
        if let ExprKind::Path(_) = &expr.kind {
            return self.expect_node(expr, Want::Grammar, "output");
        }
        let params = self.build_grammar(expr, dir)?;
        let name = format!("{owner}/output");
        let id = self.push_node(name, NodeParams::Grammar(params), expr.span, true);
        Some(self.node_ref(id))
    }

    // ----- stages -----

    fn build_eval(&mut self, decl: &'f Decl) -> Option<EvalParams> {
        let dir = self.decl_dir(decl);
        let block = self.expect_block_body(decl)?;
        let f = self.fields(
            block,
            decl,
            &[
                "model",
                "data",
                "prompt",
                "labels",
                "output",
                "scoring",
                "max_new_tokens",
                "batch_size",
                "temperature",
                "min_p",
                "repetition_penalty",
                "positive_class",
            ],
        );
        let model = self
            .required_expr(&f, "model")
            .and_then(|e| self.expect_node(e, Want::Model, "model"));
        let data = self
            .required_expr(&f, "data")
            .and_then(|e| self.expect_data(e, "data"));
        let prompt = self
            .required_expr(&f, "prompt")
            .and_then(|e| self.expect_node(e, Want::Prompt, "prompt"));
        let labels_expr = self.required_expr(&f, "labels");
        let labels = labels_expr.and_then(|e| self.expect_label_set(e, "labels"));
        let output = match self.optional_expr(&f, "output") {
            Some(e) => self.expect_grammar(e, &decl.name.name, &dir).map(Some),
            None => Some(None),
        };
        let scoring = match self.optional_expr(&f, "scoring") {
            Some(e) => self
                .expect_word(e, "scoring", &["generate", "labels"])
                .map(|w| {
                    if w == "labels" {
                        Scoring::Labels
                    } else {
                        Scoring::Generate
                    }
                }),
            None => Some(Scoring::Generate),
        };
        let max_new_tokens = self.u32_field(&f, "max_new_tokens", 1, 64);
        let batch_size = self.u32_field(&f, "batch_size", 1, 8);
        let temperature = match self.optional_expr(&f, "temperature") {
            Some(e) => self.expect_f64_in(e, "temperature", 0.0, f64::INFINITY, false),
            None => Some(0.0),
        };
        let min_p = match self.optional_expr(&f, "min_p") {
            Some(e) => self.expect_f64_in(e, "min_p", 0.0, 1.0, false).map(Some),
            None => Some(None),
        };
        let repetition_penalty = match self.optional_expr(&f, "repetition_penalty") {
            Some(e) => self
                .expect_f64_in(e, "repetition_penalty", 0.0, f64::INFINITY, true)
                .map(Some),
            None => Some(None),
        };
        let positive_class = match self.optional_expr(&f, "positive_class") {
            Some(e) => {
                let class = self.expect_str(e, "positive_class");
                match (&class, &labels) {
                    (Some(c), Some(set)) if !set.values.contains(c) => {
                        self.error(
                            Diagnostic::error(
                                Code::BadValue,
                                format!(
                                    "positive class `{c}` is not in labels `{}`",
                                    set.node.name
                                ),
                            )
                            .at(e.span)
                            .with_hint_opt(did_you_mean(c, set.values.iter().map(String::as_str))),
                        );
                        None
                    }
                    _ => class.map(Some),
                }
            }
            None => Some(None),
        };
        if let (Some(data), Some(set), Some(e)) = (&data, &labels, labels_expr) {
            self.check_data_labels(data, set, e.span);
        }
        if let (Some(Some(output)), Some(set), Some(e)) = (&output, &labels, f.expr("output")) {
            self.check_grammar_labels(output, set, e.span);
        }
        Some(EvalParams {
            model: model?,
            data: data?,
            prompt: prompt?,
            labels: labels?,
            output: output?,
            scoring: scoring?,
            max_new_tokens: max_new_tokens?,
            batch_size: batch_size?,
            temperature: temperature?,
            min_p: min_p?,
            repetition_penalty: repetition_penalty?,
            positive_class: positive_class?,
        })
    }

    fn decl_dir(&self, decl: &Decl) -> PathBuf {
        self.by_name
            .get(decl.name.name.as_str())
            .map(|i| self.decls[*i].dir.to_path_buf())
            .unwrap_or_default()
    }

    fn u32_field(&mut self, f: &Fields<'f>, name: &str, min: i64, default: u32) -> Option<u32> {
        match self.optional_expr(f, name) {
            Some(e) => self.expect_u32(e, name, min),
            None => Some(default),
        }
    }

    fn opt_count_field(&mut self, f: &Fields<'f>, name: &str, min: i64) -> Option<Option<u64>> {
        match self.optional_expr(f, name) {
            Some(e) => self.expect_count(e, name, min).map(Some),
            None => Some(None),
        }
    }

    fn f64_field(
        &mut self,
        f: &Fields<'f>,
        name: &str,
        range: (f64, f64, bool),
        default: f64,
    ) -> Option<f64> {
        match self.optional_expr(f, name) {
            Some(e) => self.expect_f64_in(e, name, range.0, range.1, range.2),
            None => Some(default),
        }
    }

    /// A dataset's label mapping must agree with the label list an eval or fine-tune uses
    /// (checked here when the dataset does not name its own `labels`).
    fn check_data_labels(&mut self, data: &DataRef, set: &LabelSet, at: Span) {
        let mut id = data.node.id;
        let dataset = loop {
            match &self.nodes[id.0].params {
                NodeParams::Dataset(d) => break d,
                NodeParams::Sample(s) => id = s.source.node.id,
                NodeParams::Shuffle(s) => id = s.source.node.id,
                NodeParams::Split(s) => id = s.source.node.id,
                _ => return,
            }
        };
        if dataset.labels.is_some() {
            return;
        }
        let Some(mapping) = &dataset.label.mapping else {
            return;
        };
        let name = self.nodes[id.0].name.clone();
        let unknown: Vec<String> = mapping
            .iter()
            .filter(|e| !set.values.contains(&e.label))
            .map(|e| format!("`{}`", e.label))
            .collect();
        if !unknown.is_empty() {
            let span = self.nodes[id.0].span;
            self.diags.push(
                Diagnostic::error(
                    Code::LabelMapping,
                    format!(
                        "the label mapping of dataset `{name}` maps to {}, not in labels `{}`",
                        unknown.join(", "),
                        set.node.name
                    ),
                )
                .at(at)
                .also(span, "dataset declared here"),
            );
        }
        let missing: Vec<String> = set
            .values
            .iter()
            .filter(|v| !mapping.iter().any(|e| &e.label == *v))
            .map(|v| format!("`{v}`"))
            .collect();
        if !missing.is_empty() {
            let span = self.nodes[id.0].span;
            self.diags.push(
                Diagnostic::error(
                    Code::LabelMapping,
                    format!(
                        "the label mapping of dataset `{name}` misses {} of labels `{}`",
                        missing.join(", "),
                        set.node.name
                    ),
                )
                .at(at)
                .also(span, "dataset declared here"),
            );
        }
    }

    /// One label list drives the mask, the parsing of answers and the metrics: a grammar that
    /// constrains answers to another list would make evaluation meaningless.
    fn check_grammar_labels(&mut self, output: &NodeRef, set: &LabelSet, at: Span) {
        let mut lists = Vec::new();
        match &self.nodes[output.id.0].params {
            NodeParams::Grammar(g) => match &g.spec {
                GrammarSpec::OneOf {
                    labels: Some(l), ..
                } => lists.push(l.clone()),
                GrammarSpec::Json { schema } => {
                    json_refs(schema, &mut |l: &NodeRef| lists.push(l.clone()))
                }
                _ => {}
            },
            _ => return,
        }
        if let Some(other) = lists.iter().find(|l| l.id != set.node.id) {
            self.error(
                Diagnostic::error(
                    Code::LabelMapping,
                    format!(
                        "grammar `{}` constrains answers to labels `{}`, but the stage uses labels `{}`",
                        output.name, other.name, set.node.name
                    ),
                )
                .at(at)
                .with_hint("use the same label list in the grammar and in `labels`"),
            );
        }
    }

    fn build_finetune(&mut self, decl: &'f Decl) -> Option<FinetuneParams> {
        let dir = self.decl_dir(decl);
        let block = self.expect_block_body(decl)?;
        let f = self.fields(
            block,
            decl,
            &[
                "base",
                "data",
                "eval_data",
                "prompt",
                "labels",
                "output",
                "lora",
                "lr",
                "epochs",
                "max_steps",
                "batch_size",
                "grad_accum",
                "warmup_ratio",
                "weight_decay",
                "schedule",
                "max_grad_norm",
                "eval_every",
                "checkpoint_every",
                "seed",
                "loss",
            ],
        );
        let base = self
            .required_expr(&f, "base")
            .and_then(|e| self.expect_node(e, Want::Model, "base"));
        let data = self
            .required_expr(&f, "data")
            .and_then(|e| self.expect_data(e, "data"));
        let eval_data = match self.optional_expr(&f, "eval_data") {
            Some(e) => self.expect_data(e, "eval_data").map(Some),
            None => Some(None),
        };
        let prompt = self
            .required_expr(&f, "prompt")
            .and_then(|e| self.expect_node(e, Want::Prompt, "prompt"));
        let labels_expr = self.optional_expr(&f, "labels");
        let labels = match labels_expr {
            Some(e) => self.expect_label_set(e, "labels").map(Some),
            None => Some(None),
        };
        let output = match self.optional_expr(&f, "output") {
            Some(e) => self.expect_grammar(e, &decl.name.name, &dir).map(Some),
            None => Some(None),
        };
        let lora = match f.get("lora") {
            Some(Field {
                value: FieldValue::Block(b),
                name,
                ..
            }) => self.build_lora(b, name.span, &decl.name.name),
            Some(Field {
                value: FieldValue::Expr(e),
                ..
            }) => {
                self.error(
                    Diagnostic::error(
                        Code::WrongType,
                        format!(
                            "expected a block `lora {{ r = 8 ... }}` in finetune `{}`, found {}",
                            decl.name.name,
                            e.kind.describe()
                        ),
                    )
                    .at(e.span),
                );
                None
            }
            None => Some(default_lora()),
        };
        let lr = self.f64_field(&f, "lr", (0.0, 1.0, true), 5e-4);
        let epochs = self.u32_field(&f, "epochs", 1, 1);
        let max_steps = self.opt_count_field(&f, "max_steps", 1);
        let batch_size = self.u32_field(&f, "batch_size", 1, 1);
        let grad_accum = self.u32_field(&f, "grad_accum", 1, 16);
        let warmup_ratio = self.f64_field(&f, "warmup_ratio", (0.0, 1.0, false), 0.1);
        let weight_decay = self.f64_field(&f, "weight_decay", (0.0, f64::INFINITY, false), 0.01);
        let schedule = match self.optional_expr(&f, "schedule") {
            Some(e) => self
                .expect_word(e, "schedule", &["constant", "linear", "cosine"])
                .map(|w| match w {
                    "constant" => Schedule::Constant,
                    "cosine" => Schedule::Cosine,
                    _ => Schedule::Linear,
                }),
            None => Some(Schedule::Linear),
        };
        let max_grad_norm = self.f64_field(&f, "max_grad_norm", (0.0, f64::INFINITY, true), 1.0);
        let eval_every = self.opt_count_field(&f, "eval_every", 1);
        let checkpoint_every = self.opt_count_field(&f, "checkpoint_every", 1);
        let seed = match self.optional_expr(&f, "seed") {
            Some(e) => self.expect_count(e, "seed", 0),
            None => Some(self.seed),
        };
        let loss = match self.optional_expr(&f, "loss") {
            Some(e) => self.expect_word(e, "loss", &["answer", "all"]).map(|w| {
                if w == "all" {
                    LossOn::All
                } else {
                    LossOn::Answer
                }
            }),
            None => Some(LossOn::Answer),
        };
        if let (Some(data), Some(Some(set)), Some(e)) = (&data, &labels, labels_expr) {
            self.check_data_labels(data, set, e.span);
        }
        if let (Some(Some(output)), Some(Some(set)), Some(e)) = (&output, &labels, f.expr("output"))
        {
            self.check_grammar_labels(output, set, e.span);
        }
        Some(FinetuneParams {
            base: base?,
            data: data?,
            eval_data: eval_data?,
            prompt: prompt?,
            labels: labels?,
            output: output?,
            lora: lora?,
            lr: lr?,
            epochs: epochs?,
            max_steps: max_steps?,
            batch_size: batch_size?,
            grad_accum: grad_accum?,
            warmup_ratio: warmup_ratio?,
            weight_decay: weight_decay?,
            schedule: schedule?,
            max_grad_norm: max_grad_norm?,
            eval_every: eval_every?,
            checkpoint_every: checkpoint_every?,
            seed: seed?,
            loss: loss?,
        })
    }

    fn build_lora(&mut self, block: &'f Block, name_span: Span, owner: &str) -> Option<LoraParams> {
        let f = self.fields_of(
            block,
            format!("the `lora` block of finetune `{owner}`"),
            name_span,
            &["r", "alpha", "dropout", "targets", "rslora"],
        );
        let defaults = default_lora();
        let r = self.u32_field(&f, "r", 1, defaults.r);
        let alpha = self.f64_field(&f, "alpha", (0.0, f64::INFINITY, true), defaults.alpha);
        let dropout = match self.optional_expr(&f, "dropout") {
            Some(e) => self.expect_f64(e, "dropout").and_then(|d| {
                if (0.0..1.0).contains(&d) {
                    Some(d)
                } else {
                    self.error(
                        Diagnostic::error(
                            Code::BadValue,
                            format!("`dropout` must be at least 0 and below 1, found {d}"),
                        )
                        .at(e.span),
                    );
                    None
                }
            }),
            None => Some(defaults.dropout),
        };
        let targets = match self.optional_expr(&f, "targets") {
            Some(e) => self.expect_targets(e),
            None => Some(defaults.targets),
        };
        let rslora = match self.optional_expr(&f, "rslora") {
            Some(e) => self.expect_bool(e, "rslora"),
            None => Some(false),
        };
        Some(LoraParams {
            r: r?,
            alpha: alpha?,
            dropout: dropout?,
            targets: targets?,
            rslora: rslora?,
        })
    }

    /// LoRA target names; names that match no LFM2-VL module are warned about (the tutorial's
    /// `o_proj`/`gate_proj` targets silently trained nothing).
    fn expect_targets(&mut self, expr: &Expr) -> Option<Vec<String>> {
        let targets = self.expect_str_list(expr, "targets")?;
        if targets.is_empty() {
            self.error(
                Diagnostic::error(Code::BadValue, "`targets` must name at least one module")
                    .at(expr.span)
                    .with_hint(format!(
                        "LFM2 language-model modules: {}",
                        LFM2_TEXT_TARGETS.join(", ")
                    )),
            );
            return None;
        }
        let ExprKind::List(items) = &expr.kind else {
            return Some(targets);
        };
        for (target, item) in targets.iter().zip(items) {
            let known = LFM2_TEXT_TARGETS
                .iter()
                .chain(LFM2_VL_OTHER_TARGETS)
                .any(|t| t == target);
            if !known {
                let hint = did_you_mean(
                    target,
                    LFM2_TEXT_TARGETS
                        .iter()
                        .chain(LFM2_VL_OTHER_TARGETS)
                        .copied(),
                )
                .unwrap_or_else(|| {
                    format!(
                        "LFM2 language-model modules: {}",
                        LFM2_TEXT_TARGETS.join(", ")
                    )
                });
                self.diags.push(
                    Diagnostic::warning(
                        Code::BadValue,
                        format!("lora target `{target}` matches no module of LFM2-VL"),
                    )
                    .at(item.span)
                    .with_hint(hint),
                );
            }
        }
        Some(targets)
    }

    fn build_report(&mut self, decl: &'f Decl) -> Option<ReportParams> {
        let block = self.expect_block_body(decl)?;
        let f = self.fields(block, decl, &["compare", "title"]);
        let compare = self.required_expr(&f, "compare").and_then(|e| {
            let ExprKind::List(items) = &e.kind else {
                self.wrong_type(e, "a list of evals", "compare");
                return None;
            };
            if items.is_empty() {
                self.error(
                    Diagnostic::error(Code::BadValue, "`compare` must name at least one eval")
                        .at(e.span),
                );
                return None;
            }
            let refs: Vec<Option<NodeRef>> = items
                .iter()
                .map(|i| self.expect_node(i, Want::Eval, "compare"))
                .collect();
            refs.into_iter().collect::<Option<Vec<_>>>()
        });
        let title = match self.optional_expr(&f, "title") {
            Some(e) => self.expect_str(e, "title").map(Some),
            None => Some(None),
        };
        Some(ReportParams {
            compare: compare?,
            title: title?,
        })
    }
}

fn default_lora() -> LoraParams {
    LoraParams {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        targets: LFM2_TEXT_TARGETS.iter().map(|s| (*s).to_owned()).collect(),
        rslora: false,
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

/// Byte range of 1-based `line` of `text`, without leading blanks.
fn line_bounds(text: &str, line: usize) -> (usize, usize) {
    let mut start = 0;
    for _ in 1..line {
        match text[start..].find('\n') {
            Some(i) => start += i + 1,
            None => break,
        }
    }
    let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let content = &text[start..end];
    let lead = content.len() - content.trim_start().len();
    (start + lead, end)
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// serde_json appends " at line L column C"; the diagnostic shows the position itself.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
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
