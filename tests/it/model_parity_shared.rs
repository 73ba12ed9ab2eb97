//! Parity of our LFM2-VL with transformers on the tiny reference checkpoint.
//!
//! `../shared/reference/ref_tiny_<size>.safetensors` hold transformers' inputs and every
//! intermediate for one prompt with one image (see that folder's README for the tolerances).
//! Each test feeds the reference inputs and compares one stage; all skip when ../shared is absent.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::support::{max_abs_diff, shared_path, test_device};
use candle_core::{DType, IndexOp, Tensor};
use vlmpipe::model::checkpoint::{self, LoadOptions};
use vlmpipe::model::generate::{GenerateConfig, Prompt, generate};
use vlmpipe::model::lfm2_vl::{Lfm2VlModel, LogitsMode};
use vlmpipe::model::vision;

type Refs = HashMap<String, Tensor>;

const VISION_TOL: f32 = 5e-5;
const HIDDEN_TOL: f32 = 2e-4;

fn tiny_model() -> Option<Lfm2VlModel> {
    let dir = shared_path("reference/tiny-lfm2vl")?;
    let options = LoadOptions {
        device: test_device(),
        ..LoadOptions::default()
    };
    Some(checkpoint::load(&dir, &options).expect("tiny checkpoint loads"))
}

fn refs(size: &str) -> Option<Refs> {
    let path: PathBuf = shared_path(&format!("reference/ref_tiny_{size}.safetensors"))?;
    // On the model's device, so inputs feed it directly and comparisons run there.
    Some(candle_core::safetensors::load(&path, &test_device()).expect("reference file loads"))
}

fn get<'a>(r: &'a Refs, name: &str) -> &'a Tensor {
    r.get(name)
        .unwrap_or_else(|| panic!("reference tensor `{name}` missing"))
}

fn shapes(r: &Refs) -> Vec<(usize, usize)> {
    get(r, "spatial_shapes")
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap()
        .into_iter()
        .map(|v| (v[0] as usize, v[1] as usize))
        .collect()
}

