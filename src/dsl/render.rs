//! Diagnostics as text for people and as JSON for tools.
//!
//! The human form follows the house order: message, hint, `path:line:col` with the source line
//! and the offending text underlined, then secondary labels (e.g. "first declared here").

use std::borrow::Cow;
use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::dsl::diagnostic::{Diagnostic, Label, Severity};
use crate::dsl::span::SourceMap;

const RED: &str = "\x1b[1;31m";
const YELLOW: &str = "\x1b[1;33m";
const BLUE: &str = "\x1b[1;34m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

/// `text` with every control character except newline and tab written as a visible escape
/// (`\u{1b}`), so a pipeline's text (or a path, or a message quoting either) cannot move the
/// cursor, recolour or retitle the terminal it is printed to.
pub(crate) fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_escaped) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_escaped(c) {
            let _ = write!(out, "{}", c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Control characters (C0, DEL, C1) other than the layout ones, newline and tab.
fn is_escaped(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

/// Renders diagnostics for a terminal (`color` adds ANSI colours), one blank line between them.
pub(crate) fn render_text(diagnostics: &[Diagnostic], sources: &SourceMap, color: bool) -> String {
    let mut out = String::new();
    for (i, d) in diagnostics.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        render_one(&mut out, d, sources, color);
    }
    out
}

fn paint(color: bool, code: &str, text: &str) -> String {
    if color {
        format!("{code}{text}{RESET}")
    } else {
        text.to_owned()
    }
}

fn render_one(out: &mut String, d: &Diagnostic, sources: &SourceMap, color: bool) {
    let (word, tint) = match d.severity {
        Severity::Error => ("error", RED),
        Severity::Warning => ("warning", YELLOW),
    };
    let _ = writeln!(
        out,
        "{}{}",
        paint(color, tint, &format!("{word}[{}]", d.code)),
        paint(color, BOLD, &format!(": {}", escape_control(&d.message)))
    );
    if let Some(hint) = &d.hint {
        let hint = escape_control(hint);
        let _ = writeln!(out, "  {} {hint}", paint(color, BLUE, "hint:"));
    }
    let mut labels: Vec<&Label> = d.labels.iter().filter(|l| l.primary).collect();
    labels.extend(d.labels.iter().filter(|l| !l.primary));
    for label in labels {
        render_label(out, label, sources, color, tint);
    }
}

fn render_label(out: &mut String, label: &Label, sources: &SourceMap, color: bool, tint: &str) {
    let Some(file) = sources.get(label.span.file) else {
        return;
    };
    let (line, col) = file.line_col(label.span.start as usize);
    let gutter = line.to_string().len();
    let pad = " ".repeat(gutter);
    let arrow = paint(color, BLUE, "-->");
    let path = file.path.display().to_string();
    let _ = writeln!(out, "{pad} {arrow} {}:{line}:{col}", escape_control(&path));
    let bar = paint(color, BLUE, "|");
    let text = file.line_text(line);
    let shown = escape_control(text);
    let _ = writeln!(out, "{pad} {bar}");
    let _ = writeln!(
        out,
        "{} {bar} {shown}",
        paint(color, BLUE, &line.to_string())
    );
    // Underline up to the end of the first line of the span (at least one caret).
    let line_end = file.line_start(line) + text.len();
    let end = (label.span.end as usize).min(line_end);
    // Widths are measured on the escaped text, as shown, so the carets stay under it.
    let width = file
        .text
        .get(label.span.start as usize..end.max(label.span.start as usize))
        .map_or(0, |s| escape_control(s).chars().count())
        .max(1);
    let before: String = text.chars().take(col - 1).collect();
    let indent: String = escape_control(&before)
        .chars()
        .map(|c| if c == '\t' { '\t' } else { ' ' })
        .collect();
    let (mark, mark_tint) = if label.primary {
        ('^', tint)
    } else {
        ('-', BLUE)
    };
    let underline = mark.to_string().repeat(width);
    let message = label
        .message
        .as_deref()
        .map(|m| format!(" {}", escape_control(m)))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "{pad} {bar} {indent}{}",
        paint(color, mark_tint, &format!("{underline}{message}"))
    );
}

/// Renders diagnostics as a JSON array (positions 1-based, columns in characters).
pub(crate) fn render_json(diagnostics: &[Diagnostic], sources: &SourceMap) -> Value {
    Value::Array(
        diagnostics
            .iter()
            .map(|d| diagnostic_json(d, sources))
            .collect(),
    )
}

fn diagnostic_json(d: &Diagnostic, sources: &SourceMap) -> Value {
    let labels: Vec<Value> = d
        .labels
        .iter()
        .map(|l| {
            let file = sources.get(l.span.file);
            let (line, column) = file.map_or((0, 0), |f| f.line_col(l.span.start as usize));
            let (end_line, end_column) = file.map_or((0, 0), |f| f.line_col(l.span.end as usize));
            json!({
                "file": file.map(|f| f.path.display().to_string()),
                "line": line,
                "column": column,
                "end_line": end_line,
                "end_column": end_column,
                "message": l.message,
                "primary": l.primary,
            })
        })
        .collect();
    json!({
        "code": d.code.as_str(),
        "severity": d.severity,
        "message": d.message,
        "hint": d.hint,
        "labels": labels,
    })
}
