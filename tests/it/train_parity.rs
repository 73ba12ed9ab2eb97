//! LoRA parity with PyTorch + peft on the committed fixtures (`tests/fixtures/reference/lora/`):
//! loss and gradients at `adapter_init`, three AdamW steps, and logits with PEFT adapters loaded.
//!
//! Tolerances (f32) are the reference README's, about 10x the measured f32-vs-f64 drift of torch:
//! loss 1e-5 relative; gradients 1e-4 x the tensor's max |g|; adapter after 3 steps 2e-5 absolute;
//! logits 5e-4 + 2e-5 x max |logit|.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use vlmpipe::model::checkpoint::{LoadOptions, load};
use vlmpipe::model::lfm2_vl::{Lfm2VlModel, LogitsMode};
use vlmpipe::train::batch::Batch;
use vlmpipe::train::optim::{AdamW, AdamWConfig};
use vlmpipe::train::peft::PeftAdapter;
use vlmpipe::train::trainer::batch_loss_on;

type TestResult = Result<(), Box<dyn std::error::Error>>;
type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

fn tensors(path: &Path) -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn get<'a>(map: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor, String> {
    map.get(name)
        .ok_or_else(|| format!("fixture tensor `{name}` missing"))
}

/// The reference's exact `pixel_values` for one view PNG, padded to `max_patches`.
fn view_pixels(path: &Path, max_patches: usize) -> AnyResult<(Vec<f32>, (usize, usize))> {
    let img = image::open(path)?.to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (rows, cols) = (h / 16, w / 16);
    let mut out = vec![0f32; max_patches * 768];
    for pr in 0..rows {
        for pc in 0..cols {
            let p = pr * cols + pc;
            for y in 0..16 {
                for x in 0..16 {
                    let px = img.get_pixel((pc * 16 + x) as u32, (pr * 16 + y) as u32);
                    for c in 0..3 {
                        out[p * 768 + (y * 16 + x) * 3 + c] = (f32::from(px[c]) - 127.5) / 127.5;
                    }
                }
            }
        }
    }
    Ok((out, (rows, cols)))
}

struct Reference {
    model: Lfm2VlModel,
    batch: Batch,
    features: Tensor,
    refs: HashMap<String, Tensor>,
}

fn reference() -> Result<Reference, Box<dyn std::error::Error>> {
    let fx = fixtures();
    let model = load(
        &fx.join("checkpoints/tiny-nothumb"),
        &LoadOptions::default(),
    )?;
    let refs = tensors(&fx.join("lora/lora_reference.safetensors"))?;
    let ids = get(&refs, "input_ids")?.to_dtype(DType::U32)?;
    let mask = get(&refs, "attention_mask")?.to_dtype(DType::U32)?;
    let labels = get(&refs, "labels")?.to_vec2::<i64>()?;
    let (b, l) = ids.dims2()?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, row) in labels.iter().enumerate() {
        for t in 0..l - 1 {
            if row[t + 1] != -100 {
                rows.push((i * l + t) as u32);
                targets.push(row[t + 1] as u32);
            }
        }
    }
    assert_eq!(targets.len(), 8, "the fixture labels 8 tokens");
    let n = targets.len();
    let batch = Batch {
        input_ids: ids,
        attention_mask: mask,
        predict_rows: Tensor::from_vec(rows, n, &Device::Cpu)?,
        targets: Tensor::from_vec(targets, n, &Device::Cpu)?,
        num_targets: n,
        batch_size: b,
        seq_len: l,
    };
    let features = image_features(&model, &[0, 1])?;
    Ok(Reference {
        model,
        batch,
        features,
        refs,
    })
}

fn image_features(
    model: &Lfm2VlModel,
    examples: &[usize],
) -> Result<Tensor, Box<dyn std::error::Error>> {
    let mut values = Vec::new();
    let mut shapes = Vec::new();
    for &e in examples {
        let (v, shape) = view_pixels(
            &fixtures().join(format!("lora/views/ex{e}/view_00.png")),
            256,
        )?;
        values.extend(v);
        shapes.push(shape);
    }
    let views = examples.len();
    let pixel_values = Tensor::from_vec(values, (views, 256, 768), &Device::Cpu)?;
    let mask: Vec<u32> = shapes
        .iter()
        .flat_map(|&(r, c)| (0..256).map(move |p| u32::from(p < r * c)))
        .collect();
    let mask = Tensor::from_vec(mask, (views, 256), &Device::Cpu)?;
    Ok(model.image_features(&pixel_values, &mask, &shapes)?)
}

