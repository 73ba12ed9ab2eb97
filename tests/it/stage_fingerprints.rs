//! Stage fingerprints pinned: the offline quickstart (`examples/quickstart.vp`) and a small
//! pipeline with the kinds the quickstart lacks (`shuffle`, a `random` split, a JSON grammar, a
//! prompt that reads a param, a bf16 model), each fingerprinted by `vlmpipe run --dry-run`.
//!
//! A fingerprint covers a stage's kind, canonical parameters, external state, inputs and code
//! version, so a changed value here means every cache built before is rerun. Restructuring code
//! must leave these alone; a change of what a stage writes bumps its `code_version`, and then
//! these values are updated with the bump, deliberately.

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
        "e6d5b325707ab6219398b167f895fbb7430daa253b6efee5e0ce5a30c9a02a05",
    ),
    (
        "parts",
        "d9ccce93af1f6f57db17d5be61653ff8330bcc3a0823de4c9768546c4c250285",
    ),
    (
        "ask",
        "3a29e7a33d35dcce51785c745bed3bc74fbbff74f7edfd0e4ada2687b45c6670",
    ),
    (
        "tiny",
        "a27d6da698468a0114aae507840609b5883bed2e545b74444d738c434e1ba977",
    ),
    (
        "sample(parts.test,32,23)",
        "ad29dc31abf40e91769910d640d7c50620b639337131a2fbec138ad2815cebb3",
    ),
    (
        "baseline",
        "42f388f9a5c62835f90d45ac93a1d3bf730f4c34af07e9aac09cd70a040be27e",
    ),
    (
        "one_shape",
        "670be493a0da51862ec05a2418f11708ca9e40634595e00a95788ce897fe3642",
    ),
    (
        "constrained",
        "85863e98715c14e227f3b9e3daaef66f5c76a7f44fc7d6a8c21253576190b88f",
    ),
    (
        "tuned",
        "53735232d163c56587efb48dafe1f3e28af89434349e2e38b2eff3bf0c166975",
    ),
    (
        "tuned_eval",
        "5c1dbd11aa89184508d4075737d7045aab98c4b6a4a942e7612a7206248baaed",
    ),
    (
        "report",
        "736b5bb25dc80980bbf5505240a73f9babd96fd2fa914f58141d46ed1d3b968b",
    ),
];

const OTHER_KINDS: &[(&str, &str)] = &[
    (
        "shapes",
        "d9d4ed759bb18bef2f365869e3961fbbe97748b0b8aa3287e99268d6d30c388f",
    ),
    (
        "pics",
        "28f457cdad00136458f37d246d6624ab851af791f1e5a4a447cc9fb7c2a9ea1a",
    ),
    (
        "shuffle(pics,3)",
        "a49f8da060340c72e2f8d2be3cb517c1c211c1b1fc1e9b75537f1d078f97dbd3",
    ),
    (
        "halves",
        "0af13276f3a19991bce4b9b1d82343323137f71dd2317e97f7a18d1d558fab06",
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
        "c23f452249f523a3062f04aa6ddd5a7e03d337bd93122eaa2f723c19368f5e36",
    ),
    (
        "shuffle(halves.test,4)",
        "947e41fbcd3433b28e84eb6d5e0c02dc9c132fd22fb73d688a7caf4b5a0733a0",
    ),
    (
        "e",
        "22694180eb9cb7be0f10f97ef8baff53df9f437e890b5d5998d3b702cbb95c1a",
    ),
];
