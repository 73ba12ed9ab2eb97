//! The stages that run models: eval, finetune (with its `lora` block) and report.

use std::path::PathBuf;

use crate::dsl::ast::{Block, Decl, Expr, ExprKind, Field, FieldValue};
use crate::dsl::diagnostic::{Code, Diagnostic, did_you_mean};
use crate::dsl::span::Span;
use crate::plan::params::{
    DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHECKPOINT_MINUTES, DataRef, EvalParams, FinetuneParams,
    GrammarSpec, LFM2_TEXT_TARGETS, LFM2_VL_OTHER_TARGETS, LabelSet, LoraParams, LossOn,
    NodeParams, NodeRef, ReportParams, Schedule, Scoring,
};

use super::{Analyzer, Fields, Want, json_refs};

impl<'f> Analyzer<'f, '_> {
    pub(super) fn build_eval(&mut self, decl: &'f Decl) -> Option<EvalParams> {
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
                "shards",
            ],
        );
        let model = self
            .required_expr(&f, "model")
            .and_then(|e| self.expect_node(e, Want::EvalModel, "model"));
        let shards = match self.optional_expr(&f, "shards") {
            Some(e) => self.expect_u32(e, "shards", 1).map(Some),
            None => Some(None),
        };
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
            shards: shards?,
        })
    }

    pub(super) fn decl_dir(&self, decl: &Decl) -> PathBuf {
        self.by_name
            .get(decl.name.name.as_str())
            .map(|i| self.decls[*i].dir.to_path_buf())
            .unwrap_or_default()
    }

    pub(super) fn u32_field(
        &mut self,
        f: &Fields<'f>,
        name: &str,
        min: i64,
        default: u32,
    ) -> Option<u32> {
        match self.optional_expr(f, name) {
            Some(e) => self.expect_u32(e, name, min),
            None => Some(default),
        }
    }

    pub(super) fn opt_count_field(
        &mut self,
        f: &Fields<'f>,
        name: &str,
        min: i64,
    ) -> Option<Option<u64>> {
        match self.optional_expr(f, name) {
            Some(e) => self.expect_count(e, name, min).map(Some),
            None => Some(None),
        }
    }

    pub(super) fn f64_field(
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
    pub(super) fn check_data_labels(&mut self, data: &DataRef, set: &LabelSet, at: Span) {
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
    pub(super) fn check_grammar_labels(&mut self, output: &NodeRef, set: &LabelSet, at: Span) {
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

    pub(super) fn build_finetune(&mut self, decl: &'f Decl) -> Option<FinetuneParams> {
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
                "checkpoint_minutes",
                "seed",
                "loss",
            ],
        );
        self.warn_moot_finetune_fields(&f, &decl.name.name);
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
        let checkpoint_every = match self.optional_expr(&f, "checkpoint_every") {
            Some(e) => self.expect_count(e, "checkpoint_every", 1),
            None => Some(DEFAULT_CHECKPOINT_EVERY),
        };
        let checkpoint_minutes = self.f64_field(
            &f,
            "checkpoint_minutes",
            (0.0, f64::INFINITY, true),
            DEFAULT_CHECKPOINT_MINUTES,
        );
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
            checkpoint_minutes: checkpoint_minutes?,
            seed: seed?,
            loss: loss?,
        })
    }

    /// Warns about fields that another field makes moot, so a change to them cannot change the
    /// fine-tune (and does not rerun it: the stage leaves them out of its fingerprint).
    fn warn_moot_finetune_fields(&mut self, f: &Fields<'f>, owner: &str) {
        if let (Some(epochs), Some(_)) = (f.get("epochs"), f.get("max_steps")) {
            self.diags.push(
                Diagnostic::warning(
                    Code::NoEffect,
                    format!(
                        "`epochs` has no effect in finetune `{owner}`: `max_steps` sets the number of optimizer steps"
                    ),
                )
                .at(epochs.span)
                .with_hint(
                    "`max_steps` replaces `epochs` (the data is cycled as needed); remove `epochs`, or remove `max_steps` to train for whole epochs",
                ),
            );
        }
        if let (Some(every), None) = (f.get("eval_every"), f.get("eval_data")) {
            self.diags.push(
                Diagnostic::warning(
                    Code::NoEffect,
                    format!(
                        "`eval_every` has no effect in finetune `{owner}`: it has no `eval_data`"
                    ),
                )
                .at(every.span)
                .with_hint("add `eval_data = …` to measure held-out loss, or remove `eval_every`"),
            );
        }
    }

    pub(super) fn build_lora(
        &mut self,
        block: &'f Block,
        name_span: Span,
        owner: &str,
    ) -> Option<LoraParams> {
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
    pub(super) fn expect_targets(&mut self, expr: &Expr) -> Option<Vec<String>> {
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

    pub(super) fn build_report(&mut self, decl: &'f Decl) -> Option<ReportParams> {
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
