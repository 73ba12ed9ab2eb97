//! Issue 12, item 1: quantized weights in vlmpipe's own runtime (`vlmpipe::model::quant`).
//!
//! - the blocks are ggml's: Q8_0 bytes equal an independent port of `quantize_row_q8_0_ref`;
//! - Q8_0 picks f32's greedy tokens wherever f32's choice is decided, on the committed tiny
//!   checkpoints over several prompts and images;
//! - logits stay close to f32 (relative error and KL bounds) for Q8_0 and Q4_K on a random model
//!   whose widths take every block type, and Q4_K really is coarser than Q8_0;
//! - widths a block type cannot take fall back per tensor as llama.cpp does, and say so;
//! - a LoRA adapter runs on top of a quantized base: `y = x·Wq + scale·(x·A)·B`.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{D, DType, Device, Tensor};
use half::f16;
use vlmpipe::model::chat::Conversation;
use vlmpipe::model::checkpoint::LoadOptions;
use vlmpipe::model::config::Config;
use vlmpipe::model::generate::Sampling;
use vlmpipe::model::lfm2_vl::LogitsMode;
use vlmpipe::model::linear::{LinearAdapter, LinearVisitor};
use vlmpipe::model::load::random_checkpoint::random_model;
use vlmpipe::model::quant::{Quant, QuantWeight, TensorType, quantize_model};
use vlmpipe::runner::{DecodeOptions, ModelRunner};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference")
        .join(rel)
}

/// ggml's `quantize_row_q8_0_ref`, written out: per 32 values, `d = amax / 127` stored as f16,
/// `q = roundf(x * (1/d))` (with the f32 `d`), 2 + 32 bytes a block.
fn ggml_q8_0_reference(row: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in row.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&x| (x * id).round() as i8 as u8));
    }
    out
}

#[test]
fn q8_0_blocks_equal_ggml_reference_quantizer() -> TestResult {
    let (rows, cols) = (6, 96);
    // Values with ties at .5 steps, zeros and a block of zeros: the edge cases of rounding.
    let mut values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.0173 + if i % 7 == 0 { 0.5 } else { 0.0 })
        .collect();
    values[cols..cols + 32].iter_mut().for_each(|v| *v = 0.0);
    let w = Tensor::from_vec(values.clone(), (rows, cols), &Device::Cpu)?;
    let q = QuantWeight::quantize(&w, GgmlDType::Q8_0)?;
    let expected: Vec<u8> = values.chunks(cols).flat_map(ggml_q8_0_reference).collect();
    assert_eq!(q.qtensor()?.data()?.as_ref(), expected.as_slice());
    assert_eq!(q.storage_bytes(), rows * cols / 32 * 34);
    Ok(())
}

/// Config JSON for a random LFM2-VL whose every width is a multiple of 256, so Q4_K applies to
/// every decoder projection without a fallback.
fn wide_config() -> Config {
    Config::from_json(
        r#"{"projector_hidden_size": 256,
            "vision_config": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                              "num_attention_heads": 4},
            "text_config": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                            "block_auto_adjust_ff_dim": false, "block_multiple_of": 256,
                            "layer_types": ["conv", "full_attention", "conv", "full_attention"]}}"#,
    )
    .expect("valid config")
}

/// Relative RMS error of `q` against `reference` and the mean KL(softmax(reference) ‖ softmax(q)).
fn logit_errors(reference: &Tensor, q: &Tensor) -> candle_core::Result<(f32, f32)> {
    let diff = (reference - q)?;
    let rms = |t: &Tensor| -> candle_core::Result<f32> {
        t.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()
    };
    let centered = reference.broadcast_sub(&reference.mean_keepdim(D::Minus1)?)?;
    let rel = rms(&diff)? / rms(&centered)?;
    let lp = candle_nn::ops::log_softmax(reference, D::Minus1)?;
    let lq = candle_nn::ops::log_softmax(q, D::Minus1)?;
    let kl = (lp.exp()? * (&lp - &lq)?)?
        .sum(D::Minus1)?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok((rel, kl))
}

