//! `vlmpipe infer` end to end: the built binary on the committed tiny checkpoints against what
//! transformers computed for the same conversation (`tests/fixtures/reference/model/*`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

/// Runs the binary offline, with an empty Hub cache so nothing outside the test is found.
fn vlmpipe(args: &[&str]) -> Result<Output, std::io::Error> {
    let cache = tempfile::tempdir()?;
    Command::new(env!("CARGO_BIN_EXE_vlmpipe"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", cache.path())
        .output()
}

/// One model reference case: its conversation and what transformers produced.
struct Case {
    checkpoint: PathBuf,
    image: PathBuf,
    system: Option<String>,
    prompt: String,
    greedy_tokens: Vec<u32>,
    /// Logits of the prompt's last position (greedy step 0).
    last_logits: Vec<f32>,
    num_tokens: usize,
    num_image_tokens: usize,
}

impl Case {
    fn load(name: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let bytes = std::fs::read(fixtures().join("model").join(format!("{name}.safetensors")))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)?;
        let harness = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("harness"))
            .ok_or("fixture has no harness metadata")?;
        let harness: serde_json::Value = serde_json::from_str(harness)?;
        let st = SafeTensors::deserialize(&bytes)?;
        let greedy: Vec<u32> = st
            .tensor("greedy_tokens")?
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()) as u32)
            .collect();
        let steps = st.tensor("greedy_step_logits")?;
        let vocab = steps.shape()[1];
        let last_logits: Vec<f32> = steps.data()[..vocab * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let text = |key: &str| harness[key].as_str().map(str::to_owned);
        let checkpoint = text("checkpoint").ok_or("no checkpoint")?;
        Ok(Self {
            checkpoint: fixtures().join("checkpoints").join(checkpoint),
            image: fixtures().join(text("image").ok_or("no image")?),
            system: text("system"),
            prompt: text("prompt").ok_or("no prompt")?,
            greedy_tokens: greedy,
            last_logits,
            num_tokens: harness["num_tokens"].as_u64().ok_or("no num_tokens")? as usize,
            num_image_tokens: harness["num_image_tokens"]
                .as_u64()
                .ok_or("no num_image_tokens")? as usize,
        })
    }

    fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "infer",
            "--model",
            self.checkpoint.to_str().unwrap_or_default(),
            "--image",
            self.image.to_str().unwrap_or_default(),
            "--prompt",
            &self.prompt,
        ];
        if let Some(system) = &self.system {
            args.extend(["--system", system.as_str()]);
        }
        args.extend_from_slice(extra);
        args
    }

    /// The greedy tokens up to and including the first EOS, as `generate` stops there.
    fn expected_tokens(&self, eos: u32) -> Vec<u32> {
        match self.greedy_tokens.iter().position(|&t| t == eos) {
            Some(i) => self.greedy_tokens[..=i].to_vec(),
            None => self.greedy_tokens.clone(),
        }
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn json_tokens_and_dumped_logits_match_transformers() -> TestResult {
    let dir = tempfile::tempdir()?;
    for name in [
        "thumb_photo_512x384",
        "thumb_system_333x251",
        "nothumb_tall_800x1400",
        "thumb_gray_300x200",
        // RGBA: the reference composites alpha onto white, and so does `decode_image`.
        "nothumb_alpha_200x150",
    ] {
        let case = Case::load(name)?;
        let logits_path = dir.path().join(format!("{name}.safetensors"));
        let logits_arg = logits_path.to_string_lossy().into_owned();
        let out = vlmpipe(&case.args(&[
            "--json",
            "--max-new-tokens",
            "8",
            "--dump-logits",
            &logits_arg,
        ]))?;
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let tokens: Vec<u32> = serde_json::from_value(report["token_ids"].clone())?;
        // Both tiny checkpoints end turns with `<|im_end|>` = 7 (generation_config.json).
        let expected = case.expected_tokens(7);
        assert_eq!(tokens, expected, "{name}: greedy tokens");
        let finish = if expected.last() == Some(&7) {
            "eos"
        } else {
            "length"
        };
        assert_eq!(report["finish_reason"], finish, "{name}");
        assert_eq!(report["prompt_tokens"], case.num_tokens, "{name}");
        assert_eq!(report["image_tokens"], case.num_image_tokens, "{name}");
        for key in [
            "load_ms",
            "preprocess_ms",
            "vision_ms",
            "prefill_ms",
            "total_ms",
        ] {
            assert!(
                report["timings"][key].as_f64().is_some(),
                "{name}: timing {key}"
            );
        }

        let bytes = std::fs::read(&logits_path)?;
        let st = SafeTensors::deserialize(&bytes)?;
        let logits = st.tensor("logits")?;
        assert_eq!(logits.dtype(), safetensors::Dtype::F32, "{name}");
        assert_eq!(logits.shape(), [case.last_logits.len()], "{name}");
        let ours: Vec<f32> = logits
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let max_abs = case.last_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
        let tol = 5e-4 + 2e-5 * max_abs;
        let worst = ours
            .iter()
            .zip(&case.last_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= tol, "{name}: logits differ by {worst} > {tol}");
    }
    Ok(())
}

#[test]
fn plain_output_is_the_decoded_answer() -> TestResult {
    let case = Case::load("thumb_photo_512x384")?;
    let out = vlmpipe(&case.args(&["--max-new-tokens", "8"]))?;
    assert!(out.status.success(), "{}", stderr(&out));
    let tokenizer = tokenizers::Tokenizer::from_file(case.checkpoint.join("tokenizer.json"))
        .map_err(|e| e.to_string())?;
    let expected = tokenizer
        .decode(&case.expected_tokens(7), true)
        .map_err(|e| e.to_string())?;
    assert!(
        !expected.trim().is_empty(),
        "the fixture answer decodes to text"
    );
    assert_eq!(String::from_utf8(out.stdout)?.trim_end(), expected.trim());
    Ok(())
}

#[test]
fn sampling_flags_are_seeded() -> TestResult {
    let case = Case::load("thumb_tiny_40x30")?;
    let run = |seed: &str| -> Result<serde_json::Value, Box<dyn std::error::Error>> {
        let args = case.args(&[
            "--json",
            "--max-new-tokens",
            "6",
            "--temperature",
            "1.5",
            "--top-p",
            "0.95",
            "--min-p",
            "0.01",
            "--repetition-penalty",
            "1.1",
            "--seed",
            seed,
        ]);
        let out = vlmpipe(&args)?;
        assert!(out.status.success(), "{}", stderr(&out));
        Ok(serde_json::from_slice::<serde_json::Value>(&out.stdout)?["token_ids"].clone())
    };
    assert_eq!(run("3")?, run("3")?, "same seed, same tokens");
    Ok(())
}

#[test]
fn bad_images_and_models_exit_1_with_a_readable_message() -> TestResult {
    let dir = tempfile::tempdir()?;
    let case = Case::load("thumb_tiny_40x30")?;
    let png = std::fs::read(&case.image)?;
    let truncated = dir.path().join("truncated.png");
    std::fs::write(&truncated, &png[..png.len() / 2])?;
    let text = dir.path().join("notes.png");
    std::fs::write(&text, "not an image")?;
    let empty = dir.path().join("empty.jpg");
    std::fs::write(&empty, "")?;
    let missing = dir.path().join("missing.png");
    let model = case.checkpoint.to_string_lossy().into_owned();
    for (image, expected) in [
        (&truncated, "bad image"),
        (&text, "unrecognised image format"),
        (&empty, "image file is empty"),
        (&missing, "cannot read image"),
    ] {
        let image_arg = image.to_string_lossy().into_owned();
        let out = vlmpipe(&[
            "infer", "--model", &model, "--image", &image_arg, "--prompt", "x",
        ])?;
        assert_eq!(out.status.code(), Some(1), "{image_arg}");
        let err = stderr(&out);
        assert!(err.contains(expected), "{image_arg}: {err}");
        assert!(
            err.contains(&image_arg),
            "the message names the file: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }

    let image = case.image.to_string_lossy().into_owned();
    let nowhere = dir.path().join("no-model").to_string_lossy().into_owned();
    let out = vlmpipe(&[
        "infer", "--model", &nowhere, "--image", &image, "--prompt", "x",
    ])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    let out = vlmpipe(&[
        "infer",
        "--model",
        "Org/not-cached-anywhere",
        "--image",
        &image,
        "--prompt",
        "x",
    ])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("HF_HUB_OFFLINE"), "{}", stderr(&out));
    Ok(())
}

/// tiny-realtok with the real LFM2-VL tokenizer and processor files from `../shared`.
#[test]
fn real_tokenizer_case_matches_transformers() -> TestResult {
    let Some(real) = crate::support::shared_path("models/LFM2-VL-450M") else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let ckpt = dir.path().join("tiny-realtok");
    std::fs::create_dir(&ckpt)?;
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
    ] {
        std::fs::copy(real.join(name), ckpt.join(name))?;
    }
    let fixture = fixtures().join("checkpoints/tiny-realtok");
    for name in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(name), ckpt.join(name))?;
    }

    let bytes = std::fs::read(fixtures().join("model/realtok_system_512x384.safetensors"))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)?;
    let harness: serde_json::Value = serde_json::from_str(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("harness"))
            .ok_or("no harness")?,
    )?;
    let ints = |name: &str| -> Result<Vec<i64>, Box<dyn std::error::Error>> {
        Ok(st
            .tensor(name)?
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect())
    };
    let greedy: Vec<u32> = ints("greedy_tokens")?
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let top_indices = ints("greedy_step_topk_indices")?;
    let top_values: Vec<f32> = st
        .tensor("greedy_step_topk_values")?
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    let k = st.tensor("greedy_step_topk_values")?.shape()[1];

    let logits_path = dir.path().join("logits.safetensors");
    let image = fixtures().join(harness["image"].as_str().ok_or("no image")?);
    let args = [
        "infer",
        "--model",
        ckpt.to_str().unwrap_or_default(),
        "--image",
        image.to_str().unwrap_or_default(),
        "--system",
        harness["system"].as_str().ok_or("no system")?,
        "--prompt",
        harness["prompt"].as_str().ok_or("no prompt")?,
        "--max-new-tokens",
        "8",
        "--json",
        "--dump-logits",
        logits_path.to_str().unwrap_or_default(),
    ];
    let out = vlmpipe(&args)?;
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["prompt_tokens"], harness["num_tokens"]);
    assert_eq!(report["image_tokens"], harness["num_image_tokens"]);
    let eos = 7;
    let expected = match greedy.iter().position(|&t| t == eos) {
        Some(i) => greedy[..=i].to_vec(),
        None => greedy.clone(),
    };
    let tokens: Vec<u32> = serde_json::from_value(report["token_ids"].clone())?;
    assert_eq!(tokens, expected);

    let bytes = std::fs::read(&logits_path)?;
    let dumped = SafeTensors::deserialize(&bytes)?;
    let logits: Vec<f32> = dumped
        .tensor("logits")?
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    assert_eq!(logits.len(), 65536);
    let max_abs = top_values[..k].iter().fold(0f32, |m, v| m.max(v.abs()));
    let tol = 5e-4 + 2e-5 * max_abs;
    for (&index, &value) in top_indices[..k].iter().zip(&top_values[..k]) {
        let ours = logits[index as usize];
        assert!(
            (ours - value).abs() <= tol,
            "logit {index}: {ours} vs {value}"
        );
    }
    Ok(())
}

