//! Issue 12, item 5: `bench model --llama-cpp DIR` times llama.cpp's `llama-mtmd-cli` on
//! vlmpipe's export of the same checkpoint, image and conversation, in the same run.
//!
//! llama.cpp's own timing lines are not used: its logger's worker thread loses the last lines at
//! exit on a loaded machine (see `src/cli/bench_llama.rs`), so the bench times whole processes.
//! A stand-in `llama-mtmd-cli` that never logs those lines (what a loaded machine produces) pins
//! that down without llama.cpp; the real binary runs where `tests/llama_cpp/build.sh bins` built
//! it (skipping, saying why, elsewhere).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{llama_cpp_cache, repo_root};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The STEPS llama.cpp is compared on.
const STEPS: [&str; 4] = [
    "vision_ms",
    "lm_prefill_ms",
    "decode_ms_per_token",
    "classify_ms",
];

fn bench(llama_dir: &Path, json_out: &Path, extra: &[&str]) -> std::process::Output {
    let fixtures = repo_root().join("tests/fixtures/reference");
    Command::new(env!("CARGO_BIN_EXE_vlmpipe"))
        .args(["bench", "model", "--model"])
        .arg(fixtures.join("checkpoints/tiny-thumb"))
        .arg("--image")
        .arg(fixtures.join("images/photo_512x384.png"))
        .args(["--threads", "1", "--device", "cpu", "--repeats", "2"])
        .args(["--decode-steps", "2", "--llama-cpp"])
        .arg(llama_dir)
        .arg("--json-out")
        .arg(json_out)
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run vlmpipe")
}

/// A stand-in `llama-mtmd-cli`: checks the pair it is given, loads in 0.2 s, then per run
/// logs the vision line (when `vision` is set), sleeps 0.3 s plus 0.25 s per token, and exits
/// without llama.cpp's timing lines, as the real one does when its logger loses them.
fn stand_in(dir: &Path, vision: bool) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let script = format!(
        r#"#!/bin/sh
model=""; mmproj=""; n=""; image=""; prev=""
for a in "$@"; do
  case "$prev" in
    -m) model="$a" ;; --mmproj) mmproj="$a" ;; -n) n="$a" ;; --image) image="$a" ;;
  esac
  prev="$a"
done
case "$model" in *-Q8_0.gguf) ;; *) echo "bad text model $model" >&2; exit 1 ;; esac
case "$mmproj" in *mmproj-*-F16.gguf) ;; *) echo "bad mmproj $mmproj" >&2; exit 1 ;; esac
[ -f "$model" ] && [ -f "$mmproj" ] || {{ echo "missing files" >&2; exit 1; }}
sleep 0.2
[ -z "$image" ] && exit 0
{vision}
sleep 0.3
i=0
while [ "$i" -lt "$n" ]; do sleep 0.25; i=$((i + 1)); done
printf 'cat'
"#,
        vision = if vision {
            r#"echo "0.00.489.097 I mtmd batch encoding done in 7 ms" >&2"#
        } else {
            ""
        }
    );
    let path = dir.join("llama-mtmd-cli");
    std::fs::write(&path, script)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(path)
}

fn median(report: &serde_json::Value, key: &str) -> Option<f64> {
    report["llama_cpp"]["steps"][key]["median"].as_f64()
}

/// Without a single timing line from llama.cpp (a loaded machine's exit), the bench still
/// measures every step, from the processes' wall clock: the stand-in's 0.25 s a token, its
/// 0.2 s load, its logged 7 ms of vision, and the ratios are vlmpipe's medians over these.
#[test]
fn steps_are_timed_without_llama_cpp_timing_lines() -> TestResult {
    let dir = tempfile::tempdir()?;
    stand_in(dir.path(), true)?;
    let json_out = dir.path().join("bench.json");
    let out = bench(dir.path(), &json_out, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("llama.cpp (Q8_0 text + F16 mmproj"),
        "{stdout}"
    );
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_out)?)?;
    for key in STEPS.iter().copied().chain(["load_ms"]) {
        let samples = report["llama_cpp"]["steps"][key]["samples"]
            .as_array()
            .ok_or(key)?;
        assert_eq!(samples.len(), 2, "{key}");
    }
    assert_eq!(median(&report, "vision_ms"), Some(7.0));
    // Process start-up noise is shared by the three processes and cancels in differences;
    // bounds wide enough for a loaded machine, narrow enough to catch a wrong formula.
    let decode = median(&report, "decode_ms_per_token").ok_or("decode")?;
    assert!((150.0..600.0).contains(&decode), "decode {decode} ms");
    let load = median(&report, "load_ms").ok_or("load")?;
    assert!((150.0..2000.0).contains(&load), "load {load} ms");
    // 0.3 s + 3 tokens, less one decode step: about 0.8 s.
    let classify = median(&report, "classify_ms").ok_or("classify")?;
    assert!(
        (600.0..2000.0).contains(&classify),
        "classify {classify} ms"
    );
    for key in STEPS {
        let theirs = median(&report, key).ok_or(key)?;
        let ours = report["vlmpipe"][key]["median"].as_f64().ok_or(key)?;
        let ratio = report["ratios_vlmpipe_over_llama_cpp"][key]["vlmpipe_f32"]
            .as_f64()
            .ok_or(key)?;
        assert!((ratio - ours / theirs).abs() < 1e-9, "{key}");
    }
    Ok(())
}