#[test]
fn logits_stay_close_to_f32_for_q8_0_and_q4_k() -> TestResult {
    let cfg = wide_config();
    let reference = random_model(&cfg, &LoadOptions::default(), 11)?;
    let ids = Tensor::new(
        &[[1u32, 17, 300, 42, 9, 511, 77, 128, 5, 64, 3, 250]],
        &Device::Cpu,
    )?;
    let logits = |model: &vlmpipe::model::lfm2_vl::Lfm2VlModel| {
        let mut cache = model.new_cache(1);
        model.forward(&ids, None, None, &mut cache, LogitsMode::All)
    };
    let want = logits(&reference)?;
    let mut errors = Vec::new();
    for quant in [Quant::Q8_0, Quant::Q4K] {
        let mut model = reference.clone();
        let report = quantize_model(&mut model, quant)?;
        assert_eq!(
            report.fallbacks().count(),
            0,
            "{:?}",
            report.fallback_lines()
        );
        let decoder = report
            .tensors
            .iter()
            .find(|t| t.name.ends_with("layers.0.feed_forward.w1"))
            .expect("w1 is quantized");
        let head = report.tensors.last().expect("the head is quantized");
        let expect = match quant {
            Quant::Q8_0 => (GgmlDType::Q8_0, GgmlDType::Q8_0),
            Quant::Q4K => (GgmlDType::Q4K, GgmlDType::Q6K),
        };
        assert_eq!(
            (decoder.chosen, head.chosen),
            (TensorType::Ggml(expect.0), TensorType::Ggml(expect.1))
        );
        assert!(
            report.bytes() * 3 < report.f32_bytes(),
            "{}",
            report.summary()
        );
        let (rel, kl) = logit_errors(&want, &logits(&model)?)?;
        eprintln!("{quant}: relative logit error {rel:.5}, KL {kl:.2e}");
        errors.push((rel, kl));
    }
    let [(q8_rel, q8_kl), (q4_rel, q4_kl)] = errors[..] else {
        unreachable!()
    };
    // Measured 0.036 / 4.1e-3 (Q8_0) and 0.31 / 0.16 (Q4_K) with the shared random initialiser
    // (`model::load::random_checkpoint`): each product errs by 0.8% and 7% (the unit test beside
    // `quant`), and four random layers compound it. The relative error is the scale-free bound;
    // KL grows with the logits' scale, which these random weights make large.
    assert!(
        q8_rel > 0.0 && q8_rel < 0.06,
        "Q8_0 relative error {q8_rel}"
    );
    assert!(q8_kl < 1e-2, "Q8_0 KL {q8_kl}");
    assert!(q4_rel < 0.4, "Q4_K relative error {q4_rel}");
    assert!(q4_kl < 0.4, "Q4_K KL {q4_kl}");
    assert!(q4_kl > q8_kl, "Q4_K moves the distribution more than Q8_0");
    assert!(q4_rel > q8_rel, "Q4_K is coarser than Q8_0");
    Ok(())
}

/// Top token and its lead over the runner-up in one row of logits.
fn top_and_margin(row: &[f32]) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY);
    let mut second = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            second = best.1;
            best = (i, v);
        } else if v > second {
            second = v;
        }
    }
    (best.0, best.1 - second)
}

/// Logits `[positions, vocab]` of `runner`'s model over `prompt` followed by `answer`, at the
/// positions that predict each answer token.
fn answer_logits(
    runner: &ModelRunner,
    prompt: &vlmpipe::runner::PreparedPrompt,
    answer: &[u32],
) -> Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
    let mut ids = prompt.inputs.input_ids.clone();
    ids.extend_from_slice(&answer[..answer.len().saturating_sub(1)]);
    let features = runner.image_features(&prompt.inputs)?;
    let model = runner.model();
    let ids_t = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    let mut cache = model.new_cache(1);
    let logits = model.forward(&ids_t, features.as_ref(), None, &mut cache, LogitsMode::All)?;
    let start = prompt.inputs.input_ids.len() - 1;
    Ok(logits
        .squeeze(0)?
        .narrow(0, start, answer.len())?
        .to_vec2::<f32>()?)
}

