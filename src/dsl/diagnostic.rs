//! The one diagnostic model shared by the parser, the loader and the analyzer.
//!
//! A diagnostic is data (code, severity, message, labelled spans, hint), never a Rust error:
//! checking collects all of them and [`crate::dsl::render`] turns them into text or JSON.

use std::fmt;

use serde::Serialize;

use crate::dsl::span::Span;

/// How bad a diagnostic is; any `Error` means no plan is produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// What kind of problem a diagnostic reports (stable names, used by the JSON renderer and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Code {
    /// The text does not follow the grammar.
    Syntax,
    /// A file given as a pipeline is plainly something else (binary, not utf-8, a table).
    NotAPipeline,
    /// A pipeline that declares nothing (an empty file, or only comments).
    NoDeclarations,
    /// A file could not be read.
    Io,
    /// An `import` names a file that does not exist.
    ImportNotFound,
    /// Files import each other in a loop.
    ImportCycle,
    /// Two declarations (possibly in different files) share a name.
    DuplicateName,
    /// A field or argument given twice.
    DuplicateField,
    /// A name that is declared nowhere.
    UnknownReference,
    /// A value of the wrong kind (a prompt where a model is expected, a string for a number, ...).
    WrongType,
    /// A required field or argument is absent.
    MissingField,
    /// A field or argument the declaration kind does not have.
    UnknownField,
    /// A value outside its allowed range (negative sample size, `r = 0`, ...).
    BadValue,
    /// Declarations that depend on each other in a loop.
    Cycle,
    /// Split ratios that do not sum to 1.
    SplitRatios,
    /// A label mapping that misses a label or maps to a label not in the list.
    LabelMapping,
    /// A prompt template that does not compile.
    Template,
    /// A `--set name=value` that names no param or does not parse as its type.
    BadOverride,
    /// A declaration that is accepted but probably not what was meant.
    Unused,
    /// A field whose value cannot change the result because another field overrides it.
    NoEffect,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Syntax => "syntax",
            Code::NotAPipeline => "not-a-pipeline",
            Code::NoDeclarations => "no-declarations",
            Code::Io => "io",
            Code::ImportNotFound => "import-not-found",
            Code::ImportCycle => "import-cycle",
            Code::DuplicateName => "duplicate-name",
            Code::DuplicateField => "duplicate-field",
            Code::UnknownReference => "unknown-reference",
            Code::WrongType => "wrong-type",
            Code::MissingField => "missing-field",
            Code::UnknownField => "unknown-field",
            Code::BadValue => "bad-value",
            Code::Cycle => "cycle",
            Code::SplitRatios => "split-ratios",
            Code::LabelMapping => "label-mapping",
            Code::Template => "template",
            Code::BadOverride => "bad-override",
            Code::Unused => "unused",
            Code::NoEffect => "no-effect",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A span with an optional short message; the primary label is where the caret goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    pub span: Span,
    pub message: Option<String>,
    pub primary: bool,
}

/// One problem found while loading or checking a pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub code: Code,
    pub severity: Severity,
    /// Lower-case, names in backticks, says what was expected and what was found.
    pub message: String,
    pub labels: Vec<Label>,
    pub hint: Option<String>,
}

impl Diagnostic {
    pub(crate) fn error(code: Code, message: impl Into<String>) -> Self {
        Diagnostic {
            code,
            severity: Severity::Error,
            message: message.into(),
            labels: Vec::new(),
            hint: None,
        }
    }

    pub(crate) fn warning(code: Code, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, message)
        }
    }

    /// Adds the primary label (the underlined text).
    pub(crate) fn at(mut self, span: Span) -> Self {
        self.labels.push(Label {
            span,
            message: None,
            primary: true,
        });
        self
    }

    /// Adds the primary label with a message under the underline.
    pub(crate) fn at_with(mut self, span: Span, message: impl Into<String>) -> Self {
        self.labels.push(Label {
            span,
            message: Some(message.into()),
            primary: true,
        });
        self
    }

    /// Adds a secondary label (e.g. "first declared here").
    pub(crate) fn also(mut self, span: Span, message: impl Into<String>) -> Self {
        self.labels.push(Label {
            span,
            message: Some(message.into()),
            primary: false,
        });
        self
    }

    pub(crate) fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub(crate) fn with_hint_opt(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The primary label's span, if any.
    pub fn primary_span(&self) -> Option<Span> {
        self.labels
            .iter()
            .find(|l| l.primary)
            .or(self.labels.first())
            .map(|l| l.span)
    }
}

/// "did you mean `x`?" for the closest of `candidates` to `name`, if any is close enough.
pub(crate) fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let mut best: Option<(f64, &str)> = None;
    for candidate in candidates {
        if candidate == name {
            continue;
        }
        let score = strsim::jaro_winkler(name, candidate);
        if score >= 0.8 && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, candidate));
        }
    }
    best.map(|(_, c)| format!("did you mean `{c}`?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_you_mean_picks_the_closest_close_name() {
        assert_eq!(
            did_you_mean("smal", ["small", "big", "smaller"]).as_deref(),
            Some("did you mean `small`?")
        );
        assert_eq!(did_you_mean("zzz", ["small", "big"]), None);
        // The name itself is never suggested.
        assert_eq!(did_you_mean("small", ["small"]), None);
    }
}
