//! `bench model --llama-cpp DIR`: llama.cpp's `llama-mtmd-cli` on the same checkpoint, exported
//! by vlmpipe (`--llama-cpp-quant` text file, F16 mmproj, as LiquidAI publishes LFM2-VL), the same
//! image and the same conversation, in the same run, with vlmpipe's ratios to it.
//!
//! Timed by the wall clock around whole processes, not by llama.cpp's timing log. That log is
//! written by a worker thread of a logger llama.cpp leaks on purpose (`common_log_main` in
//! `common/log.cpp`: "logs may be lost if not flushed before the program exits"), so its last
//! lines, `llama_perf_context_print`'s timings, are lost whenever the worker has not run between
//! the print and `main`'s return: often on a loaded machine. Reading the pipes fully before
//! `wait` cannot help (the bytes were never written), and retrying only makes the loss rarer.
//! So each repetition runs, back to back, with the same files and `--threads`:
//! - `load`: no image, no prompt, stdin closed: loads both files (and warms up), reads end of
//!   input at its chat prompt and exits;
//! - `short`: the image and conversation, `-n 1` (one token sampled, then decoded);
//! - `long`: the same with `-n 1 + decode_steps --ignore-eos`, `decode_steps` being at least
//!   [`MIN_DECODE_STEPS`]: whole processes' wall clocks vary by a tenth of a second, so the
//!   difference of a few tokens is noise (3 tokens gave −52 ms per token at the 450M shapes).
//!
//! Steps, in `bench model`'s keys: `load_ms` = load; `decode_ms_per_token` = (long − short) /
//! decode_steps (a round whose difference is not positive gives no decode, classify or prefill
//! time rather than a negative one); `classify_ms` = short − load + (D − 1) decode steps, D being
//! `bench model`'s own `--decode-steps` (image file to `1 + D` tokens, as vlmpipe's
//! `classify_ms`, whose last token is not decoded; it includes llama.cpp's
//! image decoding and resizing, vlmpipe's starts from a decoded image); `vision_ms` from the "mtmd
//! batch encoding done in N ms" line, logged seconds before exit (absent, it is reported as
//! missing, not retried); `lm_prefill_ms` = short − load − vision − one decode step (image decode
//! and resize, the prompt and image embeddings through the decoder).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use serde_json::{Value, json};

use crate::gguf::{self, GgufOptions, GgufQuant};

/// The steps compared with vlmpipe's, with `bench model`'s keys.
pub(crate) const LLAMA_STEPS: &[&str] = &[
    "vision_ms",
    "lm_prefill_ms",
    "decode_ms_per_token",
    "classify_ms",
];

/// What to run.
pub(crate) struct LlamaBench<'a> {
    /// The folder holding `llama-mtmd-cli`.
    pub dir: &'a Path,
    pub checkpoint: &'a Path,
    pub quant: GgufQuant,
    pub image: &'a Path,
    pub system: &'a str,
    pub question: &'a str,
    pub threads: usize,
    pub repeats: usize,
    pub decode_steps: usize,
}

/// `llama-mtmd-cli` in `dir` or in `dir/bin` (`build.sh bins` prints the folder whose `bin/`
/// holds it), or an error saying what is missing and how to build it.
pub(crate) fn mtmd_cli(dir: &Path) -> anyhow::Result<PathBuf> {
    let found = [dir.join("llama-mtmd-cli"), dir.join("bin/llama-mtmd-cli")]
        .into_iter()
        .find(|cli| cli.is_file());
    found.ok_or_else(|| {
        anyhow::anyhow!(
            "`{}` has no `llama-mtmd-cli` (from `--llama-cpp`), nor has its `bin/`; build it with \
             `bash tests/llama_cpp/build.sh bins`, which prints the folder whose `bin/` holds it",
            dir.display()
        )
    })
}

/// The milliseconds of the "mtmd batch encoding done in N ms" lines of `log` (one per image
/// chunk), summed; `None` without one.
pub(crate) fn vision_ms(log: &str) -> Option<f64> {
    let mut total = None;
    for line in log.lines() {
        let Some(rest) = line.split("mtmd batch encoding done in ").nth(1) else {
            continue;
        };
        let ms: f64 = rest.split_whitespace().next()?.parse().ok()?;
        *total.get_or_insert(0.0) += ms;
    }
    total
}

/// The fewest tokens llama.cpp's decode is timed over (see the module docs).
pub(crate) const MIN_DECODE_STEPS: usize = 64;

/// One repetition's three process times and the vision line, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Round {
    pub load: f64,
    pub short: f64,
    pub long: f64,
    pub vision: Option<f64>,
}

impl Round {
    /// `load_ms`, then [`LLAMA_STEPS`]; `None` for a step the round could not give. `timed`:
    /// the decode steps between `short` and `long`; `compared`: those of vlmpipe's classify.
    pub(crate) fn steps(&self, timed: usize, compared: usize) -> [Option<f64>; 5] {
        let decode = Some((self.long - self.short) / timed.max(1) as f64).filter(|&d| d > 0.0);
        let classify =
            decode.map(|d| self.short - self.load + compared.saturating_sub(1) as f64 * d);
        let prefill = self
            .vision
            .zip(decode)
            .map(|(vision, d)| self.short - self.load - vision - d);
        [Some(self.load), self.vision, prefill, decode, classify]
    }
}

