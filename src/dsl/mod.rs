//! The pipeline language front end: pest grammar → AST with spans → diagnostics.
//!
//! [`parser::parse_file`] turns text into an [`ast::File`]; [`loader`] follows imports;
//! [`render`] prints diagnostics. The checked plan lives in [`crate::plan`].

pub(crate) mod ast;
pub(crate) mod diagnostic;
pub(crate) mod loader;
pub mod parser;
pub(crate) mod render;
pub(crate) mod span;

pub use span::{FileId, SourceFile, SourceMap, Span};
