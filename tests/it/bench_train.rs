//! `vlmpipe bench train` on the committed tiny config: vlmpipe's step is timed and split, and
//! with `--python` (a stand-in script here) PyTorch + peft is given the same random checkpoint
//! and the same sequence, and its report becomes the ratios.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn tiny_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference/checkpoints/tiny-nothumb/config.json")
}

fn vlmpipe(args: &[&str]) -> Result<Output, std::io::Error> {
    Command::new(env!("CARGO_BIN_EXE_vlmpipe"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
}

fn bench_args<'a>(config: &'a str, report: &'a str) -> Vec<&'a str> {
    vec![
        "bench",
        "train",
        "--config",
        config,
        "--steps",
        "2",
        "--patch-rows",
        "8",
        "--patch-cols",
        "8",
        "--prompt-tokens",
        "30",
        "--threads",
        "1",
        "--json-out",
        report,
    ]
}

#[test]
fn bench_train_times_and_splits_the_step() -> TestResult {
    let dir = tempfile::tempdir()?;
    let report = dir.path().join("report.json");
    let config = tiny_config();
    let out = vlmpipe(&bench_args(
        config.to_str().unwrap_or_default(),
        report.to_str().unwrap_or_default(),
    ))?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    let ours = &report["vlmpipe"];
    assert_eq!(ours["step_ms"].as_array().map(Vec::len), Some(2));
    assert_eq!(ours["steady_step_ms"].as_array().map(Vec::len), Some(2));
    for key in [
        "vision_ms",
        "forward_ms",
        "backward_ms",
        "optimizer_ms",
        "median_step_ms",
        "median_steady_step_ms",
        "steady_forward_ms",
        "steady_backward_ms",
        "peak_rss_mib",
    ] {
        assert!(
            ours[key].as_f64().is_some_and(|v| v > 0.0),
            "{key}: {}",
            ours[key]
        );
    }
    // r 8 on every LFM2 projection of this config, as PEFT counts it.
    assert_eq!(ours["trained_parameters"], 29_312);
    assert!(report["pytorch"].is_null(), "no python was given");
    Ok(())
}

#[test]
fn bench_train_gives_pytorch_the_same_checkpoint_and_sequence() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let copied = dir.path().join("copied");
    // Records its arguments and copies the inputs file, then reports steps of 1000 ms.
    let fake_python = dir.path().join("python");
    std::fs::write(
        &fake_python,
        format!(
            r#"#!/bin/sh
printf '%s\n' "$@" > '{dir}/args.txt'
while [ $# -gt 0 ]; do
  if [ "$1" = --inputs ]; then cp "$2" '{copied}'; fi
  if [ "$1" = --checkpoint ]; then ls "$2" > '{dir}/checkpoint.txt'; fi
  shift
done
echo '{{"median_step_ms": 1000.0, "forward_ms": 500.0, "backward_ms": 400.0, "optimizer_ms": 100.0, "peak_rss_mib": 1000.0}}'
"#,
            dir = dir.path().display(),
            copied = copied.display()
        ),
    )?;
    std::fs::set_permissions(&fake_python, std::fs::Permissions::from_mode(0o755))?;
    let report = dir.path().join("report.json");
    let config = tiny_config();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/bench_peft_train.py");
    let mut args = bench_args(
        config.to_str().unwrap_or_default(),
        report.to_str().unwrap_or_default(),
    );
    args.extend([
        "--python",
        fake_python.to_str().unwrap_or_default(),
        "--peft-script",
        script.to_str().unwrap_or_default(),
    ]);
    let out = vlmpipe(&args)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let passed = std::fs::read_to_string(dir.path().join("args.txt"))?;
    for expected in [
        "--steps\n2\n",
        "--patch-rows\n8\n",
        "--prompt-tokens\n30\n",
        "--answer-tokens\n2\n",
    ] {
        assert!(
            passed.contains(expected),
            "`{expected}` missing from {passed}"
        );
    }
    let listing = std::fs::read_to_string(dir.path().join("checkpoint.txt"))?;
    assert!(
        listing.contains("model.safetensors") && listing.contains("config.json"),
        "{listing}"
    );
    // The sequence vlmpipe timed: 30 prompt tokens, 16 image tokens, 2 answer tokens.
    let bytes = std::fs::read(&copied)?;
    let inputs = SafeTensors::deserialize(&bytes)?;
    assert_eq!(inputs.tensor("input_ids")?.shape(), &[1, 48]);
    assert_eq!(inputs.tensor("pixel_values")?.shape(), &[1, 64, 768]);
    let start = inputs.tensor("answer_start")?;
    assert_eq!(i64::from_le_bytes(start.data()[..8].try_into()?), 46);

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    let ratios = &report["ratios_ours_over_theirs"];
    let step = report["vlmpipe"]["median_step_ms"]
        .as_f64()
        .ok_or("no step")?;
    // The report went through JSON text, which may move a float by an ulp.
    let ratio = ratios["step ms, like for like (vision every step)"]
        .as_f64()
        .ok_or("no step ratio")?;
    assert!(
        (ratio - step / 1000.0).abs() < 1e-9,
        "{ratio} vs {step} / 1000"
    );
    // The steady step (vision cached) against the same PyTorch step.
    let steady = report["vlmpipe"]["median_steady_step_ms"]
        .as_f64()
        .ok_or("no steady step")?;
    let steady_ratio = ratios["step ms, fine-tune steady (vision cached)"]
        .as_f64()
        .ok_or("no steady step ratio")?;
    assert!((steady_ratio - steady / 1000.0).abs() < 1e-9);
    assert!(ratios["backward ms"].as_f64().is_some_and(|r| r > 0.0));
    Ok(())
}