/// A reference tensor of token ids (`[n]` or `[1, n]`) as a list.
fn token_ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Our image features for the reference's pixels.
fn image_features(model: &Lfm2VlModel, r: &Refs) -> Tensor {
    model
        .image_features(
            get(r, "pixel_values"),
            get(r, "pixel_attention_mask"),
            &shapes(r),
        )
        .unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_close(name: &str, ours: &Tensor, theirs: &Tensor, tol: f32) {
    let diff = max_abs_diff(ours, theirs);
    eprintln!("{name}: max |diff| = {diff:.3e} (tolerance {tol:.1e})");
    assert!(diff <= tol, "{name}: max |diff| {diff} > {tol}");
}

fn logits_tol(reference: &Tensor) -> f32 {
    5e-4 + 2e-5 * max_abs(reference)
}

/// Vision embeddings, vision output, unshuffled features and image features.
fn check_image_path(size: &str) {
    let (Some(model), Some(r)) = (tiny_model(), refs(size)) else {
        return;
    };
    let mask = get(&r, "pixel_attention_mask");
    let shapes = shapes(&r);
    let inter = model
        .image_intermediates(get(&r, "pixel_values"), mask, &shapes)
        .unwrap();
    // The reference keeps padded rows; compare the mask==1 rows, packed like ours.
    let (ref_emb, _) = vision::pack_views(get(&r, "vision_embeddings"), mask, &shapes).unwrap();
    assert_close(
        "vision_embeddings",
        &inter.vision_embeddings,
        &ref_emb,
        VISION_TOL,
    );
    let (ref_last, _) =
        vision::pack_views(get(&r, "vision_last_hidden_state"), mask, &shapes).unwrap();
    assert_close(
        "vision_last_hidden_state",
        &inter.vision_last_hidden_state,
        &ref_last,
        VISION_TOL,
    );
    assert_close(
        "projector_unshuffled",
        &inter.projector_unshuffled,
        get(&r, "projector_unshuffled"),
        VISION_TOL,
    );
    assert_close(
        "image_features",
        &inter.image_features,
        get(&r, "image_features"),
        VISION_TOL,
    );
}

/// Spliced embeddings, every decoder layer's output and the full-prompt logits.
fn check_language_model(size: &str) {
    let (Some(model), Some(r)) = (tiny_model(), refs(size)) else {
        return;
    };
    let features = image_features(&model, &r);
    let ids = get(&r, "input_ids");
    let embeds = model.embed(ids, Some(&features)).unwrap();
    assert_close(
        "lm_inputs_embeds",
        &embeds,
        get(&r, "lm_inputs_embeds"),
        VISION_TOL,
    );
    let mut cache = model.new_cache(1);
    let mut hidden = Vec::new();
    let normed = model
        .text()
        .forward(&embeds, None, &mut cache, Some(&mut hidden))
        .unwrap();
    let ref_hidden = get(&r, "lm_hidden_states");
    assert_eq!(hidden.len(), ref_hidden.dim(0).unwrap());
    // transformers reports the last layer's output after `embedding_norm`.
    if let Some(last) = hidden.last_mut() {
        *last = normed.clone();
    }
    for (i, h) in hidden.iter().enumerate() {
        assert_close(
            &format!("lm_hidden_states[{i}]"),
            &h.squeeze(0).unwrap(),
            &ref_hidden.i(i).unwrap(),
            HIDDEN_TOL,
        );
    }
    let logits = model.logits(&normed, LogitsMode::All).unwrap();
    let ref_logits = get(&r, "logits");
    assert_close("logits", &logits, ref_logits, logits_tol(ref_logits));
    // Last-position logits are the same numbers.
    let last = model.logits(&normed, LogitsMode::Last).unwrap();
    let l = ref_logits.dim(1).unwrap();
    assert_close(
        "last logits",
        &last,
        &ref_logits.i((.., l - 1, ..)).unwrap(),
        logits_tol(ref_logits),
    );
}

/// The greedy loop with the KV and conv caches: exact tokens, close step logits, and generate().
fn check_greedy(size: &str) {
    let (Some(model), Some(r)) = (tiny_model(), refs(size)) else {
        return;
    };
    let features = image_features(&model, &r);
    let ids = get(&r, "input_ids");
    let ref_tokens = token_ids(get(&r, "greedy_tokens"));
    let ref_step_logits = get(&r, "greedy_step_logits");

    // Manual loop: prefill, then one token at a time through the caches.
    let mut cache = model.new_cache(1);
    let mut logits = model
        .forward(ids, Some(&features), None, &mut cache, LogitsMode::Last)
        .unwrap();
    let mut tokens = Vec::new();
    for step in 0..ref_tokens.len() {
        let row = logits.squeeze(0).unwrap();
        let reference = ref_step_logits.i(step).unwrap();
        assert_close(
            &format!("greedy_step_logits[{step}]"),
            &row,
            &reference,
            logits_tol(&reference),
        );
        let next = row.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        tokens.push(next);
        let input = Tensor::new(&[[next]], model.device()).unwrap();
        logits = model
            .forward(&input, None, None, &mut cache, LogitsMode::Last)
            .unwrap();
    }
    assert_eq!(tokens, ref_tokens, "greedy tokens");

    // generate() with greedy decoding gives transformers' generate_ids.
    let prompt = token_ids(ids);
    let expected = token_ids(get(&r, "generate_ids"));
    let cfg = GenerateConfig {
        max_new_tokens: expected.len() - prompt.len(),
        ..GenerateConfig::greedy(model.config().text.eos_token_ids.clone())
    };
    let out = generate(
        &model,
        &[Prompt {
            input_ids: &prompt,
            image_features: Some(&features),
            seed: None,
        }],
        &cfg,
        None,
    )
    .unwrap();
    assert_eq!(out.sequences[0].tokens, expected[prompt.len()..].to_vec());
}

#[test]
fn image_path_512x512() {
    check_image_path("512x512");
}

#[test]
fn image_path_1024x768_tiled() {
    check_image_path("1024x768");
}

#[test]
fn language_model_512x512() {
    check_language_model("512x512");
}

#[test]
fn language_model_1024x768_tiled() {
    check_language_model("1024x768");
}

#[test]
fn greedy_512x512() {
    check_greedy("512x512");
}

#[test]
fn greedy_1024x768_tiled() {
    check_greedy("1024x768");
}