/// The tiny checkpoint and photo `bench model` tests time.
fn bench_inputs() -> (PathBuf, PathBuf) {
    (
        fixtures().join("checkpoints/tiny-thumb"),
        fixtures().join("images/photo_512x384.png"),
    )
}

/// `vlmpipe bench model` on [`bench_inputs`], 1 thread on the CPU, the JSON report at `report`,
/// then `extra`.
fn bench_tiny_model(report: &Path, extra: &[&str]) -> Result<Output, std::io::Error> {
    let (model, image) = bench_inputs();
    let mut args = vec![
        "bench",
        "model",
        "--model",
        model.to_str().unwrap_or_default(),
        "--image",
        image.to_str().unwrap_or_default(),
        "--threads",
        "1",
        "--device",
        "cpu",
        "--json-out",
        report.to_str().unwrap_or_default(),
    ];
    args.extend_from_slice(extra);
    vlmpipe(&args)
}

/// `vlmpipe bench model` on a tiny checkpoint: every step is timed and reported in the JSON.
#[test]
fn bench_model_reports_every_step() -> TestResult {
    let dir = tempfile::tempdir()?;
    let report_path = dir.path().join("bench.json");
    let out = bench_tiny_model(&report_path, &["--repeats", "2"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path)?)?;
    let ours = &report["vlmpipe"];
    for key in [
        "preprocess_ms",
        "vision_ms",
        "prompt_forward_ms",
        "lm_prefill_ms",
        "decode_ms_per_token",
        "classify_ms",
    ] {
        let samples = ours[key]["samples"].as_array().ok_or(key)?;
        assert_eq!(samples.len(), 2, "{key}");
        assert!(
            ours[key]["median"].as_f64().is_some_and(|m| m > 0.0),
            "{key}"
        );
    }
    assert_eq!(ours["num_image_tokens"], 192);
    assert!(ours["peak_rss_mib"].as_f64().is_some_and(|m| m > 0.0));
    assert!(report["transformers"].is_null(), "no python was given");
    assert_eq!(ours["device"], "cpu");
    assert_eq!(
        ours["backends"][0], "cpu",
        "the CPU backend is always compiled"
    );
    Ok(())
}

