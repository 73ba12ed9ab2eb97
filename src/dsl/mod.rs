//! The pipeline language front end: pest grammar → AST with spans → diagnostics.
//!
//! [`parser::parse_file`] turns text into an [`ast::File`]; [`loader`] follows imports;
//! [`render`] prints diagnostics. The checked plan lives in [`crate::plan`].

pub mod ast;
pub mod diagnostic;
pub mod loader;
pub mod parser;
pub mod render;
pub mod span;

pub use diagnostic::{Code, Diagnostic, Label, Severity};
pub use span::{FileId, SourceFile, SourceMap, Span};
