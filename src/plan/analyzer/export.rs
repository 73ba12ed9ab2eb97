//! The `export` declaration: a model or a fine-tune written as files another runtime loads.
//!
//! The format and the GGUF types are closed sets, checked here against the lists the export code
//! itself knows ([`crate::gguf::KNOWN_QUANTS`]), so a type added there is accepted here at once.

use crate::dsl::ast::{Decl, Expr};
use crate::dsl::diagnostic::{Code, Diagnostic, did_you_mean};
use crate::dsl::parser::join_or;
use crate::gguf::{GgufQuant, KNOWN_QUANTS, MMPROJ_QUANTS};
use crate::plan::params::{EXPORT_FORMATS, ExportFormat, ExportParams};

use super::{Analyzer, Want};

impl<'f> Analyzer<'f, '_> {
    pub(super) fn build_export(&mut self, decl: &'f Decl) -> Option<ExportParams> {
        let block = self.expect_block_body(decl)?;
        let f = self.fields(block, decl, &["model", "format", "quant", "mmproj"]);
        let model = self
            .required_expr(&f, "model")
            .and_then(|e| self.expect_node(e, Want::Model, "model"));
        let format = self
            .required_expr(&f, "format")
            .and_then(|e| self.expect_word(e, "format", EXPORT_FORMATS))
            .map(|_| ExportFormat::Gguf);
        let quant = self
            .required_expr(&f, "quant")
            .and_then(|e| self.expect_gguf_quant(e, "quant", &KNOWN_QUANTS));
        // As `vlmpipe export --gguf` does: the mmproj takes the text model's type unless told
        // (F16 beside a k-quant mixture, which no mmproj takes).
        let mmproj = match self.optional_expr(&f, "mmproj") {
            Some(e) => self.expect_gguf_quant(e, "mmproj", &MMPROJ_QUANTS),
            None => quant.map(GgufQuant::default_mmproj),
        };
        Some(ExportParams {
            model: model?,
            format: format?,
            quant: quant?.name().to_owned(),
            mmproj: mmproj?.name().to_owned(),
        })
    }

    /// A GGUF type name (`"q8_0"`, any case) of `allowed`, or an error listing them.
    fn expect_gguf_quant(
        &mut self,
        expr: &Expr,
        field: &str,
        allowed: &[GgufQuant],
    ) -> Option<GgufQuant> {
        let text = self.expect_str(expr, field)?;
        let parsed = text.parse::<GgufQuant>().and_then(|q| {
            if allowed.contains(&q) {
                Ok(q)
            } else {
                q.for_mmproj()
            }
        });
        match parsed {
            Ok(quant) => Some(quant),
            Err(unknown) => {
                let known: Vec<String> = allowed
                    .iter()
                    .map(|q| q.name().to_ascii_lowercase())
                    .collect();
                let listed: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
                let listed: Vec<&str> = listed.iter().map(String::as_str).collect();
                let hint =
                    did_you_mean(&text.to_ascii_lowercase(), known.iter().map(String::as_str))
                        .or_else(|| {
                            let hint = unknown
                                .hint
                                .trim()
                                .trim_start_matches('(')
                                .trim_end_matches(')');
                            (!hint.is_empty()).then(|| hint.to_owned())
                        });
                self.error(
                    Diagnostic::error(
                        Code::BadValue,
                        format!(
                            "expected a GGUF type ({}) for `{field}`, found `{text}`",
                            join_or(&listed)
                        ),
                    )
                    .at(expr.span)
                    .with_hint_opt(hint),
                );
                None
            }
        }
    }
}
