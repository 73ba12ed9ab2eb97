//! Documents that tell the truth: README's pipeline example is `examples/shapes_demo.vp`, which
//! `pipeline_run` runs, so the example a newcomer reads is one that works; and `tests/README.md`
//! lists every test module, so it can say what each one needs.

use std::path::Path;

/// The declarations of a pipeline text: comments and blank lines dropped, spaces collapsed.
fn declarations(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn the_readme_example_is_shapes_demo() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let marker = "// examples/shapes_demo.vp";
    let start = readme
        .find(marker)
        .expect("README shows examples/shapes_demo.vp");
    let block = &readme[start..];
    let block = &block[..block.find("```").expect("the example's code block ends")];
    let example =
        std::fs::read_to_string(root.join("examples/shapes_demo.vp")).expect("shapes_demo.vp");
    assert_eq!(declarations(block), declarations(&example));
}

#[test]
fn tests_readme_lists_every_test_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let main = std::fs::read_to_string(root.join("tests/it/main.rs")).expect("tests/it/main.rs");
    let readme = std::fs::read_to_string(root.join("tests/README.md")).expect("tests/README.md");
    let mut modules: Vec<&str> = main
        .lines()
        .filter_map(|l| l.strip_prefix("mod ")?.strip_suffix(';'))
        .filter(|m| !m.ends_with("support"))
        .collect();
    modules.sort_unstable();
    let mut rows: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
        .collect();
    rows.sort_unstable();
    assert_eq!(
        rows, modules,
        "tests/README.md's table against tests/it/main.rs"
    );
}
