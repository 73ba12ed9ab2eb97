//! `--device` and the cache: the device is where a stage computes, not what it computes, so
//! switching it (flag or `VLMPIPE_DEVICE`) must never change a fingerprint; and the eval and
//! finetune stages record which device ran them.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A tiny eval and a two-step fine-tune on the random `init` model: seconds, offline.
const PIPELINE: &str = r#"
pipeline device_cache { seed = 5 }

labels colours = ["red circle", "blue circle"]

dataset pictures {
  source = synthetic(kind: "shapes", n: 8, seed: 1, size: 32, colors: "red,blue", shapes: "circle")
  label  = "class"
  labels = colours
}

split parts = stratified(pictures, train: 0.5, test: 0.5, seed: 42)

prompt ask { user = "Which colour? Answer red circle or blue circle." }

model tiny = init(preset: "tiny", seed: 1)

grammar one_colour = one_of(colours)

eval judged { model = tiny  data = sample(parts.test, 2)  prompt = ask  labels = colours  output = one_colour }

finetune tuned {
  base = tiny
  data = parts.train
  prompt = ask
  labels = colours
  lora { r = 2  alpha = 4  dropout = 0  targets = ["w1"] }
  max_steps = 2
  batch_size = 2
}
"#;

/// `vlmpipe run` of the pipeline in `dir` with `extra` flags and environment; the summary JSON.
fn run(
    dir: &Path,
    extra: &[&str],
    env: Option<(&str, &str)>,
) -> Result<Value, Box<dyn std::error::Error>> {
    let summary = dir.join("summary.json");
    let mut command = Command::new(env!("CARGO_BIN_EXE_vlmpipe"));
    command
        .arg("run")
        .arg(dir.join("p.vp"))
        .arg("--quiet")
        .arg("--summary-json")
        .arg(&summary)
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("VLMPIPE_DEVICE")
        .env_remove("VLMPIPE_CACHE");
    if let Some((key, value)) = env {
        command.env(key, value);
    }
    let out = command.output()?;
    assert!(
        out.status.success(),
        "vlmpipe run failed:\n{}",
        stderr(&out)
    );
    Ok(serde_json::from_slice(&std::fs::read(summary)?)?)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `(stage, status, fingerprint)`.
type StageRow = (String, String, String);

/// Every stage's row, in summary order.
fn stages(summary: &Value) -> Result<Vec<StageRow>, Box<dyn std::error::Error>> {
    let stages = summary["stages"].as_array().ok_or("no stages")?;
    stages
        .iter()
        .map(|s| {
            let text = |key: &str| s[key].as_str().map(str::to_owned).ok_or(key.to_owned());
            Ok((text("name")?, text("status")?, text("fingerprint")?))
        })
        .collect()
}

/// The stage metadata in the manifest of `stage`'s cache entry.
fn stage_metadata(
    dir: &Path,
    summary: &Value,
    stage: &str,
) -> Result<Value, Box<dyn std::error::Error>> {
    let fingerprint = stages(summary)?
        .into_iter()
        .find(|(name, _, _)| name == stage)
        .map(|(_, _, fp)| fp)
        .ok_or("stage not in the summary")?;
    let manifest = dir
        .join(".vlmpipe/entries")
        .join(fingerprint)
        .join("manifest.json");
    let manifest: Value = serde_json::from_slice(&std::fs::read(&manifest)?)?;
    Ok(manifest["metadata"]["stage"].clone())
}

#[test]
fn switching_the_device_reuses_every_cached_stage() -> TestResult {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("p.vp"), PIPELINE)?;

    let first = run(dir.path(), &[], None)?;
    let first_stages = stages(&first)?;
    assert!(
        first_stages
            .iter()
            .any(|(name, status, _)| name == "judged" && status == "ran"),
        "{first_stages:?}"
    );
    assert!(
        first_stages.iter().all(|(_, status, _)| status == "ran"),
        "{first_stages:?}"
    );

    // The default (`auto`) is the CPU here, and the entries say so.
    let judged = stage_metadata(dir.path(), &first, "judged")?;
    assert_eq!(judged["device"], "cpu", "{judged}");
    assert_eq!(judged["dtype"], "f32", "{judged}");
    assert_eq!(
        stage_metadata(dir.path(), &first, "tuned")?["device"],
        "cpu"
    );

    // Explicitly by flag, then by environment: nothing reruns, every fingerprint is the same.
    for (flags, env) in [
        (&["--device", "cpu"][..], None),
        (&[][..], Some(("VLMPIPE_DEVICE", "cpu"))),
    ] {
        let again = stages(&run(dir.path(), flags, env)?)?;
        assert_eq!(again.len(), first_stages.len());
        for ((name, status, fingerprint), (_, _, first_fp)) in again.iter().zip(&first_stages) {
            assert_eq!(status, "cached", "`{name}` reran with {flags:?} {env:?}");
            assert_eq!(fingerprint, first_fp, "`{name}` changed fingerprint");
        }
    }
    Ok(())
}

#[test]
fn a_bad_or_missing_device_stops_the_run_before_any_stage() -> TestResult {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("p.vp"), PIPELINE)?;
    let vlmpipe = |device: &str| {
        Command::new(env!("CARGO_BIN_EXE_vlmpipe"))
            .arg("run")
            .arg(dir.path().join("p.vp"))
            .args(["--quiet", "--device", device])
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("VLMPIPE_CACHE")
            .output()
    };
    let out = vlmpipe("cdua")?;
    assert_eq!(
        out.status.code(),
        Some(2),
        "a usage error: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out)
            .contains("unknown device `cdua`; expected cpu, cuda[:N], metal[:N], gpu or auto"),
        "{}",
        stderr(&out)
    );
    if !cfg!(feature = "cuda") {
        let out = vlmpipe("cuda:0")?;
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("built without it"), "{err}");
        assert!(
            err.contains("cargo install --path . --features cuda"),
            "{err}"
        );
        assert!(
            err.contains("cargo build --release --features cuda"),
            "{err}"
        );
    }
    // Neither attempt ran a stage or left a cache entry.
    let entries = dir.path().join(".vlmpipe/entries");
    let count = std::fs::read_dir(&entries).map(|d| d.count()).unwrap_or(0);
    assert_eq!(count, 0, "entries written under {}", entries.display());
    Ok(())
}

#[test]
fn version_lists_the_compiled_backends() -> TestResult {
    let out = Command::new(env!("CARGO_BIN_EXE_vlmpipe"))
        .arg("--version")
        .output()?;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout)?;
    assert!(text.contains("backends: cpu"), "{text}");
    assert_eq!(text.contains("cuda"), cfg!(feature = "cuda"), "{text}");
    assert_eq!(text.contains("metal"), cfg!(feature = "metal"), "{text}");
    Ok(())
}