/// Q8_0 against f32 on the committed tiny checkpoints, several prompts and images, along f32's
/// greedy answers (teacher-forced): wherever f32's choice is decided (its top token leads by
/// more than `DECIDED` in logits of about ±10), Q8_0 picks the same token. These random-weight
/// models have many close calls (a tenth of the steps lead by under 0.12) and Q8_0 moves their
/// logits by up to about 1.7 (measured: every disagreement led by under 0.45), so identical
/// answers are required for most cases, not all (25 of 36 when this was written).
#[test]
fn q8_0_picks_the_f32_greedy_tokens_on_the_tiny_checkpoints() -> TestResult {
    const DECIDED: f32 = 1.0;
    let images = [
        "photo_512x384.png",
        "odd_333x251.png",
        "gray_300x200.png",
        "lora_a_64x48.png",
    ];
    let questions = [
        "Cat or dog?",
        "What animal is this? Answer in one word.",
        "Describe the picture.",
    ];
    let greedy = DecodeOptions {
        max_new_tokens: 6,
        sampling: Sampling::default(),
    };
    let (mut steps, mut decided, mut same_answers, mut answers) = (0, 0, 0, 0);
    let mut max_diff = 0f32;
    for checkpoint in ["tiny-thumb", "tiny-nothumb", "tiny-variant"] {
        let dir = fixture(&format!("checkpoints/{checkpoint}"));
        let full = ModelRunner::load(&dir, &LoadOptions::default())?;
        let (quantized, report) =
            ModelRunner::load_quantized(&dir, None, &LoadOptions::default(), Quant::Q8_0)?;
        assert!(
            report.tensors.iter().any(|t| !t.fell_back()),
            "{checkpoint}: something was quantized ({})",
            report.summary()
        );
        for image in images {
            let image = image::open(fixture(&format!("images/{image}")))?.to_rgb8();
            for question in questions {
                let conversation = Conversation::image_question(Some("Answer briefly."), question);
                let prompt = full.prepare(&conversation, std::slice::from_ref(&image))?;
                let want = full.generate(&[&prompt], &greedy, None)?;
                let got = quantized.generate(&[&prompt], &greedy, None)?;
                answers += 1;
                same_answers += usize::from(got[0].tokens == want[0].tokens);
                let answer = &want[0].tokens;
                let reference = answer_logits(&full, &prompt, answer)?;
                let candidate = answer_logits(&quantized, &prompt, answer)?;
                for (i, (r, c)) in reference.iter().zip(&candidate).enumerate() {
                    let (token, lead) = top_and_margin(r);
                    let diff = r.iter().zip(c).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    max_diff = max_diff.max(diff);
                    steps += 1;
                    if lead > DECIDED {
                        decided += 1;
                        assert_eq!(
                            top_and_margin(c).0,
                            token,
                            "{checkpoint}, {question:?}, step {i}: f32 leads by {lead}, Q8_0 differs"
                        );
                    }
                }
            }
        }
    }
    eprintln!(
        "Q8_0 vs f32: {same_answers}/{answers} identical greedy answers; {decided}/{steps} \
         decided steps all agree; max logit difference {max_diff:.4}"
    );
    assert_eq!(answers, 36);
    assert!(
        decided * 5 > steps * 2,
        "enough steps are decided: {decided}/{steps}"
    );
    assert!(
        same_answers * 3 > answers * 2,
        "{same_answers}/{answers} identical answers"
    );
    Ok(())
}

/// Widths a block type cannot take: tiny-nothumb's 48-wide decoder falls back to F16 under Q8_0
/// and Q4_K; tiny-thumb's 64-wide rows go Q4_K → Q5_0; each fallback is named.
#[test]
fn widths_a_quant_cannot_take_fall_back_per_tensor_and_are_reported() -> TestResult {
    let load = |name: &str, quant| {
        ModelRunner::load_quantized(
            &fixture(&format!("checkpoints/{name}")),
            None,
            &LoadOptions::default(),
            quant,
        )
    };
    let (_, report) = load("tiny-thumb", Quant::Q4K)?;
    let q_proj = report
        .tensors
        .iter()
        .find(|t| t.name.ends_with("language_model.layers.2.self_attn.q_proj"))
        .expect("tiny-thumb has attention in layer 2");
    assert_eq!(q_proj.shape[1], 64);
    assert_eq!(q_proj.chosen, TensorType::Ggml(GgmlDType::Q5_0));
    let lines = report.fallback_lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("self_attn.q_proj` [64, 64]")
                && l.contains("not whole Q4_K blocks of 256")
                && l.ends_with("using fallback quantization Q5_0")),
        "{lines:#?}"
    );

    let (_, report) = load("tiny-nothumb", Quant::Q8_0)?;
    let fell_back: Vec<_> = report.fallbacks().map(|t| t.name.as_str()).collect();
    assert!(
        fell_back.iter().any(|n| n.ends_with("feed_forward.w1")),
        "{fell_back:?}"
    );
    assert!(report.fallbacks().all(|t| t.chosen == TensorType::F16));
    assert!(
        report
            .summary()
            .contains(&format!("{} fell back", fell_back.len()))
    );
    Ok(())
}

