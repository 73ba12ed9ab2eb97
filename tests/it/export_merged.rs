//! Issue 13, items 4–6: `export --merged` never deletes what vlmpipe did not write, merges in f32
//! and saves the dtype asked for with a report of what rounding lost, and writes a `config.json`
//! that transformers' Auto classes load (`model_type: lfm2_vl`).
//!
//! The merges here fold the committed PEFT fixture adapter (`lora/adapter_trained`, written by
//! peft 0.21) into its base (tiny-nothumb); `tests/it/pipeline_finetune.rs` exports a trained stage
//! through the binary.

use crate::train_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use vlmpipe::model::chat::Conversation;
use vlmpipe::model::checkpoint::{LoadOptions, load};
use vlmpipe::model::lfm2_vl::{Lfm2VlModel, LogitsMode};
use vlmpipe::model::processor::{Processor, stack_images};
use vlmpipe::train::merge::{
    EXPORT_MANIFEST, ExportError, ExportOrigin, MergeOptions, MergeReport, merge_checkpoint,
};
use vlmpipe::train::peft::PeftAdapter;

use train_support::{AnyResult, TestResult, checkpoint_dir};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

fn adapter() -> AnyResult<PeftAdapter> {
    Ok(PeftAdapter::load(
        &fixtures().join("lora/adapter_trained"),
        &Device::Cpu,
    )?)
}

fn options(stage: &str, dtype: DType, force: bool) -> MergeOptions {
    MergeOptions {
        dtype,
        force,
        origin: ExportOrigin {
            pipeline: "demo".into(),
            stage: stage.into(),
        },
    }
}

fn merge(base: &Path, out: &Path, opts: &MergeOptions) -> Result<MergeReport, ExportError> {
    merge_checkpoint(base, &adapter().expect("fixture adapter"), out, opts)
}

/// Every file name in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn last_logits(model: &Lfm2VlModel, processor: &Processor) -> AnyResult<Tensor> {
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
        .flatten_all()?
        .to_dtype(DType::F32)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> AnyResult<f32> {
    Ok((a - b)?.abs()?.max(0)?.to_scalar::<f32>()?)
}

/// A copy of tiny-nothumb with its weights stored in bf16, like the Hub's LFM2-VL checkpoints.
fn bf16_base(root: &Path) -> AnyResult<PathBuf> {
    let dir = root.join("base-bf16");
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(checkpoint_dir())? {
        let entry = entry?;
        if entry.file_name() != "model.safetensors" {
            std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
        }
    }
    let tensors =
        candle_core::safetensors::load(checkpoint_dir().join("model.safetensors"), &Device::Cpu)?;
    let bf16: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::BF16)?)))
        .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&bf16, dir.join("model.safetensors"))?;
    Ok(dir)
}

#[test]
fn export_refuses_a_folder_it_did_not_write_and_never_deletes_user_files() -> TestResult {
    let root = tempfile::tempdir()?;
    // The project folder of the issue: a pipeline, evals, a cache.
    let project = root.path().join("project");
    std::fs::create_dir_all(project.join("evals/demo"))?;
    std::fs::create_dir_all(project.join(".vlmpipe/entries"))?;
    std::fs::write(project.join("pipeline.vp"), "pipeline demo {}\n")?;
    std::fs::write(project.join("evals/demo/metrics.json"), "{}")?;
    let before = listing(&project);

    let err = merge(
        &checkpoint_dir(),
        &project,
        &options("tuned", DType::F32, false),
    )
    .expect_err("a folder with user files must be refused");
    let text = err.to_string();
    assert!(
        matches!(err, ExportError::NotEmpty { .. }),
        "unexpected error: {text}"
    );
    assert!(
        text.contains("pipeline.vp") && text.contains("--force"),
        "{text}"
    );
    assert_eq!(
        listing(&project),
        before,
        "the refused export changed the folder"
    );
    // Nothing was left beside it either.
    assert_eq!(listing(root.path()), vec!["project".to_owned()]);

    // `--force` writes the checkpoint's files and keeps everything else.
    let report = merge(
        &checkpoint_dir(),
        &project,
        &options("tuned", DType::F32, true),
    )?;
    assert_eq!(report.merged_lora_modules, 29);
    let after = listing(&project);
    for kept in &before {
        assert!(after.contains(kept), "`{kept}` was removed: {after:?}");
    }
    assert_eq!(
        std::fs::read_to_string(project.join("pipeline.vp"))?,
        "pipeline demo {}\n"
    );
    for written in ["config.json", "model.safetensors", EXPORT_MANIFEST] {
        assert!(after.iter().any(|f| f == written), "{written} missing");
    }
    assert!(
        !after.iter().any(|f| f.starts_with(".vlmpipe-export-")),
        "staging folder left behind: {after:?}"
    );
    assert!(project.join("evals/demo/metrics.json").is_file());
    Ok(())
}