/// One `llama-mtmd-cli` process: its wall time in milliseconds and its stderr. Both pipes are
/// read to the end before the process is waited for (`Command::output`).
fn run_process(cli: &Path, args: &[&std::ffi::OsStr]) -> anyhow::Result<(f64, String)> {
    let t = Instant::now();
    let output = Command::new(cli)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", cli.display()))?;
    let wall = t.elapsed().as_secs_f64() * 1e3;
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "`{}` failed ({}): {}",
        cli.display(),
        output.status,
        tail(&log, 20)
    );
    Ok((wall, log))
}

/// Exports the checkpoint, times `llama-mtmd-cli` and returns its JSON report: per-step
/// medians, minimums and samples, the files and their sizes.
pub(crate) fn run(bench: &LlamaBench<'_>) -> anyhow::Result<Value> {
    let cli = mtmd_cli(bench.dir)?;
    let decode_steps = bench.decode_steps.max(MIN_DECODE_STEPS);
    let tmp = tempfile::tempdir().context("cannot create a temporary folder")?;
    let t = Instant::now();
    let pair = gguf::export(
        bench.checkpoint,
        tmp.path(),
        &GgufOptions {
            name: "bench".into(),
            quant: bench.quant,
            mmproj_quant: GgufQuant::F16,
            force: false,
        },
    )?;
    eprintln!(
        "exported the checkpoint for llama.cpp ({} + F16 mmproj) in {:.1} s",
        bench.quant,
        t.elapsed().as_secs_f64()
    );
    let threads = bench.threads.to_string();
    let files: Vec<&std::ffi::OsStr> = vec![
        "-m".as_ref(),
        pair.text.path.as_os_str(),
        "--mmproj".as_ref(),
        pair.mmproj.path.as_os_str(),
        "-t".as_ref(),
        threads.as_ref(),
        "-c".as_ref(),
        "4096".as_ref(),
        "--temp".as_ref(),
        "0".as_ref(),
        "--seed".as_ref(),
        "0".as_ref(),
        // The vision line is logged at this verbosity only.
        "-lv".as_ref(),
        "4".as_ref(),
    ];
    let classify = |n: usize| -> anyhow::Result<(f64, String)> {
        let n = n.to_string();
        let mut args = files.clone();
        args.extend::<[&std::ffi::OsStr; 9]>([
            "--image".as_ref(),
            bench.image.as_os_str(),
            "-sys".as_ref(),
            bench.system.as_ref(),
            "-p".as_ref(),
            bench.question.as_ref(),
            "-n".as_ref(),
            n.as_ref(),
            "--ignore-eos".as_ref(),
        ]);
        run_process(&cli, &args)
    };
    let mut rounds = Vec::new();
    // Round 0 warms the page cache and is not recorded.
    for round in 0..=bench.repeats {
        let (load, _) = run_process(&cli, &files)?;
        let (short, log) = classify(1)?;
        let (long, _) = classify(1 + decode_steps)?;
        if round > 0 {
            rounds.push(Round {
                load,
                short,
                long,
                vision: vision_ms(&log),
            });
        }
    }
    if rounds.iter().any(|r| r.vision.is_none()) {
        eprintln!(
            "note: `{}` did not log \"mtmd batch encoding done\" in every run; vision and \
             prefill are left out where it did not",
            cli.display()
        );
    }
    let mut steps = serde_json::Map::new();
    let keys = std::iter::once("load_ms").chain(LLAMA_STEPS.iter().copied());
    for (i, key) in keys.enumerate() {
        let column: Vec<f64> = rounds
            .iter()
            .filter_map(|r| r.steps(decode_steps, bench.decode_steps)[i])
            .collect();
        steps.insert(key.to_owned(), summary(column));
    }
    let walls = |f: fn(&Round) -> f64| summary(rounds.iter().map(f).collect());
    Ok(json!({
        "binary": cli,
        "text_quant": bench.quant.name(),
        "mmproj_quant": "F16",
        "text_bytes": pair.text.bytes,
        "mmproj_bytes": pair.mmproj.bytes,
        "decode_steps": decode_steps,
        "classify_decode_steps": bench.decode_steps,
        "steps": steps,
        "process_ms": {
            "load": walls(|r| r.load),
            "short": walls(|r| r.short),
            "long": walls(|r| r.long),
        },
    }))
}

/// Median, minimum and samples, like `bench model`'s own summaries (`null`s without samples).
fn summary(samples: Vec<f64>) -> Value {
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    };
    json!({"median": median, "min": sorted.first(), "samples": samples})
}