/// `scale * (x A) B`, as a PEFT LoRA adds it.
#[derive(Debug)]
struct Lora {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl LinearAdapter for Lora {
    fn forward(&self, input: &Tensor, base: Tensor) -> candle_core::Result<Tensor> {
        let delta = input.broadcast_matmul(&self.a)?.broadcast_matmul(&self.b)?;
        base + (delta * self.scale)?
    }
}

#[test]
fn a_lora_adapter_runs_on_top_of_a_quantized_base() -> TestResult {
    let cfg = wide_config();
    let mut model = random_model(&cfg, &LoadOptions::default(), 5)?;
    quantize_model(&mut model, Quant::Q4K)?;
    let dev = Device::Cpu;
    let target = "model.language_model.layers.1.self_attn.q_proj";
    let (d, r) = (256, 4);
    let a = Tensor::randn(0f32, 0.5, (d, r), &dev)?;
    let b = Tensor::randn(0f32, 0.5, (r, d), &dev)?;
    let lora = Arc::new(Lora {
        a: a.clone(),
        b: b.clone(),
        scale: 2.0,
    });
    let mut attached = 0;
    model.visit_linears_mut(&mut |lin| {
        if lin.name() == target {
            lin.set_adapter(Some(lora.clone()));
            attached += 1;
        }
    });
    assert_eq!(attached, 1);
    let x = Tensor::randn(0f32, 1.0, (3, d), &dev)?;
    let mut checked = false;
    model.visit_linears(&mut |lin| {
        if lin.name() != target {
            return;
        }
        let y = lin.forward(&x).unwrap();
        // The dequantized weight is what the quantized product multiplies by.
        let wq = lin.weight().unwrap();
        let expected = (x.matmul(&wq.t().unwrap()).unwrap()
            + (x.matmul(&a).unwrap().matmul(&b).unwrap() * 2.0).unwrap())
        .unwrap();
        let base = lin.forward_frozen(&x).unwrap();
        let err = (&y - &expected).unwrap().abs().unwrap().max_all().unwrap();
        let err = err.to_scalar::<f32>().unwrap();
        let delta = (&y - &base).unwrap().abs().unwrap().max_all().unwrap();
        // The base product quantizes activations to Q8_K blocks: close, not bit-equal.
        assert!(err < 0.05, "max error {err}");
        assert!(
            delta.to_scalar::<f32>().unwrap() > 1.0,
            "the adapter applies"
        );
        checked = true;
    });
    assert!(checked);
    // The whole model still runs with the adapter on a quantized base.
    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &dev)?;
    let mut cache = model.new_cache(1);
    let logits = model.forward(&ids, None, None, &mut cache, LogitsMode::Last)?;
    assert_eq!(logits.dims(), &[1, 512]);
    assert_eq!(logits.dtype(), DType::F32);
    Ok(())
}

