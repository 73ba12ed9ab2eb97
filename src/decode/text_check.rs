//! Whether a grammar accepts a whole text: the answer parser's test of validity.
//!
//! The grammar is compiled with llguidance over a one-token-per-byte vocabulary (toktrie's
//! `single_byte_env`), so a text is checked byte by byte against exactly the grammar generation
//! was held to (a regex matched in full, a JSON Schema parsed and validated, a Lark grammar),
//! whatever tokenizer produced it. No second regex or schema engine, so the two never disagree.

use std::sync::{Arc, OnceLock};

use llguidance::{Matcher, ParserFactory};
use toktrie::ApproximateTokEnv;

use crate::decode::spec::GrammarSpec;

/// A grammar ready to test texts, compiled once.
#[derive(Clone)]
pub(crate) struct TextCheck {
    spec: GrammarSpec,
    /// A fresh matcher, cloned for each text; `None` when the grammar does not compile (a
    /// grammar that fails here failed before anything was generated with it).
    matcher: Option<Arc<Matcher>>,
}

impl std::fmt::Debug for TextCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCheck")
            .field("spec", &self.spec)
            .finish()
    }
}

impl PartialEq for TextCheck {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
    }
}

/// The byte-level parser factory, built once per process.
fn factory() -> Option<&'static ParserFactory> {
    static FACTORY: OnceLock<Option<ParserFactory>> = OnceLock::new();
    FACTORY
        .get_or_init(|| {
            let mut factory =
                ParserFactory::new_simple(&ApproximateTokEnv::single_byte_env()).ok()?;
            factory.quiet();
            Some(factory)
        })
        .as_ref()
}

impl TextCheck {
    pub(crate) fn new(spec: &GrammarSpec) -> Self {
        let matcher = spec.to_llguidance().ok().and_then(|grammar| {
            let parser = factory()?.create_parser(grammar).ok()?;
            Some(Arc::new(Matcher::new(Ok(parser))))
        });
        Self {
            spec: spec.clone(),
            matcher,
        }
    }

    /// Whether the grammar accepts all of `text` (and nothing is missing at its end).
    pub(crate) fn accepts(&self, text: &str) -> bool {
        let Some(template) = &self.matcher else {
            return false;
        };
        let mut matcher = Matcher::clone(template);
        // In the single-byte vocabulary, token `b` is the byte `b`.
        let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
        matches!(matcher.validate_tokens(&tokens), Ok(n) if n == tokens.len())
            && matcher.consume_tokens(&tokens).is_ok()
            && matcher.is_accepting().unwrap_or(false)
    }
}
