//! Needs: an LFM2-VL `config.json` (default `../shared/models/LFM2-VL-450M/config.json`).
//!
//! Times LFM2-VL at the real LFM2-VL-450M shapes with random weights (f32, CPU):
//! vision tower + projector on one 512x512 view, the prompt forward, and greedy decode steps.
//!
//! `cargo run --release --example model_bench -- [CONFIG_JSON] [DECODE_STEPS]`; the config defaults
//! to `../shared/models/LFM2-VL-450M/config.json`.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use vlmpipe::model::config::Config;
use vlmpipe::model::lfm2_vl::LogitsMode;
use vlmpipe::model::load::checkpoint::LoadOptions;
use vlmpipe::model::load::random_checkpoint::random_model;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CPU seconds used by this process so far (user + system), from `/proc/self/stat`.
///
/// On a shared machine wall time mostly measures the neighbours; CPU time measures our work.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the stat line, 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let config_path = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "../shared/models/LFM2-VL-450M/config.json".into());
    let steps: usize = args.get(2).map_or(Ok(8), |s| s.parse())?;
    let cfg = Config::from_json(&std::fs::read_to_string(&config_path)?)?;
    let dev = Device::Cpu;
    let t = Instant::now();
    let model = random_model(&cfg, &LoadOptions::default(), 0)?;
    eprintln!("random weights: {:.2} s", t.elapsed().as_secs_f64());

    // One 512x512 view: 32x32 patches, 256 image tokens, a 273-token prompt like the reference.
    let (rows, cols) = (32usize, 32usize);
    let patches = Tensor::randn(0f32, 1.0, (1, rows * cols, cfg.vision.patch_dim()), &dev)?;
    let mask = Tensor::ones((1, rows * cols), DType::U32, &dev)?;
    let mut ids: Vec<u32> = vec![1, 6, 6423, 708, 498];
    ids.extend(std::iter::repeat_n(cfg.image_token_id, 256));
    ids.extend([499, 1234, 1235, 1236, 1237, 1238, 7, 708, 6, 64015, 708, 12]);
    let ids = Tensor::from_vec(ids.clone(), (1, ids.len()), &dev)?;

    for round in 0..2 {
        let (t, c0) = (Instant::now(), cpu_seconds());
        let features = model.image_features(&patches, &mask, &[(rows, cols)])?;
        let (vision, c1) = (t.elapsed(), cpu_seconds());
        let t = Instant::now();
        let mut cache = model.new_cache(1);
        let logits = model.forward(&ids, Some(&features), None, &mut cache, LogitsMode::Last)?;
        let (prefill, c2) = (t.elapsed(), cpu_seconds());
        let mut next = logits.argmax(1)?.to_vec1::<u32>()?[0];
        let t = Instant::now();
        for _ in 0..steps {
            let input = Tensor::new(&[[next]], &dev)?;
            let logits = model.forward(&input, None, None, &mut cache, LogitsMode::Last)?;
            next = logits.argmax(1)?.to_vec1::<u32>()?[0];
        }
        let decode = t.elapsed() / steps.max(1) as u32;
        let c3 = cpu_seconds();
        println!(
            "round {round}: CPU seconds: vision+projector {:.2}, prompt forward {:.2}, decode {:.1} ms/token",
            c1 - c0,
            c2 - c1,
            (c3 - c2) * 1e3 / steps.max(1) as f64
        );
        println!(
            "round {round}: vision+projector {:.3} s, prompt forward (LM) {:.3} s, vision+prompt {:.3} s, decode {:.1} ms/token",
            vision.as_secs_f64(),
            prefill.as_secs_f64(),
            (vision + prefill).as_secs_f64(),
            decode.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