/// The comparison path, with a stand-in for Python: transformers is asked to do the same work
/// (checkpoint, image, decode steps, dtype, device, threads), and its report becomes the ratios.
#[test]
fn bench_model_gives_transformers_the_same_work_and_reports_ratios() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let (model, image) = bench_inputs();
    let args_log = dir.path().join("args.txt");
    // Records its arguments, then writes a report where every step took 1000 ms.
    let fake_python = dir.path().join("python");
    std::fs::write(
        &fake_python,
        format!(
            r#"#!/bin/sh
printf '%s\n' "$@" > '{log}'
while [ $# -gt 0 ]; do
  if [ "$1" = --json-out ]; then out=$2; fi
  shift
done
step='{{"median": 1000.0, "min": 1000.0, "samples": [1000.0]}}'
printf '{{"preprocess_ms": %s, "vision_ms": %s, "prompt_forward_ms": %s, "lm_prefill_ms": %s, "decode_ms_per_token": %s, "classify_ms": %s, "peak_rss_mib": 1000.0}}' \
  "$step" "$step" "$step" "$step" "$step" "$step" > "$out"
"#,
            log = args_log.display()
        ),
    )?;
    std::fs::set_permissions(&fake_python, std::fs::Permissions::from_mode(0o755))?;
    let script = dir.path().join("bench_transformers.py");
    std::fs::write(&script, "# stand-in\n")?;
    let report_path = dir.path().join("bench.json");
    let out = bench_tiny_model(
        &report_path,
        &[
            "--repeats",
            "1",
            "--decode-steps",
            "2",
            "--python",
            fake_python.to_str().unwrap_or_default(),
            "--transformers-script",
            script.to_str().unwrap_or_default(),
        ],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let args: Vec<String> = std::fs::read_to_string(&args_log)?
        .lines()
        .map(str::to_owned)
        .collect();
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(args[0], script.to_string_lossy());
    assert_eq!(args[1], model.to_string_lossy());
    assert_eq!(value_of("--image"), image.to_string_lossy());
    assert_eq!(value_of("--decode-steps"), "2");
    assert_eq!(value_of("--dtype"), "f32");
    assert_eq!(value_of("--device"), "cpu");
    assert_eq!(value_of("--threads"), "1");
    assert_eq!(value_of("--repeats"), "1");

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path)?)?;
    let ratios = &report["ratios_ours_over_theirs"];
    for key in [
        "vision_ms",
        "lm_prefill_ms",
        "decode_ms_per_token",
        "classify_ms",
    ] {
        let ours = report["vlmpipe"][key]["median"].as_f64().ok_or(key)?;
        let ratio = ratios[key].as_f64().ok_or(key)?;
        assert!(
            (ratio - ours / 1000.0).abs() < 1e-9,
            "{key}: {ratio} vs {ours}"
        );
    }
    assert_eq!(report["decode_steps"], 2);
    assert_eq!(
        report["vlmpipe"]["decode_steps_ms"][0]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    Ok(())
}

