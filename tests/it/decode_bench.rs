//! The grammar benchmark (`vlmpipe bench` calls the same function) with the real LFM2 tokenizer.
//! Ignored by default: timings only mean something in release,
//! `cargo test --release --test it decode_bench -- --ignored --nocapture`.

use crate::support::shared_path;
use vlmpipe::decode::{BenchConfig, bench_grammars};

#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn grammar_benchmark() {
    let Some(path) = shared_path("tokenizers/lfm2/tokenizer.json") else {
        return;
    };
    let report = bench_grammars(&path, &BenchConfig::default()).expect("benchmark runs");
    println!("{report}");
    for g in &report.grammars {
        assert!(g.steps > 0, "{}: no steps decoded", g.name);
        assert!(g.finished > 0, "{}: no sequence finished", g.name);
    }
}