/// vlmpipe's medians over llama.cpp's, for f32 (`ours`) and the quantized side (`quantized`).
pub(crate) fn ratios(llama: &Value, ours: &Value, quantized: Option<&Value>) -> Value {
    let mut out = serde_json::Map::new();
    for key in LLAMA_STEPS {
        let Some(theirs) = llama["steps"][key]["median"].as_f64() else {
            continue;
        };
        let entry = json!({
            "vlmpipe_f32": ours[key]["median"].as_f64().map(|m| m / theirs),
            "vlmpipe_quantized": quantized
                .and_then(|q| q["steps"][key]["median"].as_f64())
                .map(|m| m / theirs),
        });
        out.insert((*key).to_owned(), entry);
    }
    Value::Object(out)
}

/// Prints llama.cpp's table: its steps beside vlmpipe's, with vlmpipe / llama.cpp ratios.
pub(crate) fn print(llama: &Value, ours: &Value, quantized: Option<&Value>) {
    let q_name = quantized
        .and_then(|q| q["quant"].as_str())
        .unwrap_or("quantized");
    println!(
        "llama.cpp ({} text + {} mmproj, {} + {} bytes; wall clock of whole processes, load \
         {} ms apart)",
        llama["text_quant"].as_str().unwrap_or("?"),
        llama["mmproj_quant"].as_str().unwrap_or("?"),
        llama["text_bytes"],
        llama["mmproj_bytes"],
        llama["steps"]["load_ms"]["median"]
            .as_f64()
            .map_or("-".to_owned(), |v| format!("{v:.0}")),
    );
    println!(
        "{:<22} {:>18} {:>12} {:>12} {:>14}",
        "step",
        "llama.cpp ms (min)",
        "f32/llama",
        format!("{q_name}/llama"),
        "vlmpipe f32 ms"
    );
    let ratios = ratios(llama, ours, quantized);
    let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |r| format!("{r:.2}"));
    for key in LLAMA_STEPS {
        let s = &llama["steps"][key];
        let cell = match (s["median"].as_f64(), s["min"].as_f64()) {
            (Some(m), Some(lo)) => format!("{m:.1} ({lo:.1})"),
            _ => "-".to_owned(),
        };
        println!(
            "{:<22} {:>18} {:>12} {:>12} {:>14}",
            key.trim_end_matches("_ms"),
            cell,
            fmt(ratios[key]["vlmpipe_f32"].as_f64()),
            fmt(ratios[key]["vlmpipe_quantized"].as_f64()),
            fmt(ours[key]["median"].as_f64()),
        );
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `build.sh bins` prints is the folder whose `bin/` holds the binary; that folder
    /// works as well as `bin/` itself, and one with neither is refused naming the fix.
    #[test]
    fn the_cli_is_found_in_the_folder_or_its_bin() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("llama-mtmd-cli"), "").unwrap();
        assert_eq!(mtmd_cli(root.path()).unwrap(), bin.join("llama-mtmd-cli"));
        assert_eq!(mtmd_cli(&bin).unwrap(), bin.join("llama-mtmd-cli"));
        let empty = tempfile::tempdir().unwrap();
        let error = mtmd_cli(empty.path()).unwrap_err().to_string();
        assert!(error.contains("build.sh bins"), "{error}");
    }

    /// Lines of a real `llama-mtmd-cli -lv 4` run (the vendored revision of 0.3.36); the
    /// `llama_perf_context_print` lines at the end are the ones the leaked logger loses.
    const LOG: &str = "\
0.00.344.439 I encoding mtmd batch, n_chunks = 1 (done = 1, total = 3)
0.00.489.097 I mtmd batch encoding done in 145 ms
0.03.380.161 I image decoded (batch 1/1) in 17 ms
";

    #[test]
    fn reads_the_vision_line() {
        assert_eq!(vision_ms(LOG), Some(145.0));
        let two = format!("{LOG}0.04.000.000 I mtmd batch encoding done in 5 ms\n");
        assert_eq!(vision_ms(&two), Some(150.0));
        assert_eq!(vision_ms("error: cannot load model"), None);
    }

    /// The steps from the three processes' wall times (numbers worked by hand).
    #[test]
    fn steps_come_from_process_times() {
        let r = Round {
            load: 1000.0,
            short: 3000.0,
            long: 3400.0,
            vision: Some(500.0),
        };
        // decode (3400 - 3000) / 4 = 100; classify 3000 - 1000 + 3 * 100 = 2300;
        // prefill 3000 - 1000 - 500 - 100 = 1400.
        assert_eq!(
            r.steps(4, 4),
            [
                Some(1000.0),
                Some(500.0),
                Some(1400.0),
                Some(100.0),
                Some(2300.0)
            ]
        );
        let lost = Round { vision: None, ..r };
        assert_eq!(lost.steps(4, 4)[1..3], [None, None]);
        // Decode timed over 64 tokens, classify compared at vlmpipe's 3 decode steps:
        // decode (9400 - 3000) / 64 = 100; classify 3000 - 1000 + 2 * 100 = 2200.
        let long = Round { long: 9400.0, ..r };
        assert_eq!(long.steps(64, 3)[3..], [Some(100.0), Some(2200.0)]);
        // Noise larger than the decoding: no time rather than a negative one.
        let noisy = Round { long: 2950.0, ..r };
        assert_eq!(
            noisy.steps(4, 4),
            [Some(1000.0), Some(500.0), None, None, None]
        );
    }
}