/// `vlmpipe bench grammar` with the tiny checkpoint's tokenizer: every grammar gets a row.
#[test]
fn bench_grammar_reports_every_grammar() -> TestResult {
    let tokenizer = fixtures().join("checkpoints/tiny-thumb/tokenizer.json");
    let out = vlmpipe(&[
        "bench",
        "grammar",
        "--tokenizer",
        tokenizer.to_str().unwrap_or_default(),
        "--sequences",
        "3",
        "--compile-repeats",
        "1",
        "--max-tokens",
        "8",
    ])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout)?;
    for row in ["choice-2", "choice-49", "json-object", "load average"] {
        assert!(text.contains(row), "no `{row}` in:\n{text}");
    }

    Ok(())
}

/// Runs the binary from an empty temporary folder with no `VLMPIPE_SHARED`: whatever it reads
/// must come from its arguments.
fn vlmpipe_elsewhere(args: &[&str]) -> Result<Output, std::io::Error> {
    let cwd = tempfile::tempdir()?;
    let cache = tempfile::tempdir()?;
    Command::new(env!("CARGO_BIN_EXE_vlmpipe"))
        .args(args)
        .current_dir(cwd.path())
        .env_remove("VLMPIPE_SHARED")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", cache.path())
        .output()
}

/// Issue 13, item 19: `bench grammar` reads no tokenizer from a path baked in at build time (the
/// shared folder beside the source checkout), and `bench model` none relative to the working
/// folder; a missing or wrong path is an error naming the flag.
#[test]
fn bench_paths_come_from_the_arguments() -> TestResult {
    let out = vlmpipe_elsewhere(&["bench", "grammar", "--sequences", "1"])?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--tokenizer"), "{}", stderr(&out));

    let out = vlmpipe_elsewhere(&["bench", "grammar", "--tokenizer", "no/such/tokenizer.json"])?;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`no/such/tokenizer.json` (from `--tokenizer`) not found"),
        "{}",
        stderr(&out)
    );

    let (model, _) = bench_inputs();
    let model = model.to_str().unwrap_or_default();
    let out = vlmpipe_elsewhere(&["bench", "model", "--model", model, "--device", "cpu"])?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--image"), "{}", stderr(&out));

    let out = vlmpipe_elsewhere(&[
        "bench", "model", "--model", model, "--device", "cpu", "--image", "cat.jpg",
    ])?;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot read image `cat.jpg` (from `--image`)"),
        "{}",
        stderr(&out)
    );
    Ok(())
}

