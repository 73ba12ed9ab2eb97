//! Scalar values (ints, numbers, strings, words, lists, local paths), with params substituted.

use std::path::Path;

use crate::dsl::ast::{Expr, ExprKind};
use crate::dsl::diagnostic::{Code, Diagnostic, did_you_mean};
use crate::dsl::parser::join_or;
use crate::plan::params::{LocalPath, ParamValue};

use super::Analyzer;

impl<'f> Analyzer<'f, '_> {
    /// A literal scalar, or the value of a param named by a bare reference.
    pub(super) fn scalar(&mut self, expr: &Expr) -> Option<ParamValue> {
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
    pub(super) fn scalar_mismatch(&mut self, expr: &Expr, expected: &str, field: &str) {
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

    pub(super) fn expect_int(&mut self, expr: &Expr, field: &str) -> Option<i64> {
        match self.scalar(expr) {
            Some(ParamValue::Int(i)) => Some(i),
            _ => {
                self.scalar_mismatch(expr, "an integer", field);
                None
            }
        }
    }

    /// A non-negative integer of at least `min`.
    pub(super) fn expect_count(&mut self, expr: &Expr, field: &str, min: i64) -> Option<u64> {
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

    pub(super) fn expect_u32(&mut self, expr: &Expr, field: &str, min: i64) -> Option<u32> {
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

    pub(super) fn expect_f64(&mut self, expr: &Expr, field: &str) -> Option<f64> {
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
    pub(super) fn expect_f64_in(
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

    pub(super) fn expect_str(&mut self, expr: &Expr, field: &str) -> Option<String> {
        match self.scalar(expr) {
            Some(ParamValue::Str(s)) => Some(s),
            _ => {
                self.scalar_mismatch(expr, "a string", field);
                None
            }
        }
    }

    pub(super) fn expect_bool(&mut self, expr: &Expr, field: &str) -> Option<bool> {
        match self.scalar(expr) {
            Some(ParamValue::Bool(b)) => Some(b),
            _ => {
                self.scalar_mismatch(expr, "`true` or `false`", field);
                None
            }
        }
    }

    /// One of a fixed set of words, written bare (`rgb_only`) or quoted (`"rgb_only"`).
    pub(super) fn expect_word(
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

    pub(super) fn expect_str_list(&mut self, expr: &Expr, field: &str) -> Option<Vec<String>> {
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

    pub(super) fn expect_local_path(
        &mut self,
        expr: &Expr,
        field: &str,
        dir: &Path,
    ) -> Option<LocalPath> {
        let path = self.expect_str(expr, field)?;
        if path.is_empty() {
            self.error(
                Diagnostic::error(Code::BadValue, format!("`{field}` must not be empty"))
                    .at(expr.span),
            );
            return None;
        }
        let resolved = dir.join(&path);
        let what = match field {
            "schema" => "json schema",
            "adapter" => "adapter folder",
            _ => "path",
        };
        if !self.expect_readable(&resolved, &path, what, expr.span) {
            return None;
        }
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
}
