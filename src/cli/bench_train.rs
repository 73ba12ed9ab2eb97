//! `vlmpipe bench train`: one LoRA training step at a configuration's shapes
//! ([`crate::train::bench`]), and with `--python` PyTorch + peft's step
//! (`tests/reference/bench_peft_train.py`) on the same weights and sequence in the same run.
//!
//! vlmpipe's step runs first, in this process, so its peak memory is the step's alone; then the
//! random checkpoint (f32, the values of vlmpipe's seed-0 random model) and the example
//! (`input_ids`, `pixel_values`, `answer_start`) are written for the Python side, which loads
//! both. Each side times `--steps` steps after one warm-up and reports medians; the table gives
//! the ratios vlmpipe / PyTorch (PyTorch's forward includes its vision tower, so the table adds
//! vlmpipe's vision to its forward there). Two step rows: like for like (vision every step, as
//! PyTorch + peft runs it) and the fine-tune's steady step (image features cached per image, as
//! `finetune` runs after its first epoch), both against PyTorch's step. On a shared machine
//! compare ratios, not times.

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use crate::cli::Outcome;
use crate::cli::args::BenchTrainArgs;
use crate::cli::bench_cmd::{load_average, print_load, set_threads};
use crate::model::config::Config;
use crate::model::random_checkpoint::write_random_checkpoint;
use crate::train::bench::{BenchInputs, BenchSpec, bench_train_step};
use crate::train::io::write_safetensors;

