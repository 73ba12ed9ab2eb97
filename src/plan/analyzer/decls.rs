//! Data and setup declarations: labels, datasets and their sources, splits, prompts, models.

use std::collections::BTreeMap;
use std::path::Path;

use crate::dsl::ast::{Decl, Entry, Expr, ExprKind, KeyKind, StrLit};
use crate::dsl::diagnostic::{Code, Diagnostic, did_you_mean};
use crate::dsl::parser::join_or;
use crate::dsl::span::Span;
use crate::plan::params::{
    AdapterSource, DataSource, DatasetParams, Dtype, KeepFilter, LabelMapEntry, LabelSet,
    LabelSpec, LabelsParams, MODEL_PRESETS, MapKey, ModelParams, ModelSource, NodeParams, NodeRef,
    ParamValue, PromptParams, SYNTHETIC_KINDS, SYNTHETIC_SHAPES, SplitMethod, SplitParams,
};
use crate::read_limits::{ReadKind, read_text_bounded};

use super::{Analyzer, Args, Want};

impl<'f> Analyzer<'f, '_> {
    pub(super) fn build_labels(&mut self, decl: &'f Decl) -> Option<LabelsParams> {
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

    pub(super) fn labels_values(&self, node: &NodeRef) -> Vec<String> {
        match &self.nodes[node.id.0].params {
            NodeParams::Labels(l) => l.values.clone(),
            _ => Vec::new(),
        }
    }

    pub(super) fn expect_label_set(&mut self, expr: &'f Expr, field: &str) -> Option<LabelSet> {
        let node = self.expect_node(expr, Want::Labels, field)?;
        let values = self.labels_values(&node);
        Some(LabelSet { node, values })
    }

    pub(super) fn build_dataset(&mut self, idx: usize) -> Option<DatasetParams> {
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
                "max_image_pixels",
                "drop",
                "shards",
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
        // Folders and generated data name each row's class themselves; `label` is optional there.
        let labels_from_source = matches!(
            source,
            Some(DataSource::Folder { .. }) | Some(DataSource::Synthetic { .. })
        );
        let label = match self.optional_expr(&f, "label") {
            None if labels_from_source => Some(LabelSpec {
                column: "class".to_owned(),
                mapping: None,
            }),
            _ => self
                .required_expr(&f, "label")
                .and_then(|e| self.build_label_spec(e, labels.as_ref().and_then(|l| l.as_ref()))),
        };
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
        let max_image_pixels = match self.optional_expr(&f, "max_image_pixels") {
            Some(e) => self
                .expect_u32(e, "max_image_pixels", 1)
                .map(|n| Some(u64::from(n))),
            None => Some(None),
        };
        let drop = match self.optional_expr(&f, "drop") {
            Some(e) => self.expect_str_list(e, "drop"),
            None => Some(Vec::new()),
        };
        let shards = match self.optional_expr(&f, "shards") {
            Some(e) => self.expect_u32(e, "shards", 1).map(Some),
            None => Some(None),
        };
        Some(DatasetParams {
            source: source?,
            image: image?,
            label: label?,
            labels: labels?,
            keep: keep?,
            max_image_size: max_image_size?,
            max_image_pixels: max_image_pixels?,
            drop: drop?,
            shards: shards?,
        })
    }

    pub(super) fn build_source(&mut self, expr: &'f Expr, dir: &Path) -> Option<DataSource> {
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
                if let (Some(rev), Some(e)) = (&revision, args.get("revision")) {
                    self.expect_revision(rev, e.span)?;
                }
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
                    .and_then(|e| self.expect_word(e, "kind", SYNTHETIC_KINDS))
                    .map(str::to_owned);
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
                        Some(ParamValue::Str(list)) if key.name == "shapes" => {
                            // Each comma-separated shape is checked here, not at run time.
                            for shape in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                                if !SYNTHETIC_SHAPES.contains(&shape) {
                                    ok = false;
                                    self.error(
                                        Diagnostic::error(
                                            Code::BadValue,
                                            format!(
                                                "expected shapes among {} for `shapes`, found `{shape}`",
                                                quoted_list(SYNTHETIC_SHAPES)
                                            ),
                                        )
                                        .at(value.span)
                                        .with_hint_opt(did_you_mean(shape, SYNTHETIC_SHAPES.iter().copied())),
                                    );
                                }
                            }
                            options.insert(key.name.clone(), ParamValue::Str(list));
                        }
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

    pub(super) fn optional_str_arg(
        &mut self,
        args: &Args<'f>,
        name: &str,
    ) -> Option<Option<String>> {
        match args.get(name) {
            Some(e) => self.expect_str(e, name).map(Some),
            None => Some(None),
        }
    }

    /// `owner/name` as the Hub spells repositories.
    pub(super) fn expect_repo(&mut self, expr: &Expr) -> Option<String> {
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

    /// A Hub `revision:` that can only name a ref (see [`crate::hub::revision_problem`]).
    fn expect_revision(&mut self, revision: &str, span: Span) -> Option<()> {
        let Some(problem) = crate::hub::revision_problem(revision) else {
            return Some(());
        };
        self.error(
            Diagnostic::error(
                Code::BadValue,
                format!("`{revision}` is not a hub revision: {problem}"),
            )
            .at(span)
            .with_hint("use a branch (`main`, `feature/x`), a tag (`v1.0`) or a 40-hex commit"),
        );
        None
    }

    pub(super) fn build_label_spec(
        &mut self,
        expr: &'f Expr,
        labels: Option<&LabelSet>,
    ) -> Option<LabelSpec> {
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

    pub(super) fn build_mapping(
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

    pub(super) fn build_split(&mut self, decl: &'f Decl) -> Option<SplitParams> {
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

    pub(super) fn build_prompt(&mut self, idx: usize) -> Option<PromptParams> {
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
    pub(super) fn expect_template(
        &mut self,
        expr: &Expr,
        field: &str,
        dir: &Path,
    ) -> Option<String> {
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
                if !self.expect_readable(&path, &rel, "template", arg.value.span) {
                    return None;
                }
                match read_text_bounded(&path, ReadKind::Template) {
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
                                format!("cannot read template `{rel}`: {e}"),
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
        let compiled = self
            .templates
            .template_from_str(&lit.value)
            .map(|t| t.undeclared_variables(false));
        if let Ok(names) = &compiled {
            let mut unknown: Vec<String> = names
                .iter()
                .filter(|name| !self.template_scope_has(name))
                .cloned()
                .collect();
            unknown.sort();
            if !self.expect_template_scope(&lit, field, &unknown) {
                return None;
            }
        }
        if let Err(e) = compiled {
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

    /// Whether a template may read `name`: a row field, `labels`, a param or a minijinja global.
    fn template_scope_has(&self, name: &str) -> bool {
        TEMPLATE_ROW_SCOPE.contains(&name)
            || self.params.contains_key(name)
            || self.broken.iter().any(|b| b == name)
            || self.templates.globals().any(|(g, _)| g == name)
    }

    /// Reports what makes a compiled template fail on every row at run time (issue 14 item 9):
    /// names nothing defines (rendering is strict) and `{% include %}`-like tags (there is no
    /// other template to load). `unknown` are the names the template reads and nothing defines.
    fn expect_template_scope(&mut self, lit: &StrLit, field: &str, unknown: &[String]) -> bool {
        let mut ok = true;
        for name in unknown {
            let at = find_word(&lit.value, name);
            let span = at.map_or(lit.span, |(s, e)| {
                lit.span_of_offset(s).to(lit.span_of_offset(e))
            });
            let mut scope: Vec<&str> = TEMPLATE_ROW_SCOPE.to_vec();
            scope.extend(self.params.keys().map(String::as_str));
            let suggestion = did_you_mean(name, scope.iter().copied())
                .map(|s| format!("{s} "))
                .unwrap_or_default();
            self.error(
                Diagnostic::error(
                    Code::Template,
                    format!("template `{field}` reads `{name}`, which nothing defines"),
                )
                .at(span)
                .with_hint(format!(
                    "{suggestion}a template can read {} (the row, its labels and the params)",
                    quoted_list(&scope)
                )),
            );
            ok = false;
        }
        if let Some((start, end, tag)) = loading_tag(&lit.value) {
            self.error(
                Diagnostic::error(
                    Code::Template,
                    format!("template `{field}` uses `{{% {tag} %}}`, which has nothing to load"),
                )
                .at(lit.span_of_offset(start).to(lit.span_of_offset(end)))
                .with_hint(
                    "a prompt template cannot load other templates; write the text into this one \
                     (`file(\"...\")` reads a whole template from a file)",
                ),
            );
            ok = false;
        }
        ok
    }

    pub(super) fn build_model(&mut self, idx: usize) -> Option<ModelParams> {
        let decl = self.decls[idx].decl;
        let dir = self.decls[idx].dir;
        let expr = self.expect_value_body(decl)?;
        const EXPECTED: &str =
            "a model source (`hf(...)`, `local(...)`, `gguf(...)` or `init(...)`)";
        let ExprKind::Call(call) = &expr.kind else {
            self.wrong_type(expr, EXPECTED, &decl.name.name);
            return None;
        };
        let mut adapter = None;
        let (source, dtype) = match call.callee.name.as_str() {
            "hf" => {
                let args =
                    self.call_args(call, &["repo"], &["revision", "dtype", "adapter"], false)?;
                let repo = self
                    .required_arg(&args, "repo")
                    .and_then(|e| self.expect_repo(e));
                let revision = match args.get("revision") {
                    Some(e) => self
                        .expect_str(e, "revision")
                        .and_then(|rev| self.expect_revision(&rev, e.span).map(|()| rev)),
                    None => Some("main".to_owned()),
                };
                let dtype = self.dtype_arg(&args);
                if let Some(e) = args.get("adapter") {
                    adapter = Some(self.build_adapter(e, dir));
                }
                (
                    repo.zip(revision)
                        .map(|(repo, revision)| ModelSource::Hf { repo, revision }),
                    dtype,
                )
            }
            "local" => {
                let args = self.call_args(call, &["path"], &["dtype", "adapter"], false)?;
                let path = self
                    .required_arg(&args, "path")
                    .and_then(|e| self.expect_local_path(e, "path", dir));
                if let (Some(path), Some(e)) = (&path, args.get("path")) {
                    self.expect_not_an_adapter(path, e);
                }
                if let Some(e) = args.get("adapter") {
                    adapter = Some(self.build_adapter(e, dir));
                }
                (
                    path.map(|path| ModelSource::Local { path }),
                    self.dtype_arg(&args),
                )
            }
            "gguf" => {
                let args = self.call_args(
                    call,
                    &["source"],
                    &["quant", "mmproj", "revision", "dtype"],
                    false,
                )?;
                let quant = args
                    .get("quant")
                    .map(|e| self.expect_import_quant(e, "quant"));
                let mmproj = args
                    .get("mmproj")
                    .map(|e| self.expect_import_quant(e, "mmproj"));
                let source = self
                    .required_arg(&args, "source")
                    .and_then(|e| self.build_gguf_source(e, &args, dir));
                let quant = quant.map_or(Some(None), |q| q.map(Some));
                let mmproj = mmproj.map_or(Some(None), |q| q.map(Some));
                let source = match (source, quant, mmproj) {
                    (Some((repo, revision, path)), Some(quant), Some(mmproj)) => {
                        if let (Some(path), Some(e)) = (&path, args.get("source")) {
                            self.expect_gguf_pair(path, e, quant.as_deref(), mmproj.as_deref());
                        }
                        Some(ModelSource::Gguf {
                            repo,
                            revision,
                            path,
                            quant,
                            mmproj,
                        })
                    }
                    _ => None,
                };
                (source, self.dtype_arg(&args))
            }
            "init" => {
                let args = self.call_args(call, &[], &["preset", "seed", "dtype"], false)?;
                let preset = self
                    .required_arg(&args, "preset")
                    .and_then(|e| self.expect_word(e, "preset", MODEL_PRESETS))
                    .map(str::to_owned);
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
                    .with_hint_opt(did_you_mean(other, ["hf", "local", "gguf", "init"])),
                );
                return None;
            }
        };
        Some(ModelParams {
            source: source?,
            dtype: dtype?,
            // A bad `adapter:` fails the model; a missing one is no adapter.
            adapter: match adapter {
                Some(built) => Some(built?),
                None => None,
            },
        })
    }

    /// A GGUF quant name (`"Q8_0"`, any case) of the known list, upper-cased.
    fn expect_import_quant(&mut self, expr: &Expr, field: &str) -> Option<String> {
        use crate::gguf::read::IMPORT_QUANTS;
        let text = self.expect_str(expr, field)?;
        let upper = text.trim().to_ascii_uppercase();
        if IMPORT_QUANTS.contains(&upper.as_str()) {
            return Some(upper);
        }
        self.error(
            Diagnostic::error(
                Code::BadValue,
                format!("unknown GGUF quant `{text}` for `{field}`"),
            )
            .at(expr.span)
            .with_hint(format!(
                "{}the known ones are {}",
                did_you_mean(&upper, IMPORT_QUANTS.iter().copied())
                    .map(|s| format!("{s}; "))
                    .unwrap_or_default(),
                IMPORT_QUANTS.join(", ")
            )),
        );
        None
    }

    /// `gguf("org/name[@revision]" | "folder", …)`: a Hub repo, or a folder relative to this
    /// file (one that exists, or a path starting with `.`, `/` or `~`), as `adapter:` tells them
    /// apart. Returns `(repo, revision, path)`.
    fn build_gguf_source(
        &mut self,
        expr: &Expr,
        args: &Args<'_>,
        dir: &Path,
    ) -> Option<(
        Option<String>,
        Option<String>,
        Option<crate::plan::params::LocalPath>,
    )> {
        let text = self.expect_str(expr, "source")?;
        let is_path = text.starts_with(['.', '/', '~']) || dir.join(&text).exists();
        if !is_path && crate::model::resolve::is_hub_id(&text) {
            let revision = match args.get("revision") {
                Some(e) => {
                    let rev = self.expect_str(e, "revision")?;
                    self.expect_revision(&rev, e.span)?;
                    rev
                }
                None => "main".to_owned(),
            };
            return Some((Some(text), Some(revision), None));
        }
        if let Some(e) = args.get("revision") {
            self.error(
                Diagnostic::error(Code::BadValue, "`revision` is for a Hub repo, not a folder")
                    .at(e.span)
                    .with_hint("a local folder has no revisions: remove `revision:`"),
            );
            return None;
        }
        let path = self.expect_local_path(expr, "source", dir)?;
        Some((None, None, Some(path)))
    }

    /// A local GGUF folder holds the pair asked for, checked now (headers only) rather than
    /// when the stage runs.
    fn expect_gguf_pair(
        &mut self,
        path: &crate::plan::params::LocalPath,
        expr: &Expr,
        quant: Option<&str>,
        mmproj: Option<&str>,
    ) {
        if !path.resolved.is_dir() {
            return;
        }
        let checked = crate::gguf::read::find_pair(&path.resolved, quant, mmproj)
            .and_then(|pair| crate::model::load::gguf::open_pair(&pair).map(|_| ()));
        if let Err(e) = checked {
            self.error(
                Diagnostic::error(Code::BadValue, format!("`{}`: {e}", path.path)).at(expr.span),
            );
        }
    }

    /// `adapter: "dir"` (relative to this file) or `adapter: "org/name[@revision]"` (a Hub repo).
    /// A folder that exists, or a path starting with `.`, `/` or `~`, is a folder; anything else
    /// shaped like a Hub id is a repo.
    fn build_adapter(&mut self, expr: &Expr, dir: &Path) -> Option<AdapterSource> {
        let text = self.expect_str(expr, "adapter")?;
        let (id, revision) = match text.split_once('@') {
            Some((id, rev)) => (id, Some(rev)),
            None => (text.as_str(), None),
        };
        let is_path = text.starts_with(['.', '/', '~']) || dir.join(&text).exists();
        if !is_path
            && crate::model::resolve::is_hub_id(id)
            && revision.is_none_or(|r| !r.is_empty())
        {
            if let Some(rev) = revision {
                self.expect_revision(rev, expr.span)?;
            }
            return Some(AdapterSource::Hf {
                repo: id.to_owned(),
                revision: revision.unwrap_or("main").to_owned(),
            });
        }
        let path = self.expect_local_path(expr, "adapter", dir)?;
        if path.resolved.is_dir()
            && !path
                .resolved
                .join(crate::train::peft::ADAPTER_CONFIG)
                .is_file()
        {
            let is_model = path.resolved.join("config.json").is_file();
            self.error(
                Diagnostic::error(
                    Code::BadValue,
                    format!(
                        "`adapter` folder `{}` has no `adapter_config.json`{}",
                        path.path,
                        if is_model { " (it is a model)" } else { "" }
                    ),
                )
                .at(expr.span)
                .with_hint(
                    "`adapter:` takes a PEFT LoRA adapter folder (`adapter_config.json` + \
                     `adapter_model.safetensors`, as PEFT's `save_pretrained` or a vlmpipe \
                     fine-tune writes it); a merged model goes in `local(...)` itself",
                ),
            );
            return None;
        }
        Some(AdapterSource::Local { path })
    }

    /// A `local(...)` folder that holds an adapter instead of a model is an error with the fix.
    fn expect_not_an_adapter(&mut self, path: &crate::plan::params::LocalPath, expr: &Expr) {
        let dir = &path.resolved;
        if dir.join(crate::train::peft::ADAPTER_CONFIG).is_file()
            && !dir.join("config.json").is_file()
        {
            self.error(
                Diagnostic::error(
                    Code::BadValue,
                    format!("`{}` is a PEFT adapter, not a model", path.path),
                )
                .at(expr.span)
                .with_hint(
                    "load its base model and apply it: `local(\"BASE\", adapter: \"…\")` or \
                     `hf(\"org/base\", adapter: \"…\")`; or merge it into a standalone model \
                     first (`vlmpipe export --merged`, or PEFT's `merge_and_unload`)",
                ),
            );
        }
    }

    pub(super) fn dtype_arg(&mut self, args: &Args<'f>) -> Option<Dtype> {
        let Some(e) = args.get("dtype") else {
            return Some(Dtype::F32);
        };
        let names = Dtype::ALL.map(Dtype::name);
        self.expect_word(e, "dtype", &names)
            .and_then(|w| Dtype::parse(w).ok())
    }
}

/// What a prompt template can read besides the params (the prompt stage puts them in scope).
const TEMPLATE_ROW_SCOPE: &[&str] = &["labels", "row_id", "image_id", "label"];

/// `` `a`, `b` or `c` ``.
fn quoted_list(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("`{w}`")).collect();
    join_or(&quoted.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The byte range of the first `name` in `text` that stands as a whole word.
fn find_word(text: &str, name: &str) -> Option<(usize, usize)> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(name)
        .map(|(i, _)| (i, i + name.len()))
        .find(|&(s, e)| {
            !text[..s].chars().next_back().is_some_and(is_word)
                && !text[e..].chars().next().is_some_and(is_word)
        })
}

/// The first `{% include %}`, `{% import %}`, `{% from %}` or `{% extends %}` tag of a template
/// (outside `{% raw %}`): its byte range and keyword.
fn loading_tag(text: &str) -> Option<(usize, usize, &'static str)> {
    let mut at = 0;
    let mut raw = false;
    while let Some(i) = text[at..].find("{%") {
        let start = at + i;
        let inner = text[start + 2..]
            .trim_start_matches(['-', '+', '~'])
            .trim_start();
        let word: String = inner
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect();
        let end = text[start..]
            .find("%}")
            .map_or(text.len(), |e| start + e + 2);
        match word.as_str() {
            "raw" => raw = true,
            "endraw" => raw = false,
            "include" if !raw => return Some((start, end, "include")),
            "import" if !raw => return Some((start, end, "import")),
            "from" if !raw => return Some((start, end, "from")),
            "extends" if !raw => return Some((start, end, "extends")),
            _ => {}
        }
        at = start + 2;
    }
    None
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