/// `vlmpipe infer` on tiny-thumb with `extra` flags, offline.
fn infer(extra: &[&str]) -> Result<std::process::Output, std::io::Error> {
    let cache = tempfile::tempdir()?;
    let model = fixture("checkpoints/tiny-thumb");
    let image = fixture("images/photo_512x384.png");
    let mut args = vec![
        "infer".to_string(),
        "--model".into(),
        model.to_string_lossy().into_owned(),
        "--image".into(),
        image.to_string_lossy().into_owned(),
        "--system".into(),
        "Answer briefly.".into(),
        "--prompt".into(),
        "Cat or dog?".into(),
        "--max-new-tokens".into(),
        "5".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    std::process::Command::new(env!("CARGO_BIN_EXE_vlmpipe"))
        .args(&args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", cache.path())
        .output()
}

/// `infer --quant` answers with the quantized runner's own tokens, notes each fallback, and an
/// unknown quant name is a usage error listing the known ones.
#[test]
fn infer_quant_flag_answers_with_the_quantized_model() -> TestResult {
    let out = infer(&["--quant", "q8_0", "--json"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["quant"], "q8_0");
    let (runner, _) = ModelRunner::load_quantized(
        &fixture("checkpoints/tiny-thumb"),
        None,
        &LoadOptions::default(),
        Quant::Q8_0,
    )?;
    let image = image::open(fixture("images/photo_512x384.png"))?.to_rgb8();
    let conversation = Conversation::image_question(Some("Answer briefly."), "Cat or dog?");
    let prompt = runner.prepare(&conversation, &[image])?;
    let options = DecodeOptions {
        max_new_tokens: 5,
        sampling: Sampling::default(),
    };
    let answer = &runner.generate(&[&prompt], &options, None)?[0];
    let ids: Vec<u64> = serde_json::from_value(report["token_ids"].clone())?;
    let mut want: Vec<u64> = answer.tokens.iter().map(|&t| u64::from(t)).collect();
    want.extend(answer.eos_token.map(u64::from));
    assert_eq!(ids, want);

    let out = infer(&["--quant", "Q4_K"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("note: `--quant q4_k`: `model.language_model.layers.0.conv.in_proj` [192, 64]: rows of 64 are not whole Q4_K blocks of 256; using fallback quantization Q5_0"),
        "{stderr}"
    );

    let out = infer(&["--quant", "q3_k"])?;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown quant `q3_k`; known quants: q8_0, q4_k"),
        "{stderr}"
    );
    Ok(())
}

/// `bench model --quant q8_0` times the quantized model step by step in the same run, with each
/// step's ratio to f32, the decode floors from a measured bandwidth, and the label KL.
#[test]
fn bench_model_quant_times_both_models_and_compares_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    let json_out = dir.path().join("bench.json");
    let model = fixture("checkpoints/tiny-thumb");
    let image = fixture("images/photo_512x384.png");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vlmpipe"))
        .args(["bench", "model", "--model"])
        .arg(&model)
        .arg("--image")
        .arg(&image)
        .args(["--threads", "1", "--device", "cpu", "--repeats", "2"])
        .args(["--decode-steps", "2", "--quant", "q8_0", "--json-out"])
        .arg(&json_out)
        .env("HF_HUB_OFFLINE", "1")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("memory read bandwidth"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_out)?)?;
    let (f32_side, q) = (&report["vlmpipe"], &report["quantized"]);
    assert_eq!(q["quant"], "q8_0");
    for key in [
        "vision_ms",
        "lm_prefill_ms",
        "decode_ms_per_token",
        "classify_ms",
    ] {
        let samples = q["steps"][key]["samples"].as_array().ok_or(key)?;
        assert_eq!(samples.len(), 2, "{key}");
        let ratio = q["ratios_quantized_over_unquantized"][key]
            .as_f64()
            .ok_or(key)?;
        let medians = q["steps"][key]["median"].as_f64().ok_or(key)?
            / f32_side[key]["median"].as_f64().ok_or(key)?;
        assert!(
            (ratio - medians).abs() < 1e-9,
            "{key}: {ratio} vs {medians}"
        );
    }
    let num = |key: &str| q[key].as_f64().ok_or(key.to_string());
    assert!(num("read_bandwidth_gb_s")? > 0.1);
    assert!(num("decode_bytes_quantized")? < num("decode_bytes_unquantized")?);
    let floor_ratio = num("decode_floor_ms_quantized")? / num("decode_floor_ms_unquantized")?;
    let bytes_ratio = num("decode_bytes_quantized")? / num("decode_bytes_unquantized")?;
    assert!((floor_ratio - bytes_ratio).abs() < 1e-9);
    // Each round's decode step is set against the bandwidth probed right after that round.
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_f64)
            .collect()
    };
    let probes = floats(&q["read_bandwidth_gb_s_rounds"]);
    let decodes = floats(&q["steps"]["decode_ms_per_token"]["samples"]);
    let fractions = floats(&q["decode_fraction_of_floor_quantized_rounds"]);
    assert_eq!((probes.len(), decodes.len(), fractions.len()), (2, 2, 2));
    let bytes = num("decode_bytes_quantized")?;
    for ((gbs, ms), fraction) in probes.iter().zip(&decodes).zip(&fractions) {
        let expected = bytes / (gbs * 1e9) * 1e3 / ms;
        assert!(
            (fraction - expected).abs() < 1e-9 * expected,
            "{fraction} vs {expected}"
        );
    }
    let (lo, hi) = (
        fractions[0].min(fractions[1]),
        fractions[0].max(fractions[1]),
    );
    let median = num("decode_fraction_of_floor_quantized")?;
    assert!(
        (median - (lo + hi) / 2.0).abs() < 1e-9,
        "{median} vs {lo}, {hi}"
    );
    assert!((num("read_bandwidth_gb_s")? - (probes[0] + probes[1]) / 2.0).abs() < 1e-9);
    let p: Vec<f64> = serde_json::from_value(q["label_probs_unquantized"].clone())?;
    let r: Vec<f64> = serde_json::from_value(q["label_probs_quantized"].clone())?;
    assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-6);
    let kl: f64 = p.iter().zip(&r).map(|(a, b)| a * (a / b).ln()).sum();
    assert!((num("label_kl")? - kl).abs() < 1e-12 && kl >= 0.0);
    Ok(())
}