/// `vlmpipe bench ingest` counts the images of a class-per-folder tree.
#[test]
fn bench_ingest_reports_images_per_second() -> TestResult {
    let dir = tempfile::tempdir()?;
    for class in ["a", "b"] {
        std::fs::create_dir(dir.path().join(class))?;
        for i in 0..3u8 {
            image::RgbImage::from_pixel(8, 8, image::Rgb([i, 9, 9]))
                .save(dir.path().join(class).join(format!("{i}.png")))?;
        }
    }
    let out = vlmpipe(&["bench", "ingest", dir.path().to_str().unwrap_or_default()])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout)?;
    assert!(text.starts_with("6 images in "), "{text}");
    assert!(
        text.contains("images/s") && text.contains("0 undecodable"),
        "{text}"
    );
    Ok(())
}

/// `vlmpipe bench rerun` with a small dataset, spawning `vlmpipe run` and in process: the reruns
/// are all cache hits (the command fails otherwise).
#[test]
fn bench_rerun_times_cached_reruns() -> TestResult {
    for mode in [None, Some("--in-process")] {
        let dir = tempfile::tempdir()?;
        let mut args = vec![
            "bench",
            "rerun",
            "--images",
            "20",
            "--reruns",
            "2",
            "--dir",
            dir.path().to_str().unwrap_or_default(),
        ];
        args.extend(mode);
        let out = vlmpipe(&args)?;
        assert!(out.status.success(), "{mode:?}: {}", stderr(&out));
        let text = String::from_utf8(out.stdout)?;
        assert!(text.starts_with("20 images"), "{text}");
        assert!(text.contains("no-change rerun median"), "{text}");
        assert!(dir.path().join("bench.vp").is_file());
    }
    Ok(())
}

#[test]
fn device_flag_runs_on_the_cpu_and_rejects_typos() -> TestResult {
    let case = Case::load("thumb_tiny_40x30")?;
    let json = |device: &str| -> Result<serde_json::Value, Box<dyn std::error::Error>> {
        let out = vlmpipe(&case.args(&["--json", "--max-new-tokens", "4", "--device", device]))?;
        assert!(out.status.success(), "--device {device}: {}", stderr(&out));
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let cpu = json("cpu")?;
    assert_eq!(cpu["device"], "cpu");
    assert_eq!(cpu["dtype"], "f32");
    // `auto` has no GPU to pick here, so it is the CPU with the same answer.
    if !cfg!(any(feature = "cuda", feature = "metal")) {
        let auto = json("auto")?;
        assert_eq!(auto["device"], "cpu");
        assert_eq!(auto["token_ids"], cpu["token_ids"]);
    }

    let out = vlmpipe(&case.args(&["--device", "cdua"]))?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("unknown device `cdua`; expected cpu, cuda[:N], metal[:N], gpu or auto"),
        "{}",
        stderr(&out)
    );
    if !cfg!(feature = "metal") {
        let out = vlmpipe(&case.args(&["--device", "metal"]))?;
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("needs Metal support"), "{err}");
        assert!(err.contains("--features metal"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    Ok(())
}
