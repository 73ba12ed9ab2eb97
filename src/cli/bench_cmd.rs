//! `vlmpipe bench …`: the benchmarks the issues ask for, printed with the load average because
//! the machine is shared.
//!
//! - `bench grammar`: `decode::bench_grammars` with a real tokenizer (compile time, mask time,
//!   constrained-decoding overhead).
//! - `bench ingest DIR`: images/s of ingesting a class-per-folder tree.
//! - `bench rerun`: a synthetic image-folder pipeline run once, then timed no-change reruns.
//! - `bench model`: one image classification stage by stage, optionally next to transformers on
//!   the same checkpoint and image in the same run; described below.
//! - `bench train`: one LoRA training step, optionally next to PyTorch + peft (`bench_train.rs`).
//! - `bench table REPORT…`: `BENCHMARKS.md`'s markdown table from `bench model --json-out`
//!   reports (`bench_table.rs`).
//!
//! The `bench model` workload is `tests/reference/bench_transformers.py`'s: the cats-vs-dogs conversation
//! (system turn, user turn with the image then the question, generation prompt) on one photo.
//! Each step is timed `--repeats` times after one warm-up and reported as median and minimum:
//! - `preprocess_ms`: chat template + image processor + tokenizer (the image is decoded once,
//!   before timing, as the Python side receives a decoded PIL image);
//! - `vision_ms`: vision tower + projector;
//! - `prompt_forward_ms`: vision + the decoder over the prompt with logits at every position
//!   (transformers' `model(**inputs)`);
//! - `lm_prefill_ms`: the decoder over the prompt embeddings, last-position logits only;
//! - `decode_ms_per_token`: mean of `--decode-steps` cached greedy steps;
//! - `classify_ms`: preprocess + vision + generate `1 + decode_steps` tokens (no EOS stop).
//!
//! With `--config`, a random-weight checkpoint in the Hub layout is written first (bf16, like
//! the real file; reused from `--random-dir` when present), so both sides load the same weights.
//! On a shared machine compare ratios, not absolute numbers: the load average is reported
//! before and after.

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Tensor};
use serde::Serialize;
use serde_json::{Value, json};

use crate::cli::Outcome;
use crate::cli::args::{
    BenchCommand, BenchGrammarArgs, BenchIngestArgs, BenchModelArgs, BenchRerunArgs, CacheDirArg,
    DeviceArg, ParamOverrides, RunArgs,
};
use crate::cli::check_cmd::load_and_report;
use crate::cli::run_cmd;
use crate::cli::{bench_llama, bench_quant};
use crate::decode::{BenchConfig, bench_grammars};
use crate::exec::StageStatus;
use crate::model::chat::Conversation;
use crate::model::checkpoint::LoadOptions;
use crate::model::device::{DeviceChoice, compiled_backends, device_label};
use crate::model::generate::{self, GenerateConfig, Prompt, Sampling};
use crate::model::lfm2_vl::LogitsMode;
use crate::model::packed::Kernel;
use crate::model::processor::decode_image;
use crate::model::quant::QuantReport;
use crate::model::random_checkpoint::write_random_checkpoint;
use crate::model::resolve::{resolve_adapter_dir, resolve_model_dir};
use crate::runner::ModelRunner;
use crate::stages::data::{ImageCheck, bench_ingest_folder};

/// The benchmark conversation, identical to `compute_references.py`'s `VET_SYSTEM`/`VET_USER`.
const VET_SYSTEM: &str = "You are a veterinarian specialized in analyzing pictures of cats and dogs\nYou excel at identifying the type of animal from a picture.";
const VET_USER: &str = "What animal in the following list is the one you see in the picture?\n- cat\n- dog\n\nProvide your answer as a single animal from the list without any additional text.";

/// The timed steps, in report order, with the keys `bench_transformers.py` uses.
const STEPS: &[&str] = &[
    "preprocess_ms",
    "vision_ms",
    "prompt_forward_ms",
    "lm_prefill_ms",
    "decode_ms_per_token",
    "classify_ms",
];

/// Median, minimum and every sample of one step, in milliseconds.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    median: f64,
    min: f64,
    samples: Vec<f64>,
}

impl Summary {
    fn of(samples: Vec<f64>) -> Self {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Self {
            median,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            samples,
        }
    }
}

/// Runs `vlmpipe bench …`.
pub(crate) fn run(command: BenchCommand) -> anyhow::Result<Outcome> {
    match command {
        BenchCommand::Model(args) => bench_model(&args),
        BenchCommand::Grammar(args) => bench_grammar(&args),
        BenchCommand::Ingest(args) => bench_ingest(&args),
        BenchCommand::Rerun(args) => bench_rerun(&args),
        BenchCommand::Train(args) => crate::cli::bench_train::run(&args),
        BenchCommand::Table(args) => {
            crate::cli::bench_table::print_table(&args.reports)?;
            Ok(Outcome::Success)
        }
    }
}

