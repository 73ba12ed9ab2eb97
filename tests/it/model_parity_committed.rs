//! Model parity with transformers 5.24 on the 15 committed model cases
//! (`tests/fixtures/reference/model/<case>.safetensors`, see `tests/reference/README.md`).
//!
//! Each case feeds transformers' exact vision input (rebuilt from the stored views) to our
//! LFM2-VL and compares every stage with the README's f32 tolerances: vision embeddings and
//! output, the unshuffled projector input and image features (5e-5), the spliced embeddings
//! (token rows exact, image rows 5e-5), every decoder layer's output (2e-4) and the logits
//! (5e-4 + 2e-5 max|logit|) at the stored positions, then the cached greedy loop (step logits,
//! or the top-32 values for the 65536 vocabulary, and exact tokens) and `generate`'s ids.
//! Later stages run on our own earlier outputs, as a real forward does. One test per case;
//! each reports every mismatch of its case. tiny-realtok cases skip without `../shared`.
//! Every case runs three times where the CPU has AVX-512F: dense weights, and weights packed for
//! the portable and the AVX-512 kernel (as inference runs them).

use crate::reference_support;

use crate::support::test_device;
use candle_core::{DType, Device, IndexOp, Tensor};
use reference_support::{
    Checks, ModelFixture, TestResult, VisionInputs, checkpoint_dir, logits_tol,
    pixel_values_from_views,
};
use vlmpipe::model::checkpoint::{self, LoadOptions};
use vlmpipe::model::generate::{FinishReason, GenerateConfig, Prompt, generate};
use vlmpipe::model::lfm2_vl::{Lfm2VlModel, LogitsMode};
use vlmpipe::model::packed::Kernel;

const VISION_TOL: f32 = 5e-5;
const HIDDEN_TOL: f32 = 2e-4;
/// Greedy steps the fixtures hold.
const GREEDY_STEPS: usize = 8;

/// Each case runs with the weights as loaded and packed for every CPU kernel this machine has
/// (inference packs them; see `vlmpipe::model::packed`).
fn check_model_case(case: &str) {
    for form in weight_forms() {
        let mut checks = Checks::new(format!("{case}, {}", form_name(form)));
        if let Err(e) = model_case(case, form, &mut checks) {
            checks.fail(format!("could not run: {e}"));
        }
        checks.finish();
    }
}

/// `None`: dense weights; `Some(kernel)`: packed for `kernel`.
fn weight_forms() -> Vec<Option<Kernel>> {
    let mut forms = vec![None, Some(Kernel::Portable)];
    for kernel in [Kernel::Avx2, Kernel::Avx512] {
        if kernel.available() {
            forms.push(Some(kernel));
        }
    }
    forms
}

fn form_name(form: Option<Kernel>) -> String {
    form.map_or("dense weights".into(), |k| {
        format!("weights packed for {k:?}")
    })
}

/// The checkpoint at `dir`, with its weights in `form`.
fn load_model(dir: &std::path::Path, form: Option<Kernel>) -> TestResult<Lfm2VlModel> {
    let mut model = checkpoint::load(dir, &test_load_options())?;
    if let Some(kernel) = form {
        let packed = model.pack_linears_for_cpu(kernel)?;
        // On a GPU nothing is packed; on the CPU every projection is.
        assert!(
            packed > 0 || !model.device().is_cpu(),
            "no projection was packed"
        );
    }
    Ok(model)
}

fn model_case(case: &str, form: Option<Kernel>, checks: &mut Checks) -> TestResult<()> {
    let fx = ModelFixture::load(case)?;
    let Some(ckpt) = checkpoint_dir(fx.str("checkpoint")?)? else {
        return Ok(());
    };
    let model = load_model(&ckpt.path, form)?;

    // transformers' vision input, bit for bit.
    let max_patches = fx.tensor("pixel_attention_mask")?.dim(1)?;
    let VisionInputs {
        pixel_values,
        pixel_attention_mask: mask,
        spatial_shapes: shapes,
    } = pixel_values_from_views(&fx.views()?, model.config().vision.patch_size, max_patches)?;
    let pixel_values = pixel_values.to_device(model.device())?;
    checks.eq("spatial_shapes", &shapes, &fx.spatial_shapes()?);
    checks.eq(
        "pixel_attention_mask",
        &mask
            .flatten_all()?
            .to_vec1::<u8>()?
            .into_iter()
            .map(u32::from)
            .collect::<Vec<_>>(),
        &fx.u32s("pixel_attention_mask")?,
    );

    let mask_on_device = mask.to_device(model.device())?;
    let Some(features) = image_path(&model, &fx, checks, &pixel_values, &mask_on_device, &shapes)?
    else {
        return Ok(());
    };
    language_model(&model, &fx, checks, &features)?;
    generation(&model, &fx, checks, &features)?;
    Ok(())
}

