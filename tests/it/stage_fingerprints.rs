//! Stage fingerprints pinned: the offline quickstart (`examples/quickstart.vp`) and a small
//! pipeline with the kinds the quickstart lacks (`shuffle`, a `random` split, a JSON grammar, a
//! prompt that reads a param, a bf16 model, a GGUF `export`), each fingerprinted by `vlmpipe run --dry-run`.
//!
//! A fingerprint covers a stage's kind, canonical parameters, external state, inputs and code
//! version, so a changed value here means every cache built before is rerun. Restructuring code
//! must leave these alone; a change of what a stage writes bumps its `code_version`, and then
//! these values are updated with the bump, deliberately. Updated so far: the data stage's
//! v3 (the read policy), the model stage's v4 (the one random initialiser) and the eval's v5 (an
//! answer closed within its token budget); at stop 13 the finetune's v5 (LoRA init, dropout and
//! shuffles drawn from `crate::rng`), the data stage's v4, the report's v3 and the eval's v8
//! (sampling from `crate::rng`; ingest errors as eval error rows; thumbnails through the capped
//! decoder; `model_bytes`; sizes and changed answers side by side), each with every fingerprint downstream of them;
//! then the finetune's v6 (fused training ops, issue 17) with its downstream stages.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::offline_vlmpipe;

/// `(stage, fingerprint)` of every stage of `pipeline`, in run order, from a dry run.
fn dry_run_fingerprints(pipeline: &Path, dir: &Path) -> Vec<(String, String)> {
    let summary = dir.join("summary.json");
    let output = offline_vlmpipe(dir)
        .arg("run")
        .arg(pipeline)
        .args(["--dry-run", "--quiet", "--cache-dir"])
        .arg(dir.join("cache"))
        .arg("--evals-dir")
        .arg(dir.join("evals"))
        .arg("--summary-json")
        .arg(&summary)
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
export phone { model = tiny  format = "gguf"  quant = "q8_0"  mmproj = "f16" }
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
        "482d30113108c0d812afcd72b37ddeb7c79947adc751878102dc87d9c781cb4a",
    ),
    (
        "one_shape",
        "670be493a0da51862ec05a2418f11708ca9e40634595e00a95788ce897fe3642",
    ),
    (
        "constrained",
        "29a58f51657762ed4588cf20e44f32a9e6ad1c7c6b3042048cf36efad4f4eb47",
    ),
    (
        "tuned",
        "75b3d618227422f8597d0bda00a81c1f13fd5576abe613d58f8f5c5715398462",
    ),
    (
        "tuned_eval",
        "cc3461d5516472703221db7084029575fbc7915bdd1a3b7e034deb4fb3848bfa",
    ),
    (
        "tuned_q8",
        "09b60619147e7dbd0cc1e713ace04fd40ffd1b4ef6f312e39e3bb142fc2cd0a0",
    ),
    (
        "tuned_q8_eval",
        "40983c5bb14316be107220c4f7a464efdc51eeb0468283f5f71e56df60e9aac5",
    ),
    (
        "report",
        "3da2219a4c39d243c8cdddb27545aa60f26f322a05ee5cb48bb53023214b11f8",
    ),
    (
        "shipped",
        "1268485c1bc35db828c90811f6164993f2f8b8a7f49e8acfd4ef3b57940c0c67",
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
        "ea258111c0433127d31dcf0f36c58a7760caca6024f86d3d128373f59d246be7",
    ),
    (
        "phone",
        "fc3319c0cc691b3e1a6d0b61a185b7c619d439c1536d11e72a67e5f3516c28d3",
    ),
];
