//! `bench model --quant Q`: the quantized model next to the unquantized one, from the same run.
//!
//! `bench_cmd` times both step by step, alternating repetitions; this adds what only a
//! comparison says: each step's ratio (quantized / unquantized medians), the machine's memory
//! read bandwidth probed after each round and each side's decode step against the floor it sets
//! (the bytes of the decoder projections and LM head a step reads, over that round's bandwidth;
//! the median over rounds), and the label KL between the two models' exact cat/dog probabilities on the benchmark image.

use std::hint::black_box;
use std::time::Instant;

use anyhow::Context;
use rayon::prelude::*;
use serde_json::{Value, json};

use crate::decode::{CompiledGrammar, GrammarSpec, LabelScorer};
use crate::model::chat::Conversation;
use crate::model::quant::QuantReport;
use crate::runner::ModelRunner;

/// Labels of the benchmark question.
const LABELS: [&str; 2] = ["cat", "dog"];
/// Bytes the bandwidth probe reads per pass: far past any cache.
const PROBE_BYTES: usize = 512 << 20;
/// Passes of one probe; the best is kept, as STREAM does.
const PROBE_PASSES: usize = 3;

/// The quantized side's report: its step summaries (`side`), ratios, bandwidth floors, label KL.
#[allow(clippy::too_many_arguments)]
pub(crate) fn compare(
    full: &ModelRunner,
    quantized: &ModelRunner,
    report: &QuantReport,
    side: Value,
    ours: &Value,
    bandwidth_rounds: &[f64],
    conversation: &Conversation,
    image: &image::RgbImage,
    steps: &[&str],
) -> anyhow::Result<Value> {
    let mut ratios = serde_json::Map::new();
    for key in steps {
        if let (Some(q), Some(f)) = (side[key]["median"].as_f64(), ours[key]["median"].as_f64()) {
            ratios.insert((*key).to_owned(), json!(q / f));
        }
    }
    let probed;
    let bandwidth_rounds = if bandwidth_rounds.is_empty() {
        probed = [read_bandwidth_gbs()];
        &probed[..]
    } else {
        bandwidth_rounds
    };
    let bandwidth = median(bandwidth_rounds.to_vec());
    let full_bytes = report.decode_values() * full.model().dtype().size_in_bytes();
    let quant_bytes = report.decode_bytes();
    let floor_at = |bytes: usize, gbs: f64| bytes as f64 / (gbs * 1e9) * 1e3;
    let floor_ms = |bytes: usize| floor_at(bytes, bandwidth);
    // Each round's decode step against the floor of the bandwidth probed right after it.
    let of_floor_rounds = |bytes: usize, v: &Value| -> Vec<f64> {
        let samples = v["decode_ms_per_token"]["samples"].as_array();
        samples
            .into_iter()
            .flatten()
            .zip(bandwidth_rounds.iter().cycle())
            .filter_map(|(ms, gbs)| Some(floor_at(bytes, *gbs) / ms.as_f64()?))
            .collect()
    };
    let of_floor = |bytes: usize, v: &Value| {
        let rounds = of_floor_rounds(bytes, v);
        (!rounds.is_empty()).then(|| median(rounds))
    };

    let (p, q) = (
        label_probs(full, conversation, image)?,
        label_probs(quantized, conversation, image)?,
    );
    let kl: f64 = p
        .iter()
        .zip(&q)
        .filter(|(a, _)| **a > 0.0)
        .map(|(a, b)| a * (a / b.max(f64::MIN_POSITIVE)).ln())
        .sum();
    let best = |v: &[f64]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i)
    };
    Ok(json!({
        "quant": report.quant.name(),
        "summary": report.summary(),
        "fallbacks": report.fallback_lines(),
        "steps": side,
        "ratios_quantized_over_unquantized": ratios,
        "read_bandwidth_gb_s": bandwidth,
        "read_bandwidth_gb_s_rounds": bandwidth_rounds,
        "decode_bytes_unquantized": full_bytes,
        "decode_bytes_quantized": quant_bytes,
        "decode_floor_ms_unquantized": floor_ms(full_bytes),
        "decode_floor_ms_quantized": floor_ms(quant_bytes),
        "decode_fraction_of_floor_unquantized": of_floor(full_bytes, ours),
        "decode_fraction_of_floor_quantized": of_floor(quant_bytes, &side),
        "decode_fraction_of_floor_quantized_rounds": of_floor_rounds(quant_bytes, &side),
        "labels": LABELS,
        "label_probs_unquantized": p,
        "label_probs_quantized": q,
        "label_kl": kl,
        "same_label": best(&p) == best(&q),
    }))
}