/// Vision tower and projector; returns our image features for the later stages.
fn image_path(
    model: &Lfm2VlModel,
    fx: &ModelFixture,
    checks: &mut Checks,
    pixel_values: &Tensor,
    mask: &Tensor,
    shapes: &[(usize, usize)],
) -> TestResult<Option<Tensor>> {
    let Some(inter) = checks.step(
        "image_intermediates",
        model.image_intermediates(pixel_values, mask, shapes),
    ) else {
        return Ok(None);
    };
    // Single-view cases store the embeddings and the unshuffled projector input too.
    if fx.has("vision_embeddings_valid") {
        checks.close(
            "vision_embeddings",
            &inter.vision_embeddings,
            fx.tensor("vision_embeddings_valid")?,
            VISION_TOL,
        );
    }
    checks.close(
        "vision_last_hidden_state",
        &inter.vision_last_hidden_state,
        fx.tensor("vision_last_hidden_state_valid")?,
        VISION_TOL,
    );
    if fx.has("projector_unshuffled") {
        checks.close(
            "projector_unshuffled",
            &inter.projector_unshuffled,
            fx.tensor("projector_unshuffled")?,
            VISION_TOL,
        );
    }
    checks.close(
        "image_features",
        &inter.image_features,
        fx.tensor("image_features")?,
        VISION_TOL,
    );
    Ok(Some(inter.image_features))
}

/// `[1, L]` u32 prompt ids, on the CPU.
fn input_ids(fx: &ModelFixture) -> TestResult<Tensor> {
    Ok(fx.tensor("input_ids")?.to_dtype(DType::U32)?)
}

/// The checkpoint on the device the tests run on (`VLMPIPE_TEST_DEVICE`, the CPU by default).
fn test_load_options() -> LoadOptions {
    LoadOptions {
        device: test_device(),
        ..LoadOptions::default()
    }
}

/// Splice, decoder layers and full-prompt logits at the stored positions.
fn language_model(
    model: &Lfm2VlModel,
    fx: &ModelFixture,
    checks: &mut Checks,
    features: &Tensor,
) -> TestResult<()> {
    let ids = input_ids(fx)?.to_device(model.device())?;
    let Some(embeds) = checks.step("embed", model.embed(&ids, Some(features))) else {
        return Ok(());
    };
    let positions = fx.u32s("positions")?;
    let pos = Tensor::new(positions.as_slice(), model.device())?;
    let at = |t: &Tensor| -> candle_core::Result<Tensor> { t.squeeze(0)?.index_select(&pos, 0) };

    // Token rows are table lookups (exact); image rows carry the projector's rounding.
    let prompt = ids.squeeze(0)?.to_vec1::<u32>()?;
    let image_token = model.config().image_token_id;
    let ours = at(&embeds)?.to_device(&Device::Cpu)?;
    let theirs = fx.tensor("lm_inputs_embeds")?;
    for (kind, is_image, tol) in [("token", false, 0.0), ("image", true, VISION_TOL)] {
        let rows: Vec<u32> = (0..positions.len() as u32)
            .filter(|&r| (prompt[positions[r as usize] as usize] == image_token) == is_image)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let rows = Tensor::new(rows.as_slice(), &Device::Cpu)?;
        checks.close(
            &format!("lm_inputs_embeds ({kind} rows)"),
            &ours.index_select(&rows, 0)?,
            &theirs.index_select(&rows, 0)?,
            tol,
        );
    }

    let mut cache = model.new_cache(1);
    let mut hidden = Vec::new();
    let Some(normed) = checks.step(
        "decoder forward",
        model
            .text()
            .forward(&embeds, None, &mut cache, Some(&mut hidden)),
    ) else {
        return Ok(());
    };
    let ref_hidden = fx.tensor("lm_hidden_states")?;
    checks.eq(
        "number of hidden states (input + layers)",
        &hidden.len(),
        &ref_hidden.dim(0)?,
    );
    for (i, h) in hidden.iter().enumerate().take(ref_hidden.dim(0)?) {
        checks.close(
            &format!("lm_hidden_states[{i}]"),
            &at(h)?,
            &ref_hidden.i(i)?,
            HIDDEN_TOL,
        );
    }
    // The LM head only at the stored positions: [R, vocab].
    let logits = model.logits(&at(&normed)?.unsqueeze(0)?, LogitsMode::All)?;
    let ref_logits = fx.tensor("logits")?;
    checks.close(
        "logits",
        &logits.squeeze(0)?,
        ref_logits,
        logits_tol(ref_logits)?,
    );
    Ok(())
}