fn bench_grammar(args: &BenchGrammarArgs) -> anyhow::Result<Outcome> {
    // Paths come from the command line only: no folder baked in at build time, none relative
    // to wherever the binary happens to run.
    let tokenizer = &args.tokenizer;
    anyhow::ensure!(
        tokenizer.is_file(),
        "tokenizer `{}` (from `--tokenizer`) not found; pass the path of a Hugging Face `tokenizer.json`",
        tokenizer.display()
    );
    anyhow::ensure!(
        args.model_step_ms.is_finite() && args.model_step_ms > 0.0,
        "`--model-step-ms` must be a positive number, found {}",
        args.model_step_ms
    );
    let cfg = BenchConfig {
        compile_repeats: args.compile_repeats,
        sequences: args.sequences,
        max_tokens: args.max_tokens,
        model_step: Duration::from_secs_f64(args.model_step_ms / 1e3),
        ..BenchConfig::default()
    };
    let load_before = load_average();
    let report = bench_grammars(tokenizer, &cfg)
        .with_context(|| format!("grammar benchmark with `{}`", tokenizer.display()))?;
    println!("tokenizer: {}", tokenizer.display());
    print!("{report}");
    print_load(load_before, load_average());
    Ok(Outcome::Success)
}

fn bench_ingest(args: &BenchIngestArgs) -> anyhow::Result<Outcome> {
    let check = if args.full_decode {
        ImageCheck::Full
    } else {
        ImageCheck::Header
    };
    let load_before = load_average();
    let bench = bench_ingest_folder(&args.dir, args.threads, check)
        .with_context(|| format!("cannot ingest `{}`", args.dir.display()))?;
    println!(
        "{} images in {:.2} s: {:.0} images/s ({} threads, {:?} check, {} undecodable)",
        bench.images,
        bench.seconds,
        bench.images_per_sec,
        if bench.threads == 0 {
            "all".to_string()
        } else {
            bench.threads.to_string()
        },
        bench.check,
        bench.report.errors,
    );
    print_load(load_before, load_average());
    Ok(Outcome::Success)
}

/// The pipeline `bench rerun` times: ingest, then a split, like the issue's example.
const RERUN_PIPELINE: &str = r#"// Written by `vlmpipe bench rerun`.
pipeline bench_rerun { seed = 1 }
dataset photos { source = folder("photos") label = "class" }
split parts = stratified(photos, train: 0.9, test: 0.1, seed: 42)
"#;

fn bench_rerun(args: &BenchRerunArgs) -> anyhow::Result<Outcome> {
    anyhow::ensure!(
        args.images >= 2,
        "`--images` must be at least 2 (two classes)"
    );
    anyhow::ensure!(args.reruns >= 1, "`--reruns` must be at least 1");
    let load_before = load_average();
    let (root, _temp) = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create `{}`", dir.display()))?;
            (dir.clone(), None)
        }
        None => {
            let temp = tempfile::tempdir().context("cannot create a temporary folder")?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    let t = Instant::now();
    write_synthetic_folder(&root.join("photos"), args.images)?;
    let build_s = t.elapsed().as_secs_f64();
    let file = root.join("bench.vp");
    std::fs::write(&file, RERUN_PIPELINE)
        .with_context(|| format!("cannot write `{}`", file.display()))?;
    let run_args = RunArgs {
        file: file.clone(),
        params: ParamOverrides::default(),
        cache: CacheDirArg {
            cache_dir: Some(root.join(".vlmpipe")),
        },
        force: Vec::new(),
        only: Vec::new(),
        dry_run: false,
        summary_json: Some(root.join("summary.json")),
        quiet: true,
        evals_dir: None,
        lock_wait: 60.0,
        shards: None,
        jobs: None,
        // The rerun bench's pipeline has no model: it times cache lookups.
        device: DeviceArg {
            device: DeviceChoice::Cpu,
        },
        cluster: Default::default(),
    };

    let (first_s, first) = timed_run(&run_args, args.in_process)?;
    // A reused `--dir` may already hold the cache; then the first run is a rerun too.
    let first_note = if first.iter().any(|(_, status)| status == "ran") {
        format!("{:.0} images/s", args.images as f64 / first_s.max(1e-9))
    } else {
        "already cached".to_string()
    };
    let mut reruns = Vec::with_capacity(args.reruns);
    for _ in 0..args.reruns {
        let (seconds, statuses) = timed_run(&run_args, args.in_process)?;
        anyhow::ensure!(
            statuses.iter().all(|(_, status)| status == "cached"),
            "a no-change rerun recomputed stages: {statuses:?}"
        );
        reruns.push(seconds);
    }
    let summary = Summary::of(reruns.iter().map(|s| s * 1e3).collect());
    let max = reruns.iter().copied().fold(0.0, f64::max);
    println!(
        "{} images (written in {build_s:.2} s): first run {first_s:.2} s ({first_note}); \
         no-change rerun median {:.3} s, min {:.3} s, max {max:.3} s over {} reruns ({})",
        args.images,
        summary.median / 1e3,
        summary.min / 1e3,
        args.reruns,
        if args.in_process {
            "in process"
        } else {
            "spawned `vlmpipe run`"
        },
    );
    print_load(load_before, load_average());
    Ok(Outcome::Success)
}