#[test]
fn a_previous_export_of_the_same_stage_is_updated_in_place() -> TestResult {
    let root = tempfile::tempdir()?;
    let out = root.path().join("merged");
    merge(
        &checkpoint_dir(),
        &out,
        &options("tuned", DType::F32, false),
    )?;
    let first = listing(&out);
    assert!(first.iter().any(|f| f == EXPORT_MANIFEST), "{first:?}");
    assert_eq!(listing(root.path()), vec!["merged".to_owned()]);

    // A file the user added, and one an earlier export wrote that this one no longer writes.
    std::fs::write(out.join("NOTES.md"), "mine")?;
    std::fs::write(out.join("stale.json"), "{}")?;
    let manifest_path = out.join(EXPORT_MANIFEST);
    let mut manifest: Value = serde_json::from_str(&std::fs::read_to_string(&manifest_path)?)?;
    manifest["files"]
        .as_array_mut()
        .ok_or("files")?
        .push("stale.json".into());
    std::fs::write(&manifest_path, serde_json::to_string(&manifest)?)?;

    // Same stage again: allowed without `--force`; ours replaced, the user's file kept.
    merge(
        &checkpoint_dir(),
        &out,
        &options("tuned", DType::BF16, false),
    )?;
    let second = listing(&out);
    assert!(second.iter().any(|f| f == "NOTES.md"), "{second:?}");
    assert!(!second.iter().any(|f| f == "stale.json"), "{second:?}");
    assert_eq!(std::fs::read_to_string(out.join("NOTES.md"))?, "mine");
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(&manifest_path)?)?;
    assert_eq!(manifest["dtype"], "bf16");
    assert_eq!(manifest["stage"], "tuned");

    // Another stage's export is refused, and left alone.
    let err = merge(
        &checkpoint_dir(),
        &out,
        &options("other", DType::F32, false),
    )
    .expect_err("another stage's export must be refused");
    assert!(matches!(err, ExportError::OtherStage { .. }), "{err}");
    assert_eq!(listing(&out), second);

    // An empty folder is fine (and so is one that does not exist yet, above).
    let empty = root.path().join("empty");
    std::fs::create_dir_all(&empty)?;
    merge(
        &checkpoint_dir(),
        &empty,
        &options("tuned", DType::F32, false),
    )?;
    assert!(empty.join("model.safetensors").is_file());
    Ok(())
}

#[test]
fn the_default_f32_export_keeps_the_update_of_a_bf16_base() -> TestResult {
    let root = tempfile::tempdir()?;
    let base = bf16_base(root.path())?;
    let adapter = adapter()?;
    let processor = Processor::from_model_dir(&base)?;
    // What vlmpipe evaluates: the bf16 base computed in f32 with the adapter attached.
    let mut attached = load(&base, &LoadOptions::default())?;
    adapter.attach(&mut attached)?;
    let expected = last_logits(&attached, &processor)?;

    let out = root.path().join("f32");
    let report = merge_checkpoint(&base, &adapter, &out, &options("tuned", DType::F32, false))?;
    let r = &report.rounding;
    assert!(r.update_elements > 0);
    assert!(
        r.lost_fraction() < 0.001,
        "f32 lost {:.3}% of the update",
        100.0 * r.lost_fraction()
    );
    assert!(!r.is_large());
    let saved = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)?;
    assert!(saved.values().all(|t| t.dtype() == DType::F32));
    let merged = load(&out, &LoadOptions::default())?;
    let got = last_logits(&merged, &processor)?;
    let diff = max_abs_diff(&got, &expected)?;
    let tol = 5e-4 + 2e-5 * expected.abs()?.max(0)?.to_scalar::<f32>()?;
    assert!(diff <= tol, "f32 export vs evaluated model: {diff} > {tol}");

    // bf16 is what the base was stored in, and what exports used to be: the report says what
    // it loses, counted here again from the written file.
    let out16 = root.path().join("bf16");
    let report16 = merge_checkpoint(
        &base,
        &adapter,
        &out16,
        &options("tuned2", DType::BF16, false),
    )?;
    let r16 = &report16.rounding;
    let saved16 = candle_core::safetensors::load(out16.join("model.safetensors"), &Device::Cpu)?;
    let stored = candle_core::safetensors::load(base.join("model.safetensors"), &Device::Cpu)?;
    let (mut update, mut lost) = (0u64, 0u64);
    for l in &adapter.lora {
        let key = format!("{}.weight", l.module);
        let delta = (l.b.matmul(&l.a)? * l.scale)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let new = saved16[&key]
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let old = stored[&key]
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for i in 0..delta.len() {
            if delta[i] != 0.0 {
                update += 1;
                lost += u64::from(new[i] == old[i]);
            }
        }
    }
    assert_eq!((r16.update_elements, r16.lost_elements), (update, lost));
    assert!(r16.lost_elements > 0 && r16.max_merged_error > 0.0);
    assert!(r16.lost_fraction() > r.lost_fraction());
    assert_eq!(r16.is_large(), r16.lost_fraction() > 0.01);
    assert!(saved16.values().all(|t| t.dtype() == DType::BF16));
    let merged16 = load(&out16, &LoadOptions::default())?;
    let diff16 = max_abs_diff(&last_logits(&merged16, &processor)?, &expected)?;
    assert!(
        diff16 > diff,
        "bf16 rounding should move the logits more than f32 ({diff16} vs {diff})"
    );
    Ok(())
}