/// The cached greedy loop, teacher-forced with the reference tokens so that every step's
/// logits stay comparable even after a divergence, then `generate`.
fn generation(
    model: &Lfm2VlModel,
    fx: &ModelFixture,
    checks: &mut Checks,
    features: &Tensor,
) -> TestResult<()> {
    let ids = input_ids(fx)?.to_device(model.device())?;
    let ref_tokens = fx.u32s("greedy_tokens")?;
    let mut cache = model.new_cache(1);
    let mut logits = model.forward(&ids, Some(features), None, &mut cache, LogitsMode::Last)?;
    let mut ours = Vec::with_capacity(ref_tokens.len());
    for (step, &reference) in ref_tokens.iter().enumerate() {
        let row = logits.squeeze(0)?;
        compare_step_logits(fx, checks, step, &row)?;
        ours.push(row.argmax(0)?.to_scalar::<u32>()?);
        let next = Tensor::new(&[[reference]], model.device())?;
        logits = model.forward(&next, None, None, &mut cache, LogitsMode::Last)?;
    }
    checks.eq("greedy tokens", &ours, &ref_tokens);

    // generate(): greedy, stopping at the configured EOS like transformers' generate.
    let prompt = ids.squeeze(0)?.to_vec1::<u32>()?;
    let expected = fx.u32s("generate_ids")?;
    // EOS cases name one of their greedy tokens as EOS (random weights never pick the real one).
    let eos_ids = match fx.harness["generate_eos_token_id"].as_u64() {
        Some(id) => vec![u32::try_from(id)?],
        None => model.config().text.eos_token_ids.clone(),
    };
    let cfg = GenerateConfig {
        max_new_tokens: GREEDY_STEPS,
        ..GenerateConfig::greedy(eos_ids)
    };
    let prompts = [Prompt {
        input_ids: &prompt,
        image_features: Some(features),
        seed: None,
    }];
    if let Some(out) = checks.step("generate", generate(model, &prompts, &cfg, None)) {
        let generated = out.sequences.first().map(|s| s.tokens.clone());
        checks.eq(
            "generate ids",
            &generated,
            &Some(expected.get(prompt.len()..).unwrap_or_default().to_vec()),
        );
        let stopped = out.sequences.first().map(|s| s.finish == FinishReason::Eos);
        checks.eq(
            "generate stopped at EOS",
            &stopped,
            &fx.harness["generate_stopped_at_eos"].as_bool(),
        );
    }
    Ok(())
}

/// Step logits: the whole row for the 1024 vocabulary, the top 32 for the 65536 one.
fn compare_step_logits(
    fx: &ModelFixture,
    checks: &mut Checks,
    step: usize,
    row: &Tensor,
) -> TestResult<()> {
    if fx.has("greedy_step_logits") {
        let reference = fx.tensor("greedy_step_logits")?.i(step)?;
        checks.close(
            &format!("greedy_step_logits[{step}]"),
            row,
            &reference,
            logits_tol(&reference)?,
        );
    } else {
        let values = fx.tensor("greedy_step_topk_values")?.i(step)?;
        let indices = fx
            .tensor("greedy_step_topk_indices")?
            .i(step)?
            .to_dtype(DType::U32)?;
        // The tolerance scales with the largest logit of the prompt, which the top 32 of a
        // step may not include (a large negative one).
        let max_logit = fx.harness["max_abs_logit"].as_f64().unwrap_or(0.0) as f32;
        let tol = logits_tol(&values)?.max(5e-4 + 2e-5 * max_logit);
        checks.close(
            &format!("greedy_step_topk_values[{step}]"),
            &row.index_select(&indices.to_device(row.device())?, 0)?,
            &values,
            tol,
        );
    }
    Ok(())
}

