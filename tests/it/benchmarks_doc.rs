//! `BENCHMARKS.md`'s tables are in the layout `vlmpipe bench table` prints: the same header and
//! the same rows in the same order, so a new run's table can replace a dated one.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_vlmpipe");

/// The first cell of each line of a markdown table.
fn first_cells(table: &[&str]) -> Vec<String> {
    table
        .iter()
        .map(|l| l.split('|').nth(1).unwrap_or("").trim().to_owned())
        .collect()
}

#[test]
fn benchmarks_tables_have_the_generators_layout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let side = |vision: f64| {
        serde_json::json!({
            "vision_ms": {"median": vision}, "prompt_forward_ms": {"median": 2000.0},
            "lm_prefill_ms": {"median": 900.0}, "decode_ms_per_token": {"median": 46.0},
            "classify_ms": {"median": 1950.0}, "peak_rss_mib": 2800.0,
        })
    };
    let report = serde_json::json!({
        "decode_steps": 3, "vlmpipe": side(920.0), "transformers": side(1310.0),
    });
    let path = dir.path().join("run.json");
    std::fs::write(&path, report.to_string()).expect("write report");
    let out = Command::new(BIN)
        .args(["bench", "table"])
        .arg(&path)
        .output()
        .expect("run vlmpipe");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).expect("utf-8");
    let printed: Vec<&str> = printed.lines().collect();
    assert_eq!(printed.len(), 8, "{printed:?}");
    assert_eq!(
        printed[2],
        "| vision tower + projector | 0.92 s | 1.31 s | 0.70 |"
    );

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("BENCHMARKS.md")).expect("BENCHMARKS.md");
    let lines: Vec<&str> = doc.lines().collect();
    let starts: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("| step |"))
        .collect();
    assert!(!starts.is_empty(), "BENCHMARKS.md has no table");
    for start in starts {
        let end = (start..lines.len())
            .find(|&i| !lines[i].starts_with('|'))
            .unwrap_or(lines.len());
        let table = &lines[start..end];
        assert_eq!(
            table[..2],
            printed[..2],
            "header at BENCHMARKS.md:{}",
            start + 1
        );
        assert_eq!(
            first_cells(table),
            first_cells(&printed),
            "rows at BENCHMARKS.md:{}",
            start + 1
        );
    }
    // README links to it and holds no dated table any more.
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    assert!(readme.contains("(BENCHMARKS.md)"));
    assert!(
        !readme.contains(printed[0]),
        "a benchmark table is still in README.md"
    );
}
