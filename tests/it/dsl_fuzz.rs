//! The `check` fuzz target's regression corpus (`tests/fixtures/check_corpus`): the slow inputs of
//! issue 14 item 8 and every input a campaign found, replayed through the target's own body
//! ([`crate::fuzz_support::check_bytes`]: no panic, every diagnostic inside its file, parsing work at
//! most `PARSE_WORK_PER_BYTE` times the input). `fuzz/README.md` says how to run a campaign.

use std::path::Path;

use crate::fuzz_support::{check_bytes, confine};

#[test]
fn every_corpus_input_checks_within_its_work_bound() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/check_corpus");
    let mut paths: Vec<_> = std::fs::read_dir(&corpus)
        .expect("the corpus folder")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    paths.sort();
    assert!(paths.len() >= 9, "the corpus lost files: {paths:?}");
    let dir = tempfile::tempdir().expect("temp dir");
    for path in paths {
        let data = std::fs::read(&path).expect("a corpus file");
        eprintln!("{}", path.display());
        check_bytes(dir.path(), &data);
    }
}

#[test]
fn confine_keeps_every_path_inside_the_folder() {
    let cases: [(&str, &str); 6] = [
        ("import \"/etc/passwd\"", "import \"_etc/passwd\""),
        ("file(\"../../secret\")", "file(\"._/._/secret\")"),
        ("local(\"~/models\")", "local(\"_/models\")"),
        (
            "user = \"\"\"\n    /etc/shadow\n\"\"\"",
            "user = \"\"\"\n    _etc/shadow\n\"\"\"",
        ),
        ("x = \"\\\n/etc\"", "x = \"\\\n_etc\""),
        // Comments and paths below the folder are kept.
        (
            "// a comment\nfolder(\"photos/cats\")",
            "// a comment\nfolder(\"photos/cats\")",
        ),
    ];
    for (input, expected) in cases {
        assert_eq!(
            String::from_utf8(confine(input.as_bytes())).expect("utf-8"),
            expected
        );
    }
}

/// A mutation campaign over the same body as the cargo-fuzz target, without coverage guidance,
/// for machines where the instrumented build is out of reach: `FUZZ_RUNS` executions (default
/// 10^6) of seeds from the corpus and the shipped pipelines, mutated by a seeded PRNG
/// (`FUZZ_SEED`), at most 4096 bytes each. An input that panics or takes over 2 s is written to
/// `target/fuzz-findings/` before the test fails.
#[test]
#[ignore = "a fuzz campaign: minutes"]
fn mutation_campaign() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for folder in [
        "tests/fixtures/check_corpus",
        "pipelines",
        "examples",
        "tests/fixtures/dsl/valid",
        "tests/fixtures/dsl/errors",
    ] {
        for entry in std::fs::read_dir(root.join(folder))
            .expect("a seed folder")
            .flatten()
        {
            if let Ok(mut data) = std::fs::read(entry.path()) {
                data.truncate(4096);
                seeds.push(data);
            }
        }
    }
    let runs: u64 = std::env::var("FUZZ_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut state: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        | 1;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    const TOKENS: &[&str] = &[
        "dataset d ",
        "model m = ",
        "prompt p ",
        "eval e ",
        "labels l = ",
        "split s = ",
        "grammar g = ",
        "finetune f ",
        "report r ",
        "param x = ",
        "import ",
        "pipeline p ",
        "json",
        "json(",
        "one_of(",
        "hf(",
        "init(preset: ",
        "file(",
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
        "0",
        "-1",
        "1.5",
        "5e-4",
        "true",
        "{%",
        "%}",
        "{{",
        "}}",
        "{% include \"a\" %}",
        "\\",
        "é",
        "\t",
        "\0",
        "99999999999999999999999",
        "source = ",
        "user = ",
        "labels = ",
        "data = ",
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let findings = root.join("target/fuzz-findings");
    let start = std::time::Instant::now();
    let mut slowest = std::time::Duration::ZERO;
    for run in 0..runs {
        let mut data = seeds[(next() % seeds.len() as u64) as usize].clone();
        for _ in 0..=next() % 8 {
            let at = if data.is_empty() {
                0
            } else {
                (next() % (data.len() as u64 + 1)) as usize
            };
            match next() % 6 {
                0 if !data.is_empty() => {
                    let end = (at + 1 + (next() % 32) as usize).min(data.len());
                    data.drain(at.min(end)..end);
                }
                1 => {
                    let token = TOKENS[(next() % TOKENS.len() as u64) as usize];
                    data.splice(at..at, token.bytes());
                }
                2 if at < data.len() => data[at] = next() as u8,
                3 if !data.is_empty() => {
                    let from = (next() % data.len() as u64) as usize;
                    let end = (from + 1 + (next() % 64) as usize).min(data.len());
                    let copy = data[from..end].to_vec();
                    data.splice(at..at, copy);
                }
                4 => {
                    let other = &seeds[(next() % seeds.len() as u64) as usize];
                    if !other.is_empty() {
                        let from = (next() % other.len() as u64) as usize;
                        let end = (from + 1 + (next() % 256) as usize).min(other.len());
                        data.splice(at..at, other[from..end].iter().copied());
                    }
                }
                _ => {
                    let token = TOKENS[(next() % TOKENS.len() as u64) as usize];
                    let n = 1 + (next() % 64) as usize;
                    data.splice(at..at, token.repeat(n).into_bytes());
                }
            }
            data.truncate(4096);
        }
        let t = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(|| check_bytes(dir.path(), &data));
        let took = t.elapsed();
        slowest = slowest.max(took);
        if outcome.is_err() || took > std::time::Duration::from_secs(2) {
            std::fs::create_dir_all(&findings).expect("findings folder");
            let path = findings.join(format!("run-{run}"));
            std::fs::write(&path, &data).expect("write the finding");
            panic!(
                "run {run}: {} after {took:?}; input in {}",
                if outcome.is_err() { "panic" } else { "slow" },
                path.display()
            );
        }
        if (run + 1) % 100_000 == 0 {
            eprintln!(
                "{} runs in {:.0?} (slowest {slowest:?})",
                run + 1,
                start.elapsed()
            );
        }
    }
    eprintln!(
        "campaign: {runs} runs in {:.1?}, slowest run {slowest:?}, no findings",
        start.elapsed()
    );
}