/// Prints the quantized side's table below the main one.
pub(crate) fn print(quant: &Value, ours: &Value, steps: &[&str]) {
    let name = quant["quant"].as_str().unwrap_or("?");
    println!("{}", quant["summary"].as_str().unwrap_or_default());
    println!(
        "{:<22} {:>18} {:>18} {:>12}",
        "step",
        "unquantized ms",
        format!("{name} ms (min)"),
        format!("{name}/unq")
    );
    for key in steps {
        let cell = |v: &Value| match (v[key]["median"].as_f64(), v[key]["min"].as_f64()) {
            (Some(m), Some(lo)) => format!("{m:.1} ({lo:.1})"),
            _ => "-".to_owned(),
        };
        let ratio = quant["ratios_quantized_over_unquantized"][key]
            .as_f64()
            .map_or("-".to_owned(), |r| format!("{r:.2}"));
        println!(
            "{:<22} {:>18} {:>18} {:>12}",
            key.trim_end_matches("_ms"),
            cell(ours),
            cell(&quant["steps"]),
            ratio
        );
    }
    let f = |key: &str| quant[key].as_f64().unwrap_or(f64::NAN);
    let mib = |key: &str| f(key) / (1024.0 * 1024.0);
    let probes: Vec<f64> = quant["read_bandwidth_gb_s_rounds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect();
    let spread = match (
        probes.iter().copied().reduce(f64::min),
        probes.iter().copied().reduce(f64::max),
    ) {
        (Some(lo), Some(hi)) if probes.len() > 1 => format!(" ({lo:.1}-{hi:.1})"),
        _ => String::new(),
    };
    println!(
        "memory read bandwidth {:.1} GB/s{spread}, probed after each round; a decode step reads {:.0} MiB \
         unquantized (floor {:.1} ms, reached {:.0}%), {:.0} MiB {name} (floor {:.1} ms, reached {:.0}%; \
         each round against its own probe, median)",
        f("read_bandwidth_gb_s"),
        mib("decode_bytes_unquantized"),
        f("decode_floor_ms_unquantized"),
        100.0 * f("decode_fraction_of_floor_unquantized"),
        mib("decode_bytes_quantized"),
        f("decode_floor_ms_quantized"),
        100.0 * f("decode_fraction_of_floor_quantized"),
    );
    println!(
        "labels {:?}: unquantized {}, {name} {}, KL {:.2e}, same label: {}",
        LABELS,
        quant["label_probs_unquantized"],
        quant["label_probs_quantized"],
        f("label_kl"),
        quant["same_label"]
    );
}

/// Exact probabilities of [`LABELS`] for the benchmark prompt.
fn label_probs(
    runner: &ModelRunner,
    conversation: &Conversation,
    image: &image::RgbImage,
) -> anyhow::Result<Vec<f64>> {
    let spec = GrammarSpec::Choice {
        labels: LABELS.iter().map(|l| (*l).to_owned()).collect(),
    };
    let grammar = std::sync::Arc::new(CompiledGrammar::compile(&spec, runner.vocab())?);
    let scorer = LabelScorer::new(&grammar, None).context("cannot score labels")?;
    let prompt = runner.prepare(conversation, std::slice::from_ref(image))?;
    Ok(runner.score_labels(&prompt, &scorer)?.probs)
}

/// The median of `values` (NaN when empty).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Best read bandwidth over [`PROBE_PASSES`] passes of summing a [`PROBE_BYTES`] buffer on the
/// benchmark's threads (rayon's pool, sized by `--threads`), in GB/s.
pub(crate) fn read_bandwidth_gbs() -> f64 {
    let words = PROBE_BYTES / 8;
    let buffer: Vec<u64> = (0..words as u64).collect();
    let mut best = 0f64;
    for _ in 0..PROBE_PASSES {
        let t = Instant::now();
        let sum = buffer
            .par_chunks(1 << 16)
            .map(|chunk| chunk.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
            .reduce(|| 0, u64::wrapping_add);
        black_box(sum);
        best = best.max(PROBE_BYTES as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

#[cfg(test)]
mod measure {
    use candle_core::Tensor;

    use crate::model::checkpoint::LoadOptions;
    use crate::model::generate::argmax;
    use crate::model::lfm2_vl::LogitsMode;
    use crate::model::quant::Quant;
    use crate::runner::ModelRunner;

    /// `bench model --quant q4_k`'s decode steps alone, for profiling (`perf record -D` past
    /// the load) and for comparing paths in one process: the quantized model of the random
    /// checkpoint in `VLMPIPE_DECODE_DIR` (default `/tmp/bt-random`, as `bench model
    /// --random-dir` writes it), a 270-token prompt, then `VLMPIPE_DECODE_ROUNDS` rounds (4)
    /// of `VLMPIPE_DECODE_STEPS` greedy steps (32), each round against the bandwidth probed
    /// right after it (`cargo test --release --lib bench_quant::measure -- --ignored
    /// --nocapture`; `VLMPIPE_DECODE_QUANT=q8_0` for Q8_0).
    #[test]
    #[ignore = "measurement; needs a random checkpoint"]
    fn decode_steps_against_the_floor() {
        let dir = std::env::var("VLMPIPE_DECODE_DIR").unwrap_or("/tmp/bt-random".into());
        let quant: Quant = std::env::var("VLMPIPE_DECODE_QUANT")
            .unwrap_or("q4_k".into())
            .parse()
            .unwrap();
        let options = LoadOptions {
            dtype: candle_core::DType::F32,
            device: candle_core::Device::Cpu,
        };
        let (runner, report) =
            ModelRunner::load_quantized(std::path::Path::new(&dir), None, &options, quant).unwrap();
        let model = runner.model();
        let dev = model.device();
        let ids: Vec<u32> = (0..270u32).map(|i| 1000 + i * 7).collect();
        let ids = Tensor::new(ids.as_slice(), dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let bytes = report.decode_bytes();
        let count = |var: &str, default: usize| -> usize {
            std::env::var(var)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(default)
        };
        let (rounds, steps) = (
            count("VLMPIPE_DECODE_ROUNDS", 4),
            count("VLMPIPE_DECODE_STEPS", 32),
        );
        for round in 0..=rounds {
            let mut cache = model.new_cache(1);
            model
                .forward(&ids, None, None, &mut cache, LogitsMode::Last)
                .unwrap();
            let mut token = 1u32;
            let mut times = vec![];
            for _ in 0..steps {
                let t = std::time::Instant::now();
                let input = Tensor::new(&[[token]], dev).unwrap();
                let logits = model
                    .forward_generated(&input, &mut cache, LogitsMode::Last)
                    .unwrap();
                let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
                token = argmax(&v).unwrap_or(0);
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let gbs = super::read_bandwidth_gbs();
            if round == 0 {
                continue;
            }
            let mean = times.iter().sum::<f64>() / times.len() as f64;
            let min = times.iter().fold(f64::MAX, |a, &b| a.min(b));
            let floor = bytes as f64 / (gbs * 1e9) * 1e3;
            eprintln!(
                "round {round}: {mean:.2} ms a step (min {min:.2}), probe {gbs:.1} GB/s, floor \
                 {floor:.2} ms ({:.0} MiB): {:.0}% (min {:.0}%)",
                bytes as f64 / 1048576.0,
                100.0 * floor / mean,
                100.0 * floor / min
            );
        }
    }
}