#[test]
fn the_exported_config_is_what_transformers_auto_classes_load() -> TestResult {
    let root = tempfile::tempdir()?;
    let base_config: Value = serde_json::from_str(&std::fs::read_to_string(
        checkpoint_dir().join("config.json"),
    )?)?;
    // The files: LiquidAI's spelling, which transformers does not register.
    assert_eq!(base_config["model_type"], "lfm2-vl");
    for (dtype, torch) in [
        (DType::F32, "float32"),
        (DType::BF16, "bfloat16"),
        (DType::F16, "float16"),
    ] {
        let out = root.path().join(torch);
        merge(&checkpoint_dir(), &out, &options(torch, dtype, false))?;
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json"))?)?;
        // transformers' CONFIG_MAPPING and MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING keys.
        assert_eq!(config["model_type"], "lfm2_vl");
        assert_eq!(
            config["architectures"],
            serde_json::json!(["Lfm2VlForConditionalGeneration"])
        );
        assert_eq!(config["text_config"]["model_type"], "lfm2");
        assert_eq!(
            config["vision_config"]["model_type"],
            "siglip2_vision_model"
        );
        assert!(config.get("auto_map").is_none());
        assert_eq!(config["dtype"], torch);
        assert_eq!(config["torch_dtype"], torch);
        // Everything else is the base's.
        for key in [
            "image_token_id",
            "downsample_factor",
            "projector_hidden_size",
        ] {
            assert_eq!(config[key], base_config[key], "{key}");
        }
        assert_eq!(
            config["text_config"]["hidden_size"],
            base_config["text_config"]["hidden_size"]
        );
        // And vlmpipe still loads it.
        let model = load(&out, &LoadOptions::default());
        assert!(model.is_ok(), "{:?}", model.err());
    }
    Ok(())
}

/// The real LFM2-VL-450M processor files name `Siglip2ImageProcessor` in
/// `preprocessor_config.json`, which `AutoProcessor` would build; the export names the LFM2-VL
/// class with the settings vlmpipe reads, so both preprocess alike.
#[test]
fn the_exported_processor_files_name_lfm2_vl_with_the_same_settings() -> TestResult {
    use vlmpipe::model::processor::ProcessorConfig;
    let root = tempfile::tempdir()?;
    let mut bases = vec![checkpoint_dir()];
    match crate::support::shared_path("models/LFM2-VL-450M") {
        Some(real) => {
            // tiny-nothumb's weights with the real 450M processor files.
            let dir = root.path().join("real-processor");
            std::fs::create_dir_all(&dir)?;
            for entry in std::fs::read_dir(checkpoint_dir())? {
                let entry = entry?;
                std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
            }
            for name in ["preprocessor_config.json", "processor_config.json"] {
                std::fs::copy(real.join(name), dir.join(name))?;
            }
            bases.push(dir);
        }
        None => eprintln!("skipping: the real 450M processor files (no ../shared)"),
    }
    for (i, base) in bases.iter().enumerate() {
        let out = root.path().join(format!("out{i}"));
        merge(base, &out, &options("tuned", DType::F32, false))?;
        let pre: Value = serde_json::from_str(&std::fs::read_to_string(
            out.join("preprocessor_config.json"),
        )?)?;
        assert_eq!(pre["image_processor_type"], "Lfm2VlImageProcessorFast");
        assert_eq!(pre["processor_class"], "Lfm2VlProcessor");
        assert!(pre.get("do_resize").is_none_or(|v| v == true), "{pre}");
        let expected = ProcessorConfig::from_model_dir(base)?;
        assert_eq!(ProcessorConfig::from_model_dir(&out)?, expected);
        assert_eq!(pre["tile_size"], expected.tile_size);
        assert_eq!(pre["max_image_tokens"], expected.max_image_tokens);
        assert_eq!(pre["use_thumbnail"], expected.use_thumbnail);
    }
    Ok(())
}
