//! Property tests: parsing and checking never panic, whatever the input, and every diagnostic
//! points inside its file. Stands in for a `cargo fuzz` target so it runs in CI.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use vlmpipe::plan::{check_source, render_diagnostics, render_json};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dsl")
        .join(rel)
}

/// Checks `text` as if it were the fixture `rel`, renders everything, and checks spans.
fn check_all(rel: &str, text: &str) {
    let path = fixture(rel);
    let result = check_source(&path, text, &[("n_eval".to_owned(), "7".to_owned())]);
    let _ = render_diagnostics(&result, true);
    let _ = render_json(&result);
    for d in &result.diagnostics {
        assert!(!d.message.is_empty());
        for label in &d.labels {
            let file = result
                .sources
                .get(label.span.file)
                .expect("label file is known");
            assert!(label.span.start <= label.span.end);
            assert!(label.span.end as usize <= file.text.len(), "{d:?}");
        }
    }
    if let Some(plan) = &result.plan {
        for node in &plan.nodes {
            assert!(node.inputs.iter().all(|i| i.0 < node.id.0));
            let _ = node.canonical_params();
        }
        let _ = vlmpipe::plan::graph::render_text(plan);
    }
}

fn seed_text(rel: &str) -> String {
    std::fs::read_to_string(fixture(rel)).unwrap_or_default()
}

/// Fragments that steer random text towards the grammar's interesting corners.
const TOKENS: &[&str] = &[
    "pipeline",
    "param",
    "import",
    "labels",
    "dataset",
    "split",
    "prompt",
    "model",
    "grammar",
    "eval",
    "finetune",
    "report",
    "json",
    "one_of",
    "sample",
    "shuffle",
    "hf",
    "stratified",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    "=",
    ":",
    ",",
    ";",
    ".",
    "->",
    "?",
    "\"",
    "\"\"\"",
    "//",
    "\n",
    " ",
    "x",
    "pets",
    "a.b",
    "0",
    "-1",
    "1.5",
    "5e-4",
    "true",
    "{%",
    "%}",
    "{{",
    "}}",
    "\\",
    "é",
    "\t",
    "99999999999999999999999",
];

fn token_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(TOKENS), 0..60).prop_map(|t| t.join(""))
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, token: &'static str },
    Swap { at: usize, byte: u8 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1usize..40).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), prop::sample::select(TOKENS))
            .prop_map(|(at, token)| Mutation::Insert { at, token }),
        (any::<usize>(), 0x20u8..0x7f).prop_map(|(at, byte)| Mutation::Swap { at, byte }),
    ]
}

/// Applies mutations on char boundaries (the input stays valid UTF-8, as files read as text are).
fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut s = text.to_owned();
    for m in mutations {
        let boundary = |s: &str, at: usize| {
            let mut at = if s.is_empty() { 0 } else { at % (s.len() + 1) };
            while !s.is_char_boundary(at) {
                at -= 1;
            }
            at
        };
        match m {
            Mutation::Delete { at, len } => {
                let start = boundary(&s, *at);
                let end = boundary(&s, (start + len).min(s.len()));
                s.replace_range(start..end.max(start), "");
            }
            Mutation::Insert { at, token } => {
                let at = boundary(&s, *at);
                s.insert_str(at, token);
            }
            Mutation::Swap { at, byte } => {
                let at = boundary(&s, *at);
                if at < s.len() {
                    let next = s[at..].chars().next().map_or(1, char::len_utf8);
                    s.replace_range(at..at + next, &char::from(*byte).to_string());
                }
            }
        }
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        check_all("valid/cats_vs_dogs.vp", &text);
    }

    #[test]
    fn token_soup_never_panics(text in token_soup()) {
        check_all("valid/cats_vs_dogs.vp", &text);
    }

    #[test]
    fn mutated_cats_vs_dogs_never_panics(mutations in prop::collection::vec(mutation(), 1..6)) {
        let text = mutate(&seed_text("valid/cats_vs_dogs.vp"), &mutations);
        check_all("valid/cats_vs_dogs.vp", &text);
    }

    #[test]
    fn mutated_human_actions_never_panics(mutations in prop::collection::vec(mutation(), 1..6)) {
        let text = mutate(&seed_text("valid/human_actions.vp"), &mutations);
        check_all("valid/human_actions.vp", &text);
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let cases = [("[", "]"), ("{a: ", "}"), ("f(", ")"), ("json { a: ", "}")];
    for (open, close) in cases {
        for text in [
            format!("labels l = {}", open.repeat(50_000)),
            format!(
                "grammar g = json {{ a: {}1{} }}",
                open.repeat(20_000),
                close.repeat(20_000)
            ),
        ] {
            let path = fixture("valid/cats_vs_dogs.vp");
            let result = check_source(&path, &text, &[]);
            assert!(result.plan.is_none());
            assert!(!result.diagnostics.is_empty());
        }
    }
}
