//! The `check` fuzz target's regression corpus (`tests/fixtures/check_corpus`): the slow inputs of
//! issue 14 item 8 and every input a campaign found, replayed through the target's own body
//! ([`vlmpipe::testing::check_bytes`]: no panic, every diagnostic inside its file, parsing work at
//! most `PARSE_WORK_PER_BYTE` times the input). `fuzz/README.md` says how to run a campaign.

use std::path::Path;

use vlmpipe::testing::{check_bytes, confine};

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
