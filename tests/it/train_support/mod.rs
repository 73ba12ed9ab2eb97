//! Shared by the training tests: a synthetic shape-and-colour image task and a tiny random model
//! with the tiny-nothumb fixture's processor (synthetic tokenizer, chat template).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use vlmpipe::model::chat::Conversation;
use vlmpipe::model::config::Config;
use vlmpipe::model::lfm2_vl::{Lfm2VlModel, WeightPrefixes};
use vlmpipe::model::processor::Processor;
use vlmpipe::train::batch::{Example, end_of_turn_id};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;
pub type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

pub const QUESTION: &str = "Which shape is in the picture?";
pub const COLOURS: [(&str, [u8; 3]); 2] = [("red", [220, 40, 30]), ("blue", [30, 60, 220])];
pub const SHAPES: [&str; 3] = ["disc", "ring", "bar"];

pub fn checkpoint_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference/checkpoints/tiny-nothumb")
}

pub fn processor() -> AnyResult<Processor> {
    Ok(Processor::from_model_dir(&checkpoint_dir())?)
}

/// The tiny-nothumb shapes with seeded random weights, none of the fixture's values.
///
/// The init is scaled like the reference generator's (`scaled_init`): linear and conv weights
/// N(0, 1/fan_in), embeddings N(0, 0.5^2), norms one, biases zero. `random_model`'s uniform
/// std 0.02 would tie the LM head to a near-zero embedding table, capping every logit near 1,
/// so no frozen-head fine-tune could drive the loss down.
pub fn tiny_model(seed: u64) -> AnyResult<Lfm2VlModel> {
    let dir = checkpoint_dir();
    let cfg = Config::from_json(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let bytes = std::fs::read(dir.join("model.safetensors"))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    let mut names: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    names.sort();
    for name in names {
        let shape = file.tensor(&name)?.shape().to_vec();
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.contains("norm") {
            vec![1.0; n]
        } else {
            let std = if shape.len() < 2 || name.contains("embed") {
                0.5
            } else {
                1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt()
            };
            (0..n).map(|_| std * normal(&mut rng)).collect()
        };
        tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    Ok(Lfm2VlModel::new(&cfg, vb, &WeightPrefixes::default())?)
}

/// A standard normal sample (Box-Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// A 64x64 image: a disc, ring or horizontal bar of one colour, jittered in place and size, on a
/// noisy grey background.
pub fn render(rng: &mut StdRng, colour: [u8; 3], shape: &str) -> RgbImage {
    let size = 64u32;
    let mut img = RgbImage::new(size, size);
    for p in img.pixels_mut() {
        let g = 150 + rng.random_range(0..40u8);
        *p = Rgb([g, g, g]);
    }
    let cx = 32.0 + rng.random_range(-6.0f32..6.0);
    let cy = 32.0 + rng.random_range(-6.0f32..6.0);
    let r = rng.random_range(15.0f32..21.0);
    for y in 0..size {
        for x in 0..size {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let d2 = dx * dx + dy * dy;
            let inside = match shape {
                "disc" => d2 <= r * r,
                "ring" => d2 <= r * r && d2 >= (r - 6.0) * (r - 6.0),
                _ => dx.abs() <= r * 1.2 && dy.abs() <= r * 0.35,
            };
            if inside {
                let mut jitter = |c: u8| c.saturating_add(rng.random_range(0..20u8));
                img.put_pixel(
                    x,
                    y,
                    Rgb([jitter(colour[0]), jitter(colour[1]), jitter(colour[2])]),
                );
            }
        }
    }
    img
}

/// `n` labelled images, classes balanced, from `seed`.
pub fn dataset(n: usize, seed: u64) -> Vec<(RgbImage, String)> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let class = i % (COLOURS.len() * SHAPES.len());
            let (name, rgb) = COLOURS[class / SHAPES.len()];
            let shape = SHAPES[class % SHAPES.len()];
            (render(&mut rng, rgb, shape), format!("{name} {shape}"))
        })
        .collect()
}

pub fn conversation() -> Conversation {
    Conversation::image_question(None, QUESTION)
}

pub fn examples(processor: &Processor, data: &[(RgbImage, String)]) -> AnyResult<Vec<Example>> {
    let eot = end_of_turn_id(processor);
    data.iter()
        .map(|(img, label)| {
            Ok(Example::prepare(
                processor,
                &conversation(),
                std::slice::from_ref(img),
                label,
                eot,
            )?)
        })
        .collect()
}
