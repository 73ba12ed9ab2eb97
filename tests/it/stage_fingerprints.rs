//! Stage fingerprints pinned: the offline quickstart (`examples/quickstart.vp`) and a small
//! pipeline with the kinds the quickstart lacks (`shuffle`, a `random` split, a JSON grammar, a
//! prompt that reads a param, a bf16 model), each fingerprinted by `vlmpipe run --dry-run`.
//!
//! A fingerprint covers a stage's kind, canonical parameters, external state, inputs and code
//! version, so a changed value here means every cache built before is rerun. Restructuring code
//! must leave these alone; a change of what a stage writes bumps its `code_version`, and then
//! these values are updated with the bump, deliberately. Updated so far: the data stage's
//! v3 (the read policy), the model stage's v4 (the one random initialiser) and the eval's v5 (an
//! answer closed within its token budget); then the data stage's v4, the eval's v6 and the report's
//! v2 (ingest errors as eval error rows, thumbnails through the capped decoder); each with every
//! fingerprint downstream of them.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vlmpipe");

/// `(stage, fingerprint)` of every stage of `pipeline`, in run order, from a dry run.
fn dry_run_fingerprints(pipeline: &Path, dir: &Path) -> Vec<(String, String)> {
    let summary = dir.join("summary.json");
    let output = Command::new(BIN)
        .arg("run")
        .arg(pipeline)
        .args(["--dry-run", "--quiet", "--cache-dir"])
        .arg(dir.join("cache"))
        .arg("--evals-dir")
        .arg(dir.join("evals"))
        .arg("--summary-json")
        .arg(&summary)
        .current_dir(dir)
        .env_remove("VLMPIPE_CACHE")
        .env("HF_HOME", dir.join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .env("NO_COLOR", "1")
        .output()
        .expect("spawn vlmpipe");
    let text = std::fs::read_to_string(&summary).unwrap_or_else(|_| {
        panic!(
            "no summary; stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let summary: Value = serde_json::from_str(&text).expect("summary JSON");
    summary["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| {
            assert_eq!(s["status"], "would_run", "{s}");
            (
                s["name"].as_str().expect("name").to_owned(),
                s["fingerprint"].as_str().expect("fingerprint").to_owned(),
            )
        })
        .collect()
}

fn assert_pinned(actual: &[(String, String)], pinned: &[(&str, &str)]) {
    let actual: Vec<(&str, &str)> = actual
        .iter()
        .map(|(n, f)| (n.as_str(), f.as_str()))
        .collect();
    assert_eq!(actual, pinned);
}

#[test]
fn quickstart_fingerprints_are_pinned() {
    let dir = tempfile::tempdir().expect("temp folder");
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart.vp");
    let actual = dry_run_fingerprints(&example, dir.path());
    assert_pinned(&actual, QUICKSTART);
}

#[test]
fn other_stage_kinds_fingerprints_are_pinned() {
    let dir = tempfile::tempdir().expect("temp folder");
    let pipeline = dir.path().join("pins.vp");
    std::fs::write(
        &pipeline,
        r#"
pipeline pins { seed = 5 }
param tone = "plain"
param unused = 3
labels shapes = ["red circle", "blue circle"]
dataset pics {
  source = synthetic(kind: "shapes", n: 12, seed: 2, size: 32, colors: "red,blue", shapes: "circle")
  label = "class"
  labels = shapes
}
split halves = random(shuffle(pics, seed: 3), train: 0.5, test: 0.5, seed: 1)
prompt ask { system = "Be {{ tone }}." user = "Which? {% for l in labels %}{{ l }} {% endfor %}" }
grammar answer = json { pred_class: one_of(shapes) }
model tiny = init(preset: "tiny", seed: 2, dtype: "bf16")
eval e { model = tiny  data = shuffle(halves.test, seed: 4)  prompt = ask  labels = shapes  output = answer }
"#,
    )
    .expect("write pipeline");
    let actual = dry_run_fingerprints(&pipeline, dir.path());
    assert_pinned(&actual, OTHER_KINDS);
}

const QUICKSTART: &[(&str, &str)] = &[
    (
        "shapes",
        "1b90d6bce10536aee6dd5ac368b040066d6ad2852885e1322c3d516d2627e6b8",
    ),
    (
        "pictures",
        "f7a3f4a7fddc94cbf86a5ff0336504819ae4258fc6e70d53adc01ff4b3eee311",
    ),
    (
        "parts",
        "44f077a341fd2e9efe3e9fcdba55ee959666032a986b89b2ebbc274bcca29b30",
    ),
    (
        "ask",
        "3a29e7a33d35dcce51785c745bed3bc74fbbff74f7edfd0e4ada2687b45c6670",
    ),
    (
        "tiny",
        "2a1bec3bc312314ef8a2a8dd801b3807aae179d11e5e9d5fc84301ca7e34c96d",
    ),
    (
        "sample(parts.test,32,23)",
        "284c5daa38030ed0dc6f27904c9f53af2a2e0efbae5f661212f33cb679600754",
    ),
    (
        "baseline",
        "ca477b7e48337d4d0e729bef19a754ff5753c36c43634b897b76a057ebc5faab",
    ),
    (
        "one_shape",
        "670be493a0da51862ec05a2418f11708ca9e40634595e00a95788ce897fe3642",
    ),
    (
        "constrained",
        "3221f6d63b113279ba58302bdb42a63b45414df9eae9105dbe11d1017c6ef664",
    ),
    (
        "tuned",
        "617c86d752f7401b10e9501264f954bf980e39cb79e1fdf23ac2eee30dcea8b3",
    ),
    (
        "tuned_eval",
        "f5504723fd63cee506d0051e937fb10338d92ab49ff3380af37748000f19b2ce",
    ),
    (
        "report",
        "bc422fdd2239be8c7e60540829a5d9e4fbac8be895480600d53bd61ad0d49fed",
    ),
];

const OTHER_KINDS: &[(&str, &str)] = &[
    (
        "shapes",
        "d9d4ed759bb18bef2f365869e3961fbbe97748b0b8aa3287e99268d6d30c388f",
    ),
    (
        "pics",
        "79c75f0d159cc9914eac4b5b5dcaa0691a077c1a715c8ceed36bd46e0c0cb35e",
    ),
    (
        "shuffle(pics,3)",
        "41f2a1a10dfedf10e69fc0b95483c1c510b052e43c6fc97f2457286688162863",
    ),
    (
        "halves",
        "223f9c5e9b15071f5a5d9e579bcb9c9f2f913d8dbfb3bcc094411dbbc3516fff",
    ),
    (
        "ask",
        "d0c9d6772585d32e34cc9675e7f402224501192e2342df8f03a70b08370c25d1",
    ),
    (
        "answer",
        "7b14e7532937db98782c114c355c376479e2abec8960f3890c7aaa18e40a14d6",
    ),
    (
        "tiny",
        "abe7c9cbac179d19598319ee4f967dd9a2a89750312c749e8e23956eebbd65f8",
    ),
    (
        "shuffle(halves.test,4)",
        "b0df5cf0d9fce6527917235a1046e74fc82aeffa348a537cc8f2bf99fd88ab76",
    ),
    (
        "e",
        "8f663caabc72a8f7a2c2ebeb4eacb4c5c212d57b8a428f38784c7f327c6bb9e3",
    ),
];