pub(crate) fn run(args: &BenchTrainArgs) -> anyhow::Result<Outcome> {
    set_threads(args.threads);
    let load_before = load_average();
    let text = std::fs::read_to_string(&args.config).with_context(|| {
        format!(
            "cannot read `{}` (from `--config`); pass an LFM2-VL `config.json`",
            args.config.display()
        )
    })?;
    let cfg = Config::from_json(&text)
        .with_context(|| format!("`{}` is not an LFM2-VL config", args.config.display()))?;
    let spec = BenchSpec {
        patch_rows: args.patch_rows,
        patch_cols: args.patch_cols,
        prompt_tokens: args.prompt_tokens,
        answer_tokens: args.answer_tokens,
        steps: args.steps,
        ..BenchSpec::default()
    };
    let inputs = BenchInputs::new(&cfg, &spec);
    eprintln!("timing vlmpipe's step");
    let ours = serde_json::to_value(bench_train_step(&cfg, &spec)?)?;

    let theirs = match &args.python {
        Some(python) => Some(run_pytorch(python, args, &inputs)?),
        None => None,
    };
    let load_after = load_average();
    print_table(&ours, theirs.as_ref());
    let report = json!({
        "config": args.config,
        "threads": args.threads,
        "steps": args.steps,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "vlmpipe": ours,
        "pytorch": theirs,
        "ratios_ours_over_theirs": theirs.as_ref().map(|t| ratios(&ours, t)),
    });
    print_load(load_before, load_after);
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.json_out {
        std::fs::write(path, &text)
            .with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    Ok(Outcome::Success)
}

/// Writes (or reuses) the random checkpoint and the example, runs the PyTorch benchmark on them
/// and returns its JSON report.
fn run_pytorch(
    python: &Path,
    args: &BenchTrainArgs,
    inputs: &BenchInputs,
) -> anyhow::Result<Value> {
    anyhow::ensure!(
        args.peft_script.is_file(),
        "the PyTorch benchmark `{}` (from `--peft-script`) is not there; run from the repository root or pass its path",
        args.peft_script.display()
    );
    let temp = tempfile::tempdir().context("cannot create a temporary folder")?;
    let dir = args
        .random_dir
        .clone()
        .unwrap_or_else(|| temp.path().join("checkpoint"));
    random_checkpoint(&args.config, &dir)?;
    let inputs_path = temp.path().join("inputs.safetensors");
    let dev = Device::Cpu;
    let ids: Vec<i64> = inputs.input_ids.iter().map(|&i| i64::from(i)).collect();
    let len = ids.len();
    let patches = inputs.pixels.len() / inputs.patch_dim.max(1);
    write_safetensors(
        &inputs_path,
        &[
            ("input_ids".into(), Tensor::from_vec(ids, (1, len), &dev)?),
            (
                "pixel_values".into(),
                Tensor::from_vec(inputs.pixels.clone(), (1, patches, inputs.patch_dim), &dev)?,
            ),
            (
                "answer_start".into(),
                Tensor::new(&[inputs.answer_start as i64], &dev)?,
            ),
        ],
    )?;
    eprintln!(
        "timing PyTorch + peft: {} {}",
        python.display(),
        args.peft_script.display()
    );
    let output = Process::new(python)
        .arg(&args.peft_script)
        .arg(&args.config)
        .args(["--steps", &args.steps.to_string()])
        .args(["--patch-rows", &args.patch_rows.to_string()])
        .args(["--patch-cols", &args.patch_cols.to_string()])
        .args(["--prompt-tokens", &args.prompt_tokens.to_string()])
        .args(["--answer-tokens", &args.answer_tokens.to_string()])
        .arg("--checkpoint")
        .arg(&dir)
        .arg("--inputs")
        .arg(&inputs_path)
        .env("HF_HUB_OFFLINE", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run `{}`", python.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "the PyTorch benchmark failed ({}); its messages are above",
        output.status
    );
    serde_json::from_slice(&output.stdout).context("the PyTorch benchmark printed invalid JSON")
}

/// `dir` holding an f32 random checkpoint of `config` (seed 0: vlmpipe's benchmark weights),
/// written unless it is already there for the same config.
fn random_checkpoint(config: &Path, dir: &Path) -> anyhow::Result<()> {
    let source: PathBuf = config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    anyhow::ensure!(
        config.file_name().is_some_and(|n| n == "config.json"),
        "`--python` needs `--config` to name a `config.json` (its folder's tokenizer and processor files go into the checkpoint)"
    );
    let same = std::fs::read(dir.join("config.json")).ok() == std::fs::read(config).ok();
    if same && dir.join("model.safetensors").is_file() {
        eprintln!("reusing random checkpoint `{}`", dir.display());
        return Ok(());
    }
    let t = Instant::now();
    let n = write_random_checkpoint(&source, dir, DType::F32, 0)?;
    eprintln!(
        "wrote a random checkpoint ({n} parameters, f32) to `{}` in {:.1} s",
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The step as PyTorch + peft runs it: the vision tower every step.
const LIKE_FOR_LIKE: &str = "step ms, like for like (vision every step)";
/// `finetune`'s step after its first epoch: image features cached per image, against the same
/// PyTorch step (which runs its vision tower every step).
const STEADY: &str = "step ms, fine-tune steady (vision cached)";

/// Rows of the table: label, vlmpipe's value, PyTorch's value (same keys in both reports, except
/// the forward: PyTorch's includes its vision tower).
fn rows(ours: &Value, theirs: Option<&Value>) -> Vec<(&'static str, Option<f64>, Option<f64>)> {
    let get = |v: &Value, key: &str| v[key].as_f64();
    let ours_forward = match (get(ours, "vision_ms"), get(ours, "forward_ms")) {
        (Some(a), Some(b)) => Some(a + b),
        _ => None,
    };
    let theirs_of = |key: &str| theirs.and_then(|t| get(t, key));
    vec![
        ("vision + projector ms", get(ours, "vision_ms"), None),
        (
            "forward ms (with vision)",
            ours_forward,
            theirs_of("forward_ms"),
        ),
        (
            "backward ms",
            get(ours, "backward_ms"),
            theirs_of("backward_ms"),
        ),
        (
            "optimizer ms",
            get(ours, "optimizer_ms"),
            theirs_of("optimizer_ms"),
        ),
        (
            LIKE_FOR_LIKE,
            get(ours, "median_step_ms"),
            theirs_of("median_step_ms"),
        ),
        (
            STEADY,
            get(ours, "median_steady_step_ms"),
            theirs_of("median_step_ms"),
        ),
        (
            "peak RSS MiB",
            get(ours, "peak_rss_mib"),
            theirs_of("peak_rss_mib"),
        ),
    ]
}

/// vlmpipe / PyTorch for every row both sides have.
fn ratios(ours: &Value, theirs: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for (label, a, b) in rows(ours, Some(theirs)) {
        if let (Some(a), Some(b)) = (a, b) {
            out.insert(label.to_owned(), json!(a / b));
        }
    }
    Value::Object(out)
}

fn print_table(ours: &Value, theirs: Option<&Value>) {
    println!(
        "one LoRA step: {} tokens ({} image tokens), {} trained parameters",
        ours["sequence_tokens"], ours["image_tokens"], ours["trained_parameters"]
    );
    println!(
        "{:<44} {:>10} {:>14} {:>12}",
        "median", "vlmpipe", "pytorch+peft", "ours/theirs"
    );
    let cell = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    for (label, a, b) in rows(ours, theirs) {
        let ratio = match (a, b) {
            (Some(a), Some(b)) => format!("{:.2}x", a / b),
            _ => "-".to_owned(),
        };
        println!("{label:<44} {:>10} {:>14} {ratio:>12}", cell(a), cell(b));
    }
    if let Some(kernels) = ours["kernel_ms_per_step"]
        .as_array()
        .filter(|k| !k.is_empty())
    {
        println!("vlmpipe's fused kernels, ms per step (VLMPIPE_TRAIN_PROFILE=1):");
        for entry in kernels {
            if let (Some(kind), Some(ms)) = (entry[0].as_str(), entry[1].as_f64()) {
                println!("  {kind:<42} {ms:>10.1}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_compare_forward_with_vision_and_skip_missing_rows() {
        let ours = json!({"vision_ms": 100.0, "forward_ms": 300.0, "backward_ms": 200.0,
            "optimizer_ms": 10.0, "median_step_ms": 610.0, "median_steady_step_ms": 488.0,
            "peak_rss_mib": 1000.0});
        let theirs = json!({"forward_ms": 800.0, "backward_ms": 400.0, "median_step_ms": 1220.0,
            "peak_rss_mib": 2000.0});
        let r = ratios(&ours, &theirs);
        assert_eq!(r["forward ms (with vision)"].as_f64(), Some(0.5));
        assert_eq!(r[LIKE_FOR_LIKE].as_f64(), Some(0.5));
        // The steady step (vision cached) against the same PyTorch step.
        assert_eq!(r[STEADY].as_f64(), Some(0.4));
        assert_eq!(r["peak RSS MiB"].as_f64(), Some(0.5));
        assert!(r.get("optimizer ms").is_none());
        assert!(r.get("vision + projector ms").is_none());
    }
}