/// Without the vision line either, vision and prefill are reported missing (not retried, not
/// a failure) and the other steps still are.
#[test]
fn a_missing_vision_line_leaves_out_vision_and_prefill_only() -> TestResult {
    let dir = tempfile::tempdir()?;
    stand_in(dir.path(), false)?;
    let json_out = dir.path().join("bench.json");
    let out = bench(dir.path(), &json_out, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("did not log \"mtmd batch encoding done\""),
        "{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_out)?)?;
    assert_eq!(median(&report, "vision_ms"), None);
    assert_eq!(median(&report, "lm_prefill_ms"), None);
    assert!(median(&report, "decode_ms_per_token").is_some());
    assert!(report["ratios_vlmpipe_over_llama_cpp"]["vision_ms"].is_null());
    Ok(())
}

/// A `--llama-cpp` folder without `llama-mtmd-cli` is refused before any timing, saying how to
/// build it.
#[test]
fn a_folder_without_llama_mtmd_cli_is_refused_before_timing() -> TestResult {
    let empty = tempfile::tempdir()?;
    let out = bench(empty.path(), &empty.path().join("bench.json"), &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("has no `llama-mtmd-cli` (from `--llama-cpp`)")
            && stderr.contains("tests/llama_cpp/build.sh bins"),
        "{stderr}"
    );
    assert!(!empty.path().join("bench.json").exists());
    Ok(())
}

/// The real `llama-mtmd-cli` on vlmpipe's Q8_0 export of the tiny checkpoint, with `--quant
/// q8_0`: every step has its samples and each ratio is vlmpipe's median over llama.cpp's, for
/// f32 and the quantized model. (A tiny model decodes a token in well under the processes'
/// start-up noise, so only the ratios' arithmetic and the slow steps' signs are asserted.)
#[test]
fn the_real_llama_mtmd_cli_is_timed_beside_vlmpipe() -> TestResult {
    let cache = llama_cpp_cache();
    let bin = cache.join("bin");
    if !(cache.join("bin/.ok").is_file() && bin.join("llama-mtmd-cli").is_file()) {
        eprintln!(
            "skipping: llama-mtmd-cli is not built in `{}` (run `bash tests/llama_cpp/build.sh \
             bins`, or set VLMPIPE_LLAMA_CPP_CACHE)",
            cache.display()
        );
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let json_out = dir.path().join("bench.json");
    let out = bench(&bin, &json_out, &["--quant", "q8_0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_out)?)?;
    assert_eq!(report["llama_cpp"]["text_quant"], "Q8_0");
    for key in ["load_ms", "vision_ms"] {
        assert!(median(&report, key).ok_or(key)? > 0.0, "{key}");
    }
    // The tiny checkpoint decodes 64 tokens in tens of milliseconds, about the spread of whole
    // processes' wall clocks on a busy machine (the suite runs beside it): when no round's long
    // run outlasted its short one, the bench reports no decode time, and then, by its rule, no
    // classify or prefill time either rather than a made-up one.
    let decoded = median(&report, "decode_ms_per_token").is_some();
    for key in ["classify_ms", "lm_prefill_ms"] {
        assert_eq!(
            median(&report, key).is_some(),
            decoded,
            "{key} without a decode time"
        );
    }
    for key in STEPS {
        let Some(theirs) = median(&report, key) else {
            continue;
        };
        let ratio = &report["ratios_vlmpipe_over_llama_cpp"][key];
        let ours = report["vlmpipe"][key]["median"].as_f64().ok_or(key)?;
        let quantized = report["quantized"]["steps"][key]["median"]
            .as_f64()
            .ok_or(key)?;
        assert!((ratio["vlmpipe_f32"].as_f64().ok_or(key)? - ours / theirs).abs() < 1e-9);
        assert!(
            (ratio["vlmpipe_quantized"].as_f64().ok_or(key)? - quantized / theirs).abs() < 1e-9
        );
    }
    Ok(())
}