/// `n` tiny distinct PNGs split over the classes `a` and `b`.
fn write_synthetic_folder(dir: &Path, n: usize) -> anyhow::Result<()> {
    for (class, count) in [("a", n.div_ceil(2)), ("b", n / 2)] {
        let class_dir = dir.join(class);
        std::fs::create_dir_all(&class_dir)
            .with_context(|| format!("cannot create `{}`", class_dir.display()))?;
        for i in 0..count {
            let path = class_dir.join(format!("{i:06}.png"));
            if path.is_file() {
                continue;
            }
            // Distinct pixels per image, so content hashing cannot fold images together.
            let pixel = image::Rgb([(i % 251) as u8, ((i / 251) % 251) as u8, (i / 63_001) as u8]);
            image::RgbImage::from_pixel(16, 16, pixel)
                .save(&path)
                .with_context(|| format!("cannot write `{}`", path.display()))?;
        }
    }
    Ok(())
}

/// One `vlmpipe run` of `args`: wall-clock seconds and each stage's (name, status).
fn timed_run(args: &RunArgs, in_process: bool) -> anyhow::Result<(f64, Vec<(String, String)>)> {
    let t = Instant::now();
    if in_process {
        let Some(plan) = load_and_report(&args.file, &args.params) else {
            anyhow::bail!("the benchmark pipeline does not check");
        };
        let summary = run_cmd::execute(&plan, args)?;
        let seconds = t.elapsed().as_secs_f64();
        let statuses = summary
            .stages
            .iter()
            .map(|s| (s.name.clone(), status_name(s.status)))
            .collect();
        return Ok((seconds, statuses));
    }
    let exe = std::env::current_exe().context("cannot find the running `vlmpipe`")?;
    let summary_path = args
        .summary_json
        .clone()
        .context("the benchmark run needs a summary path")?;
    let mut command = Process::new(&exe);
    command.arg("run").arg(&args.file).arg("--quiet");
    command.arg("--summary-json").arg(&summary_path);
    if let Some(cache) = &args.cache.cache_dir {
        command.arg("--cache-dir").arg(cache);
    }
    let status = command
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("cannot run `{}`", exe.display()))?;
    let seconds = t.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "`vlmpipe run` failed ({status})");
    let text = std::fs::read_to_string(&summary_path)
        .with_context(|| format!("cannot read `{}`", summary_path.display()))?;
    let summary: Value = serde_json::from_str(&text).context("the run summary is not JSON")?;
    let statuses = summary["stages"]
        .as_array()
        .context("the run summary has no stages")?
        .iter()
        .map(|s| {
            let field = |key: &str| s[key].as_str().unwrap_or_default().to_string();
            (field("name"), field("status"))
        })
        .collect();
    Ok((seconds, statuses))
}

/// The summary JSON's name for `status` (`ran`, `cached`, …), so both modes compare alike.
fn status_name(status: StageStatus) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{status:?}"))
}

pub(crate) fn print_load(before: Option<[f64; 3]>, after: Option<[f64; 3]>) {
    let fmt = |l: Option<[f64; 3]>| {
        l.map_or("unknown".to_string(), |[a, b, c]| {
            format!("{a:.2} {b:.2} {c:.2}")
        })
    };
    println!("load average: before {}, after {}", fmt(before), fmt(after));
}