macro_rules! model_cases {
    ($($name:ident),* $(,)?) => {
        $( #[test] fn $name() { check_model_case(stringify!($name)); } )*
    };
}

model_cases!(
    thumb_tiny_40x30,
    thumb_photo_512x384,
    thumb_wide_1500x500,
    thumb_strip_2000x60,
    thumb_gray_300x200,
    thumb_system_333x251,
    nothumb_tall_800x1400,
    nothumb_photo_512x384,
    nothumb_tiny_40x30,
    nothumb_alpha_200x150,
    realtok_system_512x384,
    realtok_wide_1500x500,
    thumb_eos_512x384,
    variant_photo_512x384,
    variant_wide_1500x500,
);

/// The README's batching fact: transformers 5.24 reproduces the single-prompt results for a
/// left-padded batch of `thumb_tiny_40x30` (89 tokens) and `thumb_system_333x251` (163), so
/// each row of ours must match its single-case fixture: last-position logits and `generate`.
#[test]
fn left_padded_batch_matches_single_cases() {
    for form in weight_forms() {
        let mut checks = Checks::new(format!(
            "batch of thumb_tiny_40x30 + thumb_system_333x251, {}",
            form_name(form)
        ));
        if let Err(e) = batch(form, &mut checks) {
            checks.fail(format!("could not run: {e}"));
        }
        checks.finish();
    }
}

fn batch(form: Option<Kernel>, checks: &mut Checks) -> TestResult<()> {
    let cases = ["thumb_tiny_40x30", "thumb_system_333x251"];
    let fixtures: Vec<ModelFixture> = cases
        .iter()
        .map(|c| ModelFixture::load(c))
        .collect::<TestResult<_>>()?;
    let Some(ckpt) = checkpoint_dir("tiny-thumb")? else {
        return Ok(());
    };
    let model = load_model(&ckpt.path, form)?;
    let mut prompts = Vec::new();
    let mut features = Vec::new();
    for fx in &fixtures {
        let max_patches = fx.tensor("pixel_attention_mask")?.dim(1)?;
        let inputs =
            pixel_values_from_views(&fx.views()?, model.config().vision.patch_size, max_patches)?;
        features.push(model.image_features(
            &inputs.pixel_values.to_device(model.device())?,
            &inputs.pixel_attention_mask.to_device(model.device())?,
            &inputs.spatial_shapes,
        )?);
        prompts.push(input_ids(fx)?.squeeze(0)?.to_vec1::<u32>()?);
    }

    // One left-padded forward: row-major image features, mask 0 on the pads.
    let pad = model.config().text.pad_token_id.unwrap_or(0);
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for p in &prompts {
        ids.extend(std::iter::repeat_n(pad, len - p.len()).chain(p.iter().copied()));
        mask.extend(
            std::iter::repeat_n(0u32, len - p.len()).chain(std::iter::repeat_n(1, p.len())),
        );
    }
    let ids = Tensor::from_vec(ids, (prompts.len(), len), model.device())?;
    let mask = Tensor::from_vec(mask, (prompts.len(), len), model.device())?;
    let all_features = Tensor::cat(&features, 0)?;
    let mut cache = model.new_cache(prompts.len());
    let last = model.forward(
        &ids,
        Some(&all_features),
        Some(&mask),
        &mut cache,
        LogitsMode::Last,
    )?;
    for (row, (fx, case)) in fixtures.iter().zip(cases).enumerate() {
        // The fixture's last stored position is L-1.
        let reference = fx.tensor("logits")?;
        let reference = reference.i(reference.dim(0)? - 1)?;
        checks.close(
            &format!("{case}: last-position logits in the batch"),
            &last.i(row)?,
            &reference,
            logits_tol(&reference)?,
        );
    }

    let eos = model.config().text.eos_token_ids.clone();
    let cfg = GenerateConfig {
        max_new_tokens: GREEDY_STEPS,
        ..GenerateConfig::greedy(eos)
    };
    let batch: Vec<Prompt<'_>> = prompts
        .iter()
        .zip(&features)
        .map(|(p, f)| Prompt {
            input_ids: p,
            image_features: Some(f),
            seed: None,
        })
        .collect();
    if let Some(out) = checks.step("batched generate", generate(&model, &batch, &cfg, None)) {
        for ((fx, case), (seq, prompt)) in fixtures
            .iter()
            .zip(cases)
            .zip(out.sequences.iter().zip(&prompts))
        {
            let expected = fx.u32s("generate_ids")?;
            checks.eq(
                &format!("{case}: batched generate ids"),
                &seq.tokens.as_slice(),
                &expected.get(prompt.len()..).unwrap_or_default(),
            );
        }
    }
    Ok(())
}
