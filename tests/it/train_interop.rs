//! Target-name validation on a real LFM2-VL, merging an adapter into a Hub-layout checkpoint, and
//! the vlmpipe -> PEFT direction of adapter interop (`tests/reference/check_vlmpipe_adapter.py`).

use crate::train_support;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use vlmpipe::model::chat::Conversation;
use vlmpipe::model::checkpoint::{LoadOptions, load};
use vlmpipe::model::lfm2_vl::{Lfm2VlModel, LogitsMode};
use vlmpipe::model::packed::Kernel;
use vlmpipe::model::processor::{Processor, stack_images};
use vlmpipe::train::lora::{LFM2_TARGETS, LoraConfig, Trainable, TrainableSpec};
use vlmpipe::train::merge::{ExportOrigin, MergeOptions, merge_checkpoint};
use vlmpipe::train::optim::{AdamWConfig, Decay};
use vlmpipe::train::peft::PeftAdapter;
use vlmpipe::train::trainer::{TrainConfig, train};
use vlmpipe::train::{LossOn, TrainError};

use train_support::{AnyResult, TestResult, checkpoint_dir};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

fn lora(targets: &[&str], include_vision: bool) -> TrainableSpec {
    TrainableSpec {
        lora: Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: targets.iter().map(|s| s.to_string()).collect(),
            include_vision,
            ..LoraConfig::default()
        }),
        full: Vec::new(),
    }
}

#[test]
fn lora_targets_are_validated_against_lfm2_names() -> TestResult {
    let mut model = load(&checkpoint_dir(), &LoadOptions::default())?;
    for wrong in ["o_proj", "gate_proj", "up_proj", "down_proj"] {
        let err = Trainable::attach(&mut model, &lora(&["q_proj", wrong], false))
            .err()
            .ok_or("a wrong target was accepted")?;
        let text = err.to_string();
        assert!(matches!(err, TrainError::UnknownTarget { .. }), "{text}");
        assert!(text.contains(&format!("`{wrong}`")), "{text}");
        assert!(
            text.contains("language model: in_proj, k_proj, out_proj, q_proj, v_proj, w1, w2, w3"),
            "{text}"
        );
    }
    // The projector is out of scope unless vision modules are included.
    let err = Trainable::attach(&mut model, &lora(&["linear_1"], false))
        .err()
        .ok_or("a projector target was accepted without include_vision")?;
    assert!(err.to_string().contains("excluded"), "{err}");

    // PEFT's count for the fixture's configuration (r 4 on every LFM2 projection).
    let t = Trainable::attach(&mut model, &lora(&LFM2_TARGETS, false))?;
    assert_eq!(t.num_parameters(), 14_656);
    assert_eq!(t.lora().len(), 29);
    // With the vision tower, q/k/v/out_proj also hit SigLIP2's 3 layers (4 each) and linear_1
    // the projector.
    let t = Trainable::attach(&mut model, &lora(&["q_proj", "linear_1"], true))?;
    assert_eq!(t.lora().len(), 2 + 3 + 1);
    assert!(t.trains_vision_tower(&model));
    Ok(())
}

