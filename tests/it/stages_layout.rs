//! Issue 15, item 1: lowering is the only part of `src/stages` that reads the plan. Every stage
//! kind is built from plain typed configuration (`XStage::from_config(XConfig)`), so a stage file
//! that names `crate::plan` has started to depend on the pipeline language's types again.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/stages") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn only_lowering_reads_the_plan() {
    let stages = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/stages");
    let lower = stages.join("lower");
    let mut files = Vec::new();
    rust_files(&stages, &mut files);
    files.sort();
    assert!(files.len() > 20, "{} files under src/stages", files.len());
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| !f.starts_with(&lower))
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).expect("read");
            let rel = f.strip_prefix(&stages).unwrap_or(f).display().to_string();
            text.lines()
                .enumerate()
                .filter(|(_, line)| line.contains("crate::plan"))
                .map(|(i, line)| format!("{rel}:{}: {}", i + 1, line.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "stages outside `lower/` read the plan:\n{}",
        offenders.join("\n")
    );
}
