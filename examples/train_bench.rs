//! Needs: an LFM2-VL `config.json` (default `../shared/models/LFM2-VL-450M/config.json`).
//!
//! Times one LoRA training step (vision forward, decoder forward + backward, AdamW) on a
//! random-weight LFM2-VL and prints the [`vlmpipe::train::bench::BenchReport`] as JSON.
//!
//! `cargo run --example train_bench -- CONFIG_JSON [STEPS] [PATCH_ROWS PATCH_COLS PROMPT_TOKENS]`
//! Compare with `tests/reference/bench_peft_train.py` run right before or after, same arguments.

use vlmpipe::model::config::Config;
use vlmpipe::train::bench::{BenchSpec, bench_train_step};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // As the `vlmpipe` binary does, so both time the same allocator settings.
    vlmpipe::tune_process();
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "../shared/models/LFM2-VL-450M/config.json".into());
    let arg = |i: usize, default: usize| -> anyhow::Result<usize> {
        Ok(args.get(i).map_or(Ok(default), |s| s.parse())?)
    };
    let defaults = BenchSpec::default();
    let spec = BenchSpec {
        steps: arg(2, defaults.steps)?,
        patch_rows: arg(3, defaults.patch_rows)?,
        patch_cols: arg(4, defaults.patch_cols)?,
        prompt_tokens: arg(5, defaults.prompt_tokens)?,
        ..defaults
    };
    let cfg = Config::from_json(&std::fs::read_to_string(&path)?)?;
    let report = bench_train_step(&cfg, &spec)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