/// The LFM2-VL-450M shapes (`../shared/models/LFM2-VL-450M`, random weights written by the test)
/// on the shared cats-vs-dogs photos: for Q8_0 and Q4_K against f32, the share of photos with the
/// same greedy first answer token and the same top label (exact cat/dog probabilities), and the
/// mean label KL. A measurement, not a timed test (about 10 s a photo in the dev profile on 2
/// shared cores): `VLMPIPE_QUANT_PHOTOS` sets how many photos (default 10, half cats, half dogs).
#[test]
#[ignore = "measurement: minutes of the 450M network"]
fn quantized_450m_agrees_with_f32_on_the_shared_photos() -> TestResult {
    let (Some(real), Some(photos)) = (
        crate::support::shared_path("models/LFM2-VL-450M"),
        crate::support::shared_path("data/cats_vs_dogs"),
    ) else {
        return Ok(());
    };
    let per_class: usize = std::env::var("VLMPIPE_QUANT_PHOTOS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(10)
        .div_ceil(2);
    let out = tempfile::tempdir()?;
    vlmpipe::model::random_checkpoint::write_random_checkpoint(&real, out.path(), DType::BF16, 7)?;
    let options = LoadOptions::default();
    let full = ModelRunner::load(out.path(), &options)?;
    let quantized = [Quant::Q8_0, Quant::Q4K]
        .into_iter()
        .map(|q| {
            Ok((
                q,
                ModelRunner::load_quantized(out.path(), None, &options, q)?.0,
            ))
        })
        .collect::<Result<Vec<_>, vlmpipe::runner::RunnerError>>()?;
    let spec = vlmpipe::decode::GrammarSpec::Choice {
        labels: vec!["cat".into(), "dog".into()],
    };
    let grammar = Arc::new(vlmpipe::decode::CompiledGrammar::compile(
        &spec,
        full.vocab(),
    )?);
    let scorer = vlmpipe::decode::LabelScorer::new(&grammar, None)?;
    let conversation = Conversation::image_question(
        Some("You are a veterinarian specialized in analyzing pictures of cats and dogs"),
        "What animal in the following list is the one you see in the picture?\n- cat\n- dog",
    );
    let first_token = |runner: &ModelRunner,
                       prompt: &vlmpipe::runner::PreparedPrompt|
     -> Result<u32, Box<dyn std::error::Error>> {
        let options = DecodeOptions {
            max_new_tokens: 1,
            sampling: Sampling::default(),
        };
        let answer = &runner.generate(&[prompt], &options, None)?[0];
        Ok(answer
            .tokens
            .first()
            .copied()
            .or(answer.eos_token)
            .unwrap_or(u32::MAX))
    };
    // [same first token, same label, KL sum] per quant
    let mut tallies = vec![(0usize, 0usize, 0f64); quantized.len()];
    let mut n = 0;
    for class in ["cat", "dog"] {
        for i in 0..per_class {
            let path = photos.join(format!("{class}/{:04}.jpg", i + 1));
            let image = vlmpipe::model::processor::decode_image(&std::fs::read(&path)?)?;
            let prompt = full.prepare(&conversation, std::slice::from_ref(&image))?;
            let want_token = first_token(&full, &prompt)?;
            let want = full.score_labels(&prompt, &scorer)?;
            // Per photo, how far each model's label answer is from a tie: ln p(cat) - ln p(dog).
            let gap = |s: &vlmpipe::decode::LabelScores| (s.probs[0] / s.probs[1]).ln();
            let mut line = format!(
                "{class}/{:04}: f32 ln(p_cat/p_dog) {:+.3}",
                i + 1,
                gap(&want)
            );
            for ((quant, runner), tally) in quantized.iter().zip(&mut tallies) {
                let got = runner.score_labels(&prompt, &scorer)?;
                line += &format!(", {quant} {:+.3}", gap(&got));
                tally.0 += usize::from(first_token(runner, &prompt)? == want_token);
                tally.1 += usize::from(got.best == want.best);
                tally.2 += want
                    .probs
                    .iter()
                    .zip(&got.probs)
                    .map(|(p, q)| p * (p / q).ln())
                    .sum::<f64>();
            }
            eprintln!("{line}");
            n += 1;
        }
    }
    for ((quant, _), (tokens, labels, kl)) in quantized.iter().zip(&tallies) {
        eprintln!(
            "{quant} vs f32 at the 450M shapes (random weights), {n} photos: same first token \
             {tokens}/{n}, same label {labels}/{n}, mean label KL {:.2e}",
            kl / n as f64
        );
    }
    // Q8_0 must keep at least 90% here (the issue's target is 99% with the real weights).
    assert!(
        tallies[0].1 * 10 >= n * 9,
        "Q8_0 labels agree {}/{n}",
        tallies[0].1
    );
    Ok(())
}

/// `llama-quantize` from the build cache, or `None` (saying why) where it is not built.
fn llama_quantize() -> Option<PathBuf> {
    let cache = crate::support::llama_cpp_cache();
    let bin = cache.join("bin/llama-quantize");
    if cache.join("bin/.ok").is_file() && bin.is_file() {
        Some(bin)
    } else {
        eprintln!(
            "skipping: llama-quantize is not built in `{}` (run `bash tests/llama_cpp/build.sh \
             bins`, or set VLMPIPE_LLAMA_CPP_CACHE)",
            cache.display()
        );
        None
    }
}

/// Per tensor that `llama-quantize --pure` made `ty` from `f32_gguf`: whether vlmpipe's blocks
/// (`QuantWeight::quantize` of the same f32 values) are byte-equal, and the relative RMS error
/// of each side's dequantized weights against f32.
struct BlockComparison {
    name: String,
    equal: bool,
    ours_error: f64,
    llama_error: f64,
    /// candle's own quantizer (`QTensor::quantize`, what `--quant` used before): byte-equal?
    candle_equal: bool,
    candle_error: f64,
}

fn compare_with_llama_quantize(
    bin: &std::path::Path,
    f32_gguf: &std::path::Path,
    ty: &str,
    dtype: GgmlDType,
) -> Result<Vec<BlockComparison>, Box<dyn std::error::Error>> {
    use vlmpipe::gguf::read::GgufIn;
    let out = tempfile::tempdir()?;
    let quantized = out.path().join(format!("model-{ty}.gguf"));
    let status = std::process::Command::new(bin)
        .arg("--pure")
        .arg(f32_gguf)
        .arg(&quantized)
        .arg(ty)
        .arg("2")
        .output()?;
    assert!(
        status.status.success(),
        "llama-quantize failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let source = GgufIn::open(f32_gguf)?;
    let theirs = GgufIn::open(&quantized)?;
    let dev = Device::Cpu;
    let rel = |a: &Tensor, b: &Tensor| -> candle_core::Result<f64> {
        let num = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        let den = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        Ok((num / den).sqrt())
    };
    let mut rows = Vec::new();
    for (name, (t, _)) in theirs.tensor_infos() {
        if t != dtype {
            continue;
        }
        let want = theirs.tensor(name, &dev)?;
        let f32_weight = source.tensor(name, &dev)?.dequantize(&dev)?;
        let ours = QuantWeight::quantize(&f32_weight, dtype)?;
        let candle = candle_core::quantized::QTensor::quantize(&f32_weight, dtype)?;
        rows.push(BlockComparison {
            candle_equal: candle.data()? == want.data()?,
            candle_error: rel(&candle.dequantize(&dev)?, &f32_weight)?,
            name: name.to_owned(),
            equal: ours.qtensor()?.data()? == want.data()?,
            ours_error: rel(&ours.to_tensor()?, &f32_weight)?,
            llama_error: rel(&want.dequantize(&dev)?, &f32_weight)?,
        });
    }
    assert!(!rows.is_empty(), "llama-quantize wrote no {ty} tensor");
    Ok(rows)
}

/// `--quant q4_k`'s blocks are `llama-quantize`'s, byte for byte: ggml's
/// `quantize_row_q4_K_ref` (`make_qkx2_quants`), not candle's older `make_qkx1_quants` port
/// (which differed on every tensor). And the Q6_K LM head's blocks too. On a random checkpoint
/// with the real LFM2 file set and decoder widths of 256 (so every projection takes Q4_K).
#[test]
fn q4_k_and_q6_k_blocks_equal_llama_quantize() -> TestResult {
    let (Some(bin), Some(real)) = (
        llama_quantize(),
        crate::support::shared_path("models/LFM2-VL-450M"),
    ) else {
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    let source = work.path().join("source");
    std::fs::create_dir(&source)?;
    for entry in std::fs::read_dir(&real)? {
        let entry = entry?;
        std::fs::copy(entry.path(), source.join(entry.file_name()))?;
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(real.join("config.json"))?)?;
    let mut config = crate::support::narrow_450m_config(&config, 1);
    for key in ["hidden_size", "block_dim", "conv_dim", "conv_dim_out"] {
        config["text_config"][key] = serde_json::json!(256);
    }
    config["text_config"]["block_ff_dim"] = serde_json::json!(512);
    config["text_config"]["intermediate_size"] = serde_json::json!(512);
    let config_path = source.join("config.json");
    let mut perms = std::fs::metadata(&config_path)?.permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&config_path, perms)?;
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)?;
    let checkpoint = work.path().join("checkpoint");
    vlmpipe::model::random_checkpoint::write_random_checkpoint(
        &source,
        &checkpoint,
        DType::F32,
        11,
    )?;
    let opts = vlmpipe::gguf::GgufOptions {
        name: "q4k".into(),
        quant: vlmpipe::gguf::GgufQuant::F32,
        mmproj_quant: vlmpipe::gguf::GgufQuant::F32,
        force: false,
    };
    let export = vlmpipe::gguf::export(&checkpoint, &work.path().join("gguf"), &opts)?;
    for (ty, dtype) in [("Q4_K", GgmlDType::Q4K), ("Q6_K", GgmlDType::Q6K)] {
        let rows = compare_with_llama_quantize(&bin, &export.text.path, ty, dtype)?;
        for r in &rows {
            eprintln!(
                "{ty} {}: equal {} (candle's {}), relative RMS error ours {:.5}, llama-quantize \
                 {:.5}, candle's {:.5}",
                r.name, r.equal, r.candle_equal, r.ours_error, r.llama_error, r.candle_error
            );
        }
        let differ: Vec<&str> = rows
            .iter()
            .filter(|r| !r.equal)
            .map(|r| r.name.as_str())
            .collect();
        assert!(
            differ.is_empty(),
            "{ty}: {} of {} tensors differ from llama-quantize's: {differ:?}",
            differ.len(),
            rows.len()
        );
    }
    Ok(())
}

/// The same comparison on an F32 text GGUF given in `VLMPIPE_Q4K_GGUF` (e.g. the 450M shapes
/// exported with `vlmpipe export --gguf DIR --quant F32`): a measurement, printed.
#[test]
#[ignore = "measurement: needs VLMPIPE_Q4K_GGUF, minutes at the 450M shapes"]
fn q4_k_blocks_against_llama_quantize_on_a_given_gguf() -> TestResult {
    let (Some(bin), Some(path)) = (llama_quantize(), std::env::var_os("VLMPIPE_Q4K_GGUF")) else {
        return Ok(());
    };
    for (ty, dtype) in [("Q4_K", GgmlDType::Q4K), ("Q6_K", GgmlDType::Q6K)] {
        let rows = compare_with_llama_quantize(&bin, std::path::Path::new(&path), ty, dtype)?;
        let equal = rows.iter().filter(|r| r.equal).count();
        let candle_equal = rows.iter().filter(|r| r.candle_equal).count();
        let mean =
            |f: fn(&BlockComparison) -> f64| rows.iter().map(f).sum::<f64>() / rows.len() as f64;
        eprintln!(
            "{ty}: {equal}/{} tensors byte-equal (candle's quantizer {candle_equal}); mean \
             relative RMS error ours {:.5}, llama-quantize {:.5}, candle's {:.5}",
            rows.len(),
            mean(|r| r.ours_error),
            mean(|r| r.llama_error),
            mean(|r| r.candle_error)
        );
    }
    Ok(())
}