fn fixture_prompt_logits(model: &Lfm2VlModel, processor: &Processor) -> AnyResult<Tensor> {
    let image = image::open(fixtures().join("images/lora_a_64x48.png"))?.to_rgb8();
    let conv = Conversation::image_question(None, "Which shape is in the picture?");
    let inputs = processor.prepare(&conv, std::slice::from_ref(&image), true)?;
    let t = stack_images(&inputs.images, &Device::Cpu)?;
    let features = model.image_features(
        &t.pixel_values,
        &t.pixel_attention_mask,
        &inputs.images[0].spatial_shapes,
    )?;
    let ids = Tensor::new(inputs.input_ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let mut cache = model.new_cache(1);
    Ok(model
        .forward(&ids, Some(&features), None, &mut cache, LogitsMode::Last)?
        .flatten_all()?)
}

fn max_abs(t: &Tensor) -> candle_core::Result<f32> {
    t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

#[test]
fn merged_checkpoint_reproduces_adapter_logits() -> TestResult {
    let processor = Processor::from_model_dir(&checkpoint_dir())?;
    let adapter = PeftAdapter::load(&fixtures().join("lora/adapter_trained"), &Device::Cpu)?;
    let mut with_adapter = load(&checkpoint_dir(), &LoadOptions::default())?;
    adapter.attach(&mut with_adapter)?;
    let expected = fixture_prompt_logits(&with_adapter, &processor)?;

    let out = tempfile::tempdir()?;
    let merged_dir = out.path().join("merged");
    let report = merge_checkpoint(
        &checkpoint_dir(),
        &adapter,
        &merged_dir,
        &MergeOptions {
            dtype: DType::F32,
            force: false,
            origin: ExportOrigin {
                pipeline: "interop".into(),
                stage: "fixture".into(),
            },
        },
    )?;
    assert_eq!(report.merged_lora_modules, 29);
    for file in [
        "config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "processor_config.json",
    ] {
        assert!(
            report.copied_files.iter().any(|f| f == file),
            "{file} not copied"
        );
    }
    let base_names = tensor_names(&checkpoint_dir().join("model.safetensors"))?;
    assert_eq!(
        tensor_names(&merged_dir.join("model.safetensors"))?,
        base_names
    );

    let merged = load(&merged_dir, &LoadOptions::default())?;
    let merged_processor = Processor::from_model_dir(&merged_dir)?;
    let got = fixture_prompt_logits(&merged, &merged_processor)?;
    let diff = max_abs(&(&got - &expected)?)?;
    let tol = 5e-4 + 2e-5 * max_abs(&expected)?;
    assert!(diff <= tol, "merged vs adapter logits: {diff} > {tol}");
    // And against PEFT itself.
    let refs = candle_core::safetensors::load(
        fixtures().join("lora/lora_reference.safetensors"),
        &Device::Cpu,
    )?;
    let peft = refs
        .get("logits_last_trained")
        .ok_or("missing fixture tensor")?;
    assert!(max_abs(&(&got - peft)?)? <= tol);

    // transformers loads the merged directory and computes the adapter's logits.
    let logits_file = out.path().join("logits.safetensors");
    vlmpipe::train::io::write_safetensors(&logits_file, &[("logits".into(), expected)])?;
    run_reference_script(
        "check_merged_checkpoint.py",
        &[
            merged_dir.as_os_str(),
            "--logits".as_ref(),
            logits_file.as_os_str(),
        ],
    )
}

/// Runs a `tests/reference` script with the reference venv; skips (Ok) when there is none.
fn run_reference_script(script: &str, args: &[&std::ffi::OsStr]) -> TestResult {
    let Some(python) = reference_python() else {
        eprintln!("skipping {script}: no tests/reference/.venv-5 (set VLMPIPE_REFERENCE_PYTHON)");
        return Ok(());
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(script);
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()?;
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}");
    assert!(
        out.status.success(),
        "{} failed: {report}{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn tensor_names(path: &Path) -> AnyResult<Vec<String>> {
    let bytes = std::fs::read(path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt"),
        "transformers wants format=pt"
    );
    let mut names: Vec<String> = meta.tensors().keys().cloned().collect();
    names.sort();
    Ok(names)
}

/// The reference venv's interpreter, if this checkout has one.
fn reference_python() -> Option<PathBuf> {
    let path = match std::env::var_os("VLMPIPE_REFERENCE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/.venv-5/bin/python")
        }
    };
    path.is_file().then_some(path)
}

#[test]
fn trained_adapter_round_trips_and_loads_in_peft() -> TestResult {
    round_trip(lora(&LFM2_TARGETS, false), 14_656)
}

/// With the vision tower and projector: PEFT names vision modules without the Hub layout's
/// `vision_model.` (transformers 5.x), which the writer and loader must map.
#[test]
fn vision_adapter_round_trips_and_loads_in_peft() -> TestResult {
    // q_proj: 2 LM + 3 vision layers of 48 -> 48 (r 4: 384 each), fc1 3 x (48 -> 96: 576),
    // linear_1 192 -> 96 (1152).
    round_trip(
        lora(&["q_proj", "fc1", "linear_1"], true),
        5 * 384 + 3 * 576 + 1152,
    )
}

fn round_trip(spec: TrainableSpec, parameters: usize) -> TestResult {
    let processor = Processor::from_model_dir(&checkpoint_dir())?;
    let eot = vlmpipe::train::batch::end_of_turn_id(&processor);
    let conv = Conversation::image_question(None, "Which shape is in the picture?");
    let mut examples = Vec::new();
    for (name, answer) in [("lora_a_64x48", "circle"), ("lora_b_48x80", "square")] {
        let image = image::open(fixtures().join(format!("images/{name}.png")))?.to_rgb8();
        examples.push(vlmpipe::train::Example::prepare(
            &processor,
            &conv,
            &[image],
            answer,
            eot,
        )?);
    }
    let cfg = TrainConfig {
        trainable: spec,
        optimizer: AdamWConfig {
            lr: 1e-2,
            ..AdamWConfig::default()
        },
        batch_size: 2,
        grad_accum: 1,
        warmup_ratio: 0.0,
        decay: Decay::Constant,
        max_grad_norm: None,
        epochs: 1,
        max_steps: Some(4),
        seed: 0,
        loss_on: LossOn::Answer,
        eval_every: None,
        checkpoint_every: None,
        checkpoint_interval: None,
        pad_id: 0,
        progress: false,
        feature_cache_bytes: 1 << 24,
    };
    let run = tempfile::tempdir()?;
    let mut model = load(&checkpoint_dir(), &LoadOptions::default())?;
    let outcome = train(&mut model, &examples, &[], &cfg, Some(run.path()), None)?;
    let first = outcome
        .metrics
        .first()
        .map(|r| r.train_loss)
        .unwrap_or(f64::NAN);
    let last = outcome
        .metrics
        .last()
        .map(|r| r.train_loss)
        .unwrap_or(f64::NAN);
    assert!(last < first, "loss did not fall: {first} -> {last}");
    // Training packed some weights where the CPU has the packed kernel (the LoRA targets, a
    // frozen image path); pack the rest, as inference does, so the fresh model below can hold
    // the very same layout and give the same bits.
    if let Some(kernel) = Kernel::for_this_cpu() {
        model.pack_linears_for_cpu(kernel)?;
    }
    let trained_logits = fixture_prompt_logits(&model, &processor)?;

    // What was written loads back onto a fresh model and gives the same logits.
    let adapter_dir = run.path().join("adapter");
    let loaded = PeftAdapter::load(&adapter_dir, &Device::Cpu)?;
    assert_eq!(loaded.num_parameters(), parameters);
    let mut fresh = load(&checkpoint_dir(), &LoadOptions::default())?;
    loaded.attach(&mut fresh)?;
    if let Some(kernel) = Kernel::for_this_cpu() {
        fresh.pack_linears_for_cpu(kernel)?;
    }
    let reloaded_logits = fixture_prompt_logits(&fresh, &processor)?;
    assert_eq!(max_abs(&(&reloaded_logits - &trained_logits)?)?, 0.0);

    vlmpipe::train::io::write_safetensors(
        &adapter_dir.join("logits.safetensors"),
        &[("logits".into(), trained_logits.to_dtype(DType::F32)?)],
    )?;
    run_reference_script("check_vlmpipe_adapter.py", &[adapter_dir.as_os_str()])
}

#[test]
fn bench_helper_times_a_tiny_training_step() -> TestResult {
    use vlmpipe::model::config::Config;
    use vlmpipe::train::bench::{BenchSpec, bench_train_step};
    let cfg = Config::from_json(&std::fs::read_to_string(
        checkpoint_dir().join("config.json"),
    )?)?;
    let spec = BenchSpec {
        patch_rows: 8,
        patch_cols: 8,
        prompt_tokens: 30,
        steps: 2,
        ..BenchSpec::default()
    };
    let report = bench_train_step(&cfg, &spec)?;
    // PEFT counts 29,312 trainable parameters for r 8 on every LFM2 projection of this config
    // (tests/reference/bench_peft_train.py).
    assert_eq!(report.trained_parameters, 29_312);
    assert_eq!((report.image_tokens, report.sequence_tokens), (16, 48));
    assert_eq!(report.step_ms.len(), 2);
    assert!(report.median_step_ms > 0.0 && report.peak_rss_mib > 0.0);
    Ok(())
}
