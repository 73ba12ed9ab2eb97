//! The pipeline language front end: pest grammar → AST with spans → diagnostics.
