//! The pipeline language end to end: valid pipelines give the expected plan, malformed ones give
//! the exact diagnostics (line:column, message, hint).

use std::path::{Path, PathBuf};

use vlmpipe::plan::{CheckResult, load_pipeline, render_diagnostics};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dsl")
        .join(rel)
}

fn check_ok(rel: &str) -> CheckResult {
    let result = load_pipeline(&fixture(rel), &[]);
    assert!(
        result.diagnostics.is_empty(),
        "{rel}:\n{}",
        render_diagnostics(&result, false)
    );
    result
}

#[test]
fn valid_pipelines_check_cleanly() {
    for rel in ["valid/cats_vs_dogs.vp", "valid/car_makers.vp", "valid/human_actions.vp"] {
        let result = check_ok(rel);
        let plan = result.plan.expect("plan");
        eprintln!("{}", vlmpipe::plan::graph::render_text(&plan));
    }
}