fn bench_model(args: &BenchModelArgs) -> anyhow::Result<Outcome> {
    set_threads(args.threads);
    // A wrong `--llama-cpp` folder is reported before minutes of timing.
    if let Some(llama_dir) = &args.llama_cpp {
        bench_llama::mtmd_cli(llama_dir)?;
    }
    let load_before = load_average();
    let (dir, _temp) = model_dir(args)?;
    let image = read_image(&args.image)?;
    let adapter = args
        .adapter
        .as_deref()
        .map(resolve_adapter_dir)
        .transpose()?;
    let loaded = load_runners(args, &dir, adapter.as_deref())?;
    let device_name = device_label(loaded.runner.device());

    let conversation = Conversation::image_question(Some(VET_SYSTEM), VET_USER);
    let quantized = loaded.quantized.as_ref().map(|(q, _, _)| q);
    let rounds = time_rounds(&loaded.runner, quantized, &conversation, &image, args)?;
    let (prompt_tokens, image_tokens) = rounds.shape;
    let timings = ModelTimings::new(
        rounds.ours.columns,
        rounds.ours.decode_steps_ms,
        Footprint {
            load_s: loaded.load_s,
            rss_after_load_mib: loaded.rss_after_load_mib,
            peak_rss_mib: rounds.peak_rss_mib.or_else(|| proc_status_mib("VmHWM")),
            num_prompt_tokens: prompt_tokens,
            num_image_tokens: image_tokens,
        },
        format!("{:?}", args.dtype.to_candle()),
        device_name.clone(),
        loaded.runner.packed_linears(),
    );
    // serde_json's map sorts keys, so the report is the same whatever the field order.
    let ours = serde_json::to_value(&timings)?;
    let quant = match (&loaded.quantized, rounds.quantized) {
        (Some((q, report, load_s)), Some(samples)) => Some(bench_quant::compare(
            &loaded.runner,
            q,
            report,
            quantized_side(*load_s, samples)?,
            &ours,
            &rounds.bandwidth_gbs,
            &conversation,
            &image,
            STEPS,
        )?),
        _ => None,
    };
    drop(loaded);
    let llama = match &args.llama_cpp {
        Some(llama_dir) => Some(bench_llama::run(&bench_llama::LlamaBench {
            dir: llama_dir,
            checkpoint: &dir,
            quant: args.llama_cpp_quant,
            image: &args.image,
            system: VET_SYSTEM,
            question: VET_USER,
            threads: args.threads,
            repeats: args.repeats,
            decode_steps: args.decode_steps,
        })?),
        None => None,
    };

    let theirs = match (&args.python, &args.transformers_script) {
        (Some(python), Some(script)) => Some(run_transformers(
            python,
            script,
            &dir,
            &args.image,
            args,
            &device_name,
        )?),
        _ => None,
    };
    let load_after = load_average();

    print_table(&ours, theirs.as_ref(), prompt_tokens, image_tokens);
    if let Some(quant) = &quant {
        bench_quant::print(quant, &ours, STEPS);
    }
    if let Some(llama) = &llama {
        bench_llama::print(llama, &ours, quant.as_ref());
    }
    let report = json!({
        "model": dir,
        "adapter": adapter,
        "image": args.image,
        "threads": args.threads,
        "repeats": args.repeats,
        "decode_steps": args.decode_steps,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "vlmpipe": ours,
        "transformers": theirs,
        "ratios_ours_over_theirs": theirs.as_ref().map(|t| ratios(&ours, t)),
        "quantized": quant,
        "llama_cpp": llama,
        "ratios_vlmpipe_over_llama_cpp": llama
            .as_ref()
            .map(|l| bench_llama::ratios(l, &ours, quant.as_ref())),
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.json_out {
        std::fs::write(path, &text)
            .with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    Ok(Outcome::Success)
}

/// The `--image` photo, decoded once before timing (the Python side receives a decoded image).
fn read_image(path: &Path) -> anyhow::Result<image::RgbImage> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read image `{}` (from `--image`)", path.display()))?;
    decode_image(&bytes).with_context(|| format!("bad image `{}`", path.display()))
}

/// The runner(s) `bench model` times, with what loading cost.
struct LoadedRunners {
    runner: ModelRunner,
    load_s: f64,
    rss_after_load_mib: Option<f64>,
    /// With `--quant`: the quantized runner, its report and its load time in seconds.
    quantized: Option<(ModelRunner, QuantReport, f64)>,
}

/// Loads the model in `dir` (with `adapter`), and with `--quant` its quantized copy beside it,
/// so each repetition can time both back to back and a busy neighbour slows both alike.
fn load_runners(
    args: &BenchModelArgs,
    dir: &Path,
    adapter: Option<&Path>,
) -> anyhow::Result<LoadedRunners> {
    let device = crate::cli::open_device(&args.device)?;
    let t = Instant::now();
    let runner = ModelRunner::load_with_adapter(
        dir,
        adapter,
        &LoadOptions {
            dtype: args.dtype.to_candle(),
            device,
        },
    )?;
    let load_s = t.elapsed().as_secs_f64();
    let rss_after_load_mib = proc_status_mib("VmRSS");
    let quantized = match args.quant {
        Some(quant) => {
            let options = LoadOptions {
                dtype: args.dtype.to_candle(),
                device: runner.device().clone(),
            };
            let t = Instant::now();
            let (q, report) = ModelRunner::load_quantized(dir, adapter, &options, quant)?;
            for line in report.fallback_lines() {
                eprintln!("note: `--quant {quant}`: {line}");
            }
            Some((q, report, t.elapsed().as_secs_f64()))
        }
        None => None,
    };
    Ok(LoadedRunners {
        runner,
        load_s,
        rss_after_load_mib,
        quantized,
    })
}

/// Every recorded round of one runner: a column per [`STEPS`] entry and each round's decode
/// steps.
struct Samples {
    columns: Vec<Vec<f64>>,
    decode_steps_ms: Vec<Vec<f64>>,
}

/// What `--repeats` rounds measured.
struct Rounds {
    ours: Samples,
    quantized: Option<Samples>,
    /// (prompt tokens, image tokens).
    shape: (usize, usize),
    /// The read bandwidth probed right after each recorded round (with a quantized runner only:
    /// its decode steps are set against it).
    bandwidth_gbs: Vec<f64>,
    /// Peak RSS after the warm-up round, which reached every round's peak and came before any
    /// bandwidth probe's buffer.
    peak_rss_mib: Option<f64>,
}

/// Times `--repeats` rounds of every step with `runner` (and `quantized` right after it in the
/// same round), after one warm-up round.
fn time_rounds(
    runner: &ModelRunner,
    quantized: Option<&ModelRunner>,
    conversation: &Conversation,
    image: &image::RgbImage,
    args: &BenchModelArgs,
) -> anyhow::Result<Rounds> {
    let new_samples = || Samples {
        columns: vec![Vec::new(); STEPS.len()],
        decode_steps_ms: Vec::new(),
    };
    let mut rounds = Rounds {
        ours: new_samples(),
        quantized: quantized.map(|_| new_samples()),
        shape: (0, 0),
        bandwidth_gbs: Vec::new(),
        peak_rss_mib: None,
    };
    // Round 0 warms up caches and the allocator and is not recorded.
    for round in 0..=args.repeats {
        let timed = time_round(runner, conversation, image, args.decode_steps)?;
        rounds.shape = timed.shape;
        let q_timed = match quantized {
            Some(q) => Some(time_round(q, conversation, image, args.decode_steps)?),
            None => None,
        };
        if round == 0 {
            rounds.peak_rss_mib = proc_status_mib("VmHWM");
            continue;
        }
        timed.record(&mut rounds.ours);
        if let (Some(q_timed), Some(samples)) = (q_timed, rounds.quantized.as_mut()) {
            q_timed.record(samples);
            // Seconds after this round's decode steps: the host's bandwidth drifts by 10-20%
            // over a run (and once in a while reads far higher), so each round's steps are set
            // against their own probe rather than one taken after all rounds.
            rounds.bandwidth_gbs.push(bench_quant::read_bandwidth_gbs());
        }
    }
    Ok(rounds)
}

/// The quantized runner's side of the report: its load time and the same step summaries.
fn quantized_side(load_s: f64, samples: Samples) -> anyhow::Result<Value> {
    let mut side = serde_json::Map::new();
    side.insert("load_s".into(), json!(load_s));
    for (key, column) in STEPS.iter().zip(samples.columns) {
        side.insert(
            (*key).to_owned(),
            serde_json::to_value(Summary::of(column))?,
        );
    }
    side.insert("decode_steps_ms".into(), json!(samples.decode_steps_ms));
    Ok(Value::Object(side))
}

/// What `bench model` measured of vlmpipe: the report's `vlmpipe` object.
#[derive(Debug, Serialize)]
struct ModelTimings {
    preprocess_ms: Summary,
    vision_ms: Summary,
    prompt_forward_ms: Summary,
    lm_prefill_ms: Summary,
    decode_ms_per_token: Summary,
    classify_ms: Summary,
    decode_tokens_per_s: f64,
    decode_steps_ms: Vec<Vec<f64>>,
    #[serde(flatten)]
    footprint: Footprint,
    /// The compute dtype as candle spells it (`F32`).
    dtype: String,
    device: String,
    backends: Vec<&'static str>,
    /// Which CPU product ran: weights packed for one of our kernels, or dense for gemm.
    packed_weights: usize,
}

/// Load time, memory and the prompt's size.
#[derive(Debug, Serialize)]
struct Footprint {
    load_s: f64,
    rss_after_load_mib: Option<f64>,
    peak_rss_mib: Option<f64>,
    num_prompt_tokens: usize,
    num_image_tokens: usize,
}

impl ModelTimings {
    /// `samples` holds one column per [`STEPS`] entry, in order.
    fn new(
        samples: Vec<Vec<f64>>,
        decode_steps_ms: Vec<Vec<f64>>,
        footprint: Footprint,
        dtype: String,
        device: String,
        packed_weights: usize,
    ) -> Self {
        let mut steps = samples.into_iter().map(Summary::of);
        let mut next = || steps.next().unwrap_or_else(|| Summary::of(Vec::new()));
        let (preprocess_ms, vision_ms, prompt_forward_ms) = (next(), next(), next());
        let (lm_prefill_ms, decode_ms_per_token, classify_ms) = (next(), next(), next());
        Self {
            decode_tokens_per_s: 1000.0 / decode_ms_per_token.median,
            preprocess_ms,
            vision_ms,
            prompt_forward_ms,
            lm_prefill_ms,
            decode_ms_per_token,
            classify_ms,
            decode_steps_ms,
            footprint,
            dtype,
            device,
            backends: compiled_backends(),
            packed_weights,
        }
    }
}

/// One repetition of every timed step ([`STEPS`], in order) and each decode step.
struct RoundTimes {
    row: [f64; 6],
    step_ms: Vec<f64>,
    /// (prompt tokens, image tokens).
    shape: (usize, usize),
}

impl RoundTimes {
    fn record(self, samples: &mut Samples) {
        for (column, value) in samples.columns.iter_mut().zip(self.row) {
            column.push(value);
        }
        samples.decode_steps_ms.push(self.step_ms);
    }
}

/// Times every step of one classification of `image` with `runner`.
fn time_round(
    runner: &ModelRunner,
    conversation: &Conversation,
    image: &image::RgbImage,
    steps: usize,
) -> anyhow::Result<RoundTimes> {
    let t = Instant::now();
    let inputs = runner
        .processor()
        .prepare(conversation, std::slice::from_ref(image), true)?;
    let preprocess = t.elapsed();

    let t = Instant::now();
    let features = runner.image_features(&inputs)?;
    // GPU work is asynchronous: every timer stops after the device has finished.
    runner.device().synchronize()?;
    let vision = t.elapsed();

    let model = runner.model();
    let dev = model.device();
    let ids = Tensor::new(inputs.input_ids.as_slice(), dev)?.unsqueeze(0)?;
    let t = Instant::now();
    let all_features = runner.image_features(&inputs)?;
    let mut cache = model.new_cache(1);
    model.forward(
        &ids,
        all_features.as_ref(),
        None,
        &mut cache,
        LogitsMode::All,
    )?;
    dev.synchronize()?;
    let prompt_forward = t.elapsed();

    let embeds = model.embed(&ids, features.as_ref())?;
    let t = Instant::now();
    let mut cache = model.new_cache(1);
    let logits = model.forward_embeds(&embeds, None, &mut cache, LogitsMode::Last)?;
    dev.synchronize()?;
    let prefill = t.elapsed();

    let mut token = first_argmax(&logits)?;
    let mut step_ms = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        let input = Tensor::new(&[[token]], dev)?;
        let logits = model.forward_generated(&input, &mut cache, LogitsMode::Last)?;
        token = first_argmax(&logits)?;
        step_ms.push(ms(t.elapsed()));
    }

    let t = Instant::now();
    let inputs = runner
        .processor()
        .prepare(conversation, std::slice::from_ref(image), true)?;
    let features = runner.image_features(&inputs)?;
    // No EOS ids: always `1 + steps` tokens, like `min_new_tokens` on the Python side.
    let cfg = GenerateConfig {
        max_new_tokens: 1 + steps,
        eos_token_ids: Vec::new(),
        pad_token_id: runner.pad_token_id(),
        sampling: Sampling::default(),
    };
    let prompt = Prompt {
        input_ids: &inputs.input_ids,
        image_features: features.as_ref(),
        seed: None,
    };
    generate::generate(model, &[prompt], &cfg, None)?;
    let classify = t.elapsed();

    let mean_step = step_ms.iter().sum::<f64>() / step_ms.len().max(1) as f64;
    Ok(RoundTimes {
        row: [
            ms(preprocess),
            ms(vision),
            ms(prompt_forward),
            ms(prefill),
            mean_step,
            ms(classify),
        ],
        step_ms,
        shape: (inputs.input_ids.len(), inputs.num_image_tokens()),
    })
}

/// The model folder: `--model` resolved, or a random checkpoint for `--config`. The second
/// value keeps a temporary folder alive for the run.
fn model_dir(args: &BenchModelArgs) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    if let Some(reference) = &args.model {
        return Ok((resolve_model_dir(reference)?, None));
    }
    let Some(config) = &args.config else {
        anyhow::bail!("give `--model DIR` or `--config CONFIG.json`");
    };
    let source = config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (dir, temp) = match &args.random_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let temp = tempfile::tempdir().context("cannot create a temporary folder")?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    let same_config = std::fs::read(dir.join("config.json")).ok() == std::fs::read(config).ok();
    if same_config && dir.join("model.safetensors").is_file() {
        eprintln!("reusing random checkpoint `{}`", dir.display());
    } else {
        let t = Instant::now();
        let n = write_random_checkpoint(source, &dir, DType::BF16, 0)?;
        eprintln!(
            "wrote a random checkpoint ({n} parameters, bf16) to `{}` in {:.1} s",
            dir.display(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok((dir, temp))
}

/// Runs `bench_transformers.py` on the same checkpoint and image; returns its JSON report.
fn run_transformers(
    python: &Path,
    script: &Path,
    dir: &Path,
    image: &Path,
    args: &BenchModelArgs,
    device: &str,
) -> anyhow::Result<Value> {
    // The same work as ours: dtype, device and decode steps; torch calls Apple GPUs `mps`.
    let torch_device = match device.strip_prefix("metal") {
        Some(_) => "mps".to_owned(),
        None => device.to_owned(),
    };
    let dtype = args.dtype.name();
    let out = tempfile::NamedTempFile::new().context("cannot create a temporary file")?;
    eprintln!(
        "running transformers: {} {}",
        python.display(),
        script.display()
    );
    let status = Process::new(python)
        .arg(script)
        .arg(dir)
        .arg("--image")
        .arg(image)
        .arg("--repeats")
        .arg(args.repeats.to_string())
        .arg("--threads")
        .arg(args.threads.to_string())
        .arg("--decode-steps")
        .arg(args.decode_steps.to_string())
        .args(["--dtype", dtype, "--device", &torch_device])
        .arg("--json-out")
        .arg(out.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("cannot run `{}`", python.display()))?;
    anyhow::ensure!(
        status.success(),
        "the transformers benchmark failed ({status})"
    );
    let text = std::fs::read_to_string(out.path())?;
    serde_json::from_str(&text).context("the transformers benchmark wrote invalid JSON")
}

/// ours / theirs for every step's median and for peak memory.
fn ratios(ours: &Value, theirs: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for key in STEPS {
        let (a, b) = (&ours[key]["median"], &theirs[key]["median"]);
        if let (Some(a), Some(b)) = (a.as_f64(), b.as_f64()) {
            out.insert((*key).to_owned(), json!(a / b));
        }
    }
    for key in ["peak_rss_mib", "rss_after_load_mib"] {
        if let (Some(a), Some(b)) = (ours[key].as_f64(), theirs[key].as_f64()) {
            out.insert(key.to_owned(), json!(a / b));
        }
    }
    Value::Object(out)
}

/// Which CPU product the model ran: `packed` matrices packed for `kernel`, or dense.
fn weights_line(packed: Option<u64>, kernel: Option<Kernel>) -> String {
    match (packed, kernel) {
        (Some(n), Some(kernel)) if n > 0 => {
            format!("weights: {n} matrices packed for the {kernel:?} kernel")
        }
        _ => "weights: dense (gemm crate)".to_owned(),
    }
}

fn print_table(ours: &Value, theirs: Option<&Value>, prompt_tokens: usize, image_tokens: usize) {
    println!("prompt: {prompt_tokens} tokens, {image_tokens} image tokens");
    // Loading packed for `Kernel::for_this_cpu()` in this same process.
    println!(
        "{}",
        weights_line(ours["packed_weights"].as_u64(), Kernel::for_this_cpu())
    );
    println!(
        "{:<22} {:>18} {:>18} {:>12}",
        "step", "vlmpipe ms (min)", "transformers", "ours/theirs"
    );
    for key in STEPS {
        let cell = |v: &Value| match (v[key]["median"].as_f64(), v[key]["min"].as_f64()) {
            (Some(m), Some(lo)) => format!("{m:.1} ({lo:.1})"),
            _ => "-".to_owned(),
        };
        let ratio = theirs
            .and_then(|t| Some(ours[key]["median"].as_f64()? / t[key]["median"].as_f64()?))
            .map_or("-".to_owned(), |r| format!("{r:.2}"));
        println!(
            "{:<22} {:>18} {:>18} {:>12}",
            key.trim_end_matches("_ms"),
            cell(ours),
            theirs.map_or("-".to_owned(), cell),
            ratio
        );
    }
    for key in ["rss_after_load_mib", "peak_rss_mib"] {
        let fmt = |v: &Value| {
            v[key]
                .as_f64()
                .map_or("-".to_owned(), |x| format!("{x:.0}"))
        };
        let ratio = theirs
            .and_then(|t| Some(ours[key].as_f64()? / t[key].as_f64()?))
            .map_or("-".to_owned(), |r| format!("{r:.2}"));
        println!(
            "{:<22} {:>18} {:>18} {:>12}",
            key,
            fmt(ours),
            theirs.map_or("-".to_owned(), fmt),
            ratio
        );
    }
}

/// candle sizes its thread pools from `RAYON_NUM_THREADS` when they are first used.
pub(crate) fn set_threads(threads: usize) {
    let wanted = threads.max(1).to_string();
    if std::env::var("RAYON_NUM_THREADS").ok().as_deref() != Some(wanted.as_str()) {
        // SAFETY: called by the CLI before any tensor work, while the process has one thread,
        // so no other thread can read the environment concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", &wanted) };
    }
}

/// The 1-, 5- and 15-minute load averages from `/proc/loadavg`.
pub(crate) fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// A `kB` field of `/proc/self/status` (`VmRSS`, `VmHWM` = peak), in MiB.
fn proc_status_mib(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn first_argmax(logits: &Tensor) -> anyhow::Result<u32> {
    let ids = logits
        .to_dtype(DType::F32)?
        .argmax(candle_core::D::Minus1)?;
    let ids = ids.flatten_all()?.to_vec1::<u32>()?;
    ids.first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("empty logits"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table named AVX-512 whatever kernel the weights were packed for (portable, AVX2).
    #[test]
    fn the_weights_line_names_the_kernel_that_ran() {
        assert_eq!(
            weights_line(Some(168), Some(Kernel::Avx2)),
            "weights: 168 matrices packed for the Avx2 kernel"
        );
        assert_eq!(
            weights_line(Some(3), Some(Kernel::Portable)),
            "weights: 3 matrices packed for the Portable kernel"
        );
        assert_eq!(
            weights_line(Some(0), Some(Kernel::Avx512)),
            "weights: dense (gemm crate)"
        );
        assert_eq!(weights_line(None, None), "weights: dense (gemm crate)");
    }

    #[test]
    fn summary_takes_median_and_min() {
        let s = Summary::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min), (2.0, 1.0));
        let s = Summary::of(vec![4.0, 1.0, 2.0, 3.0]);
        assert_eq!((s.median, s.min), (2.5, 1.0));
    }

    #[test]
    fn model_timings_serialise_to_the_reports_keys() {
        // The `vlmpipe` object's keys and values as the map built from string keys wrote them.
        let samples = (0..STEPS.len()).map(|i| vec![i as f64 + 1.0]).collect();
        let timings = ModelTimings::new(
            samples,
            vec![vec![4.0, 6.0]],
            Footprint {
                load_s: 1.5,
                rss_after_load_mib: Some(100.0),
                peak_rss_mib: None,
                num_prompt_tokens: 270,
                num_image_tokens: 192,
            },
            "F32".to_owned(),
            "cpu".to_owned(),
            7,
        );
        let value = serde_json::to_value(&timings).expect("serialise");
        let mut expected = serde_json::Map::new();
        for (i, key) in STEPS.iter().enumerate() {
            let v = i as f64 + 1.0;
            expected.insert(
                (*key).to_owned(),
                json!({"median": v, "min": v, "samples": [v]}),
            );
        }
        expected.insert("decode_tokens_per_s".into(), json!(1000.0 / 5.0));
        expected.insert("decode_steps_ms".into(), json!([[4.0, 6.0]]));
        expected.insert("load_s".into(), json!(1.5));
        expected.insert("rss_after_load_mib".into(), json!(100.0));
        expected.insert("peak_rss_mib".into(), Value::Null);
        expected.insert("num_prompt_tokens".into(), json!(270));
        expected.insert("num_image_tokens".into(), json!(192));
        expected.insert("dtype".into(), json!("F32"));
        expected.insert("device".into(), json!("cpu"));
        expected.insert("backends".into(), json!(compiled_backends()));
        expected.insert("packed_weights".into(), json!(7));
        assert_eq!(value, Value::Object(expected));
    }

    #[test]
    fn ratios_divide_medians() {
        let ours = json!({"vision_ms": {"median": 50.0}, "peak_rss_mib": 100.0});
        let theirs = json!({"vision_ms": {"median": 100.0}, "peak_rss_mib": 400.0});
        let r = ratios(&ours, &theirs);
        assert_eq!(r["vision_ms"], json!(0.5));
        assert_eq!(r["peak_rss_mib"], json!(0.25));
        assert!(r.get("lm_prefill_ms").is_none());
    }
}