fn max_abs(t: &Tensor) -> Result<f32, candle_core::Error> {
    t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

#[test]
fn loss_gradients_and_three_adamw_steps_match_peft() -> TestResult {
    let Reference {
        mut model,
        batch,
        features,
        refs,
    } = reference()?;
    let fx = fixtures();
    let init = PeftAdapter::load(&fx.join("lora/adapter_init"), &Device::Cpu)?;
    assert_eq!(init.lora.len(), 29);
    assert_eq!(init.num_parameters(), 14_656);
    let trainable = init.attach(&mut model)?;
    assert_eq!(trainable.num_parameters(), 14_656);
    trainable.mode().set_training(true);

    // Loss and gradients at adapter_init.
    let loss = batch_loss_on(&model, &batch, Some(&features))?;
    let loss_value = loss.to_scalar::<f32>()?;
    let expected = get(&refs, "loss")?.to_vec1::<f32>()?[0];
    assert!(
        ((loss_value - expected) / expected).abs() < 1e-5,
        "loss {loss_value} vs {expected}"
    );
    let grads = loss.backward()?;
    let ref_grads = tensors(&fx.join("lora/lora_grads.safetensors"))?;
    let named = trainable.named_vars();
    assert_eq!(named.len(), ref_grads.len());
    let mut worst = 0f32;
    for nv in &named {
        let g = grads
            .get(nv.var.as_tensor())
            .ok_or_else(|| format!("no gradient for `{}`", nv.name))?;
        let r = get(&ref_grads, &nv.name)?;
        let scale = max_abs(r)?;
        let diff = max_abs(&(g - r)?)?;
        worst = worst.max(diff / scale);
        assert!(
            diff <= 1e-4 * scale,
            "`{}`: |diff| {diff} > 1e-4 x {scale}",
            nv.name
        );
    }
    eprintln!("worst gradient error relative to max |g|: {worst:.2e}");

    // Three AdamW steps on the same batch, constant lr, no clipping.
    let cfg = AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let vars: Vec<_> = named.iter().map(|v| v.var.clone()).collect();
    let mut opt = AdamW::new(vars.clone(), cfg);
    let step_losses = get(&refs, "step_losses")?.to_vec1::<f32>()?;
    for (step, &expected) in step_losses.iter().enumerate() {
        let loss = batch_loss_on(&model, &batch, Some(&features))?;
        let value = loss.to_scalar::<f32>()?;
        assert!(
            ((value - expected) / expected).abs() < 1e-5,
            "step {step}: loss {value} vs {expected}"
        );
        let store = loss.backward()?;
        let grads = vars
            .iter()
            .map(|v| store.get(v.as_tensor()).cloned().ok_or("missing gradient"))
            .collect::<Result<Vec<_>, _>>()?;
        opt.step(&grads, cfg.lr)?;
    }
    let final_loss = batch_loss_on(&model, &batch, Some(&features))?.to_scalar::<f32>()?;
    let expected_final = get(&refs, "final_loss")?.to_vec1::<f32>()?[0];
    assert!(((final_loss - expected_final) / expected_final).abs() < 1e-5);

    let trained = tensors(&fx.join("lora/adapter_trained/adapter_model.safetensors"))?;
    let mut worst = 0f32;
    for nv in &named {
        let diff = max_abs(&(nv.var.as_tensor() - get(&trained, &nv.name)?)?)?;
        worst = worst.max(diff);
        assert!(diff <= 2e-5, "`{}` after 3 steps: |diff| {diff}", nv.name);
    }
    eprintln!("worst adapter difference after 3 steps: {worst:.2e}");
    Ok(())
}

fn last_logits(
    model: &Lfm2VlModel,
    refs: &HashMap<String, Tensor>,
) -> Result<Tensor, Box<dyn std::error::Error>> {
    let ids = get(refs, "infer_input_ids")?.to_dtype(DType::U32)?;
    let features = image_features(model, &[0])?;
    let mut cache = model.new_cache(1);
    Ok(model
        .forward(&ids, Some(&features), None, &mut cache, LogitsMode::Last)?
        .flatten_all()?)
}

fn assert_logits_close(ours: &Tensor, theirs: &Tensor, what: &str) -> TestResult {
    let diff = max_abs(&(ours - theirs)?)?;
    let tol = 5e-4 + 2e-5 * max_abs(theirs)?;
    assert!(diff <= tol, "{what}: |diff| {diff} > {tol}");
    let argmax = |t: &Tensor| t.argmax(0).and_then(|a| a.to_scalar::<u32>());
    assert_eq!(argmax(ours)?, argmax(theirs)?, "{what}: argmax");
    Ok(())
}

#[test]
fn peft_adapters_load_and_reproduce_logits() -> TestResult {
    let fx = fixtures();
    let mut model = load(
        &fx.join("checkpoints/tiny-nothumb"),
        &LoadOptions::default(),
    )?;
    let refs = tensors(&fx.join("lora/lora_reference.safetensors"))?;
    assert_logits_close(
        &last_logits(&model, &refs)?,
        get(&refs, "logits_last_base")?,
        "base",
    )?;
    for (dir, key) in [
        ("adapter_init", "logits_last_init"),
        ("adapter_trained", "logits_last_trained"),
    ] {
        let adapter = PeftAdapter::load(&fx.join("lora").join(dir), &Device::Cpu)?;
        assert_eq!(adapter.rank, 4);
        assert!((adapter.lora[0].scale - 2.0).abs() < 1e-12);
        adapter.attach(&mut model)?;
        assert_logits_close(&last_logits(&model, &refs)?, get(&refs, key)?, dir)?;
    }
    // Saved and reloaded, the adapter is the same tensors under the same names.
    let trained = PeftAdapter::load(&fx.join("lora/adapter_trained"), &Device::Cpu)?;
    let tmp = tempfile::tempdir()?;
    trained.save(tmp.path())?;
    let again = tensors(&tmp.path().join("adapter_model.safetensors"))?;
    let original = tensors(&fx.join("lora/adapter_trained/adapter_model.safetensors"))?;
    assert_eq!(again.len(), original.len());
    for (name, t) in &original {
        assert_eq!(max_abs(&(t - get(&again, name)?)?)?, 0.0, "{name}");
    }
    Ok(())
}

/// Row `i` of the fixture batch alone, with its padding kept.
fn single_row(batch: &Batch, i: usize) -> AnyResult<Batch> {
    let l = batch.seq_len;
    let rows = batch.predict_rows.to_vec1::<u32>()?;
    let targets = batch.targets.to_vec1::<u32>()?;
    let (rows, targets): (Vec<u32>, Vec<u32>) = rows
        .iter()
        .zip(&targets)
        .filter(|(r, _)| **r as usize / l == i)
        .map(|(r, t)| (*r - (i * l) as u32, *t))
        .unzip();
    let n = rows.len();
    Ok(Batch {
        input_ids: batch.input_ids.narrow(0, i, 1)?,
        attention_mask: batch.attention_mask.narrow(0, i, 1)?,
        predict_rows: Tensor::from_vec(rows, n, &Device::Cpu)?,
        targets: Tensor::from_vec(targets, n, &Device::Cpu)?,
        num_targets: n,
        batch_size: 1,
        seq_len: l,
    })
}

/// Both fixture examples label 4 tokens, so the mean of the two micro-batch losses is the batch
/// loss and accumulated gradients (each scaled by 1/2) equal the batch's: this checks gradient
/// accumulation and that a padded row computes the same alone as in a batch.
#[test]
fn accumulated_micro_batches_match_the_full_batch() -> TestResult {
    let Reference {
        mut model,
        batch,
        features,
        ..
    } = reference()?;
    let init = PeftAdapter::load(&fixtures().join("lora/adapter_init"), &Device::Cpu)?;
    let trainable = init.attach(&mut model)?;
    trainable.mode().set_training(true);
    let named = trainable.named_vars();
    let full = batch_loss_on(&model, &batch, Some(&features))?;
    let full_grads = full.backward()?;
    let mut acc: Vec<Option<Tensor>> = vec![None; named.len()];
    let mut loss_sum = 0f32;
    for i in 0..2 {
        let row = single_row(&batch, i)?;
        assert_eq!(row.num_targets, 4);
        let loss = batch_loss_on(&model, &row, Some(&image_features(&model, &[i])?))?;
        loss_sum += loss.to_scalar::<f32>()?;
        let grads = (loss / 2.0)?.backward()?;
        for (slot, nv) in acc.iter_mut().zip(&named) {
            let g = grads.get(nv.var.as_tensor()).ok_or("missing gradient")?;
            *slot = Some(match slot.take() {
                Some(a) => (a + g)?,
                None => g.clone(),
            });
        }
    }
    let full_value = full.to_scalar::<f32>()?;
    assert!((loss_sum / 2.0 - full_value).abs() < 1e-5 * full_value);
    for (nv, g) in named.iter().zip(acc) {
        let g = g.ok_or("missing gradient")?;
        let r = full_grads
            .get(nv.var.as_tensor())
            .ok_or("missing gradient")?;
        let scale = max_abs(r)?;
        assert!(max_abs(&(g - r)?)? <= 1e-4 * scale, "{}", nv.name);
    }
    Ok(())
}
