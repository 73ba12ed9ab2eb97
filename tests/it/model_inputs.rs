//! Input handling of the tiny LFM2-VL: padding patches, masks, small views, the image splice and
//! half-precision loading. Skips when ../shared is absent.

use crate::support::shared_path;
use candle_core::{DType, Device, IndexOp, Tensor};
use vlmpipe::model::checkpoint::{self, LoadOptions};
use vlmpipe::model::lfm2_vl::{Lfm2VlModel, LogitsMode};

fn model(dtype: DType) -> Option<Lfm2VlModel> {
    let dir = shared_path("reference/tiny-lfm2vl")?;
    let opts = LoadOptions {
        dtype,
        device: Device::Cpu,
    };
    Some(checkpoint::load(&dir, &opts).unwrap())
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// One view of `rows x cols` real patches padded to 1024, with `fill` in the padding rows.
fn view(rows: usize, cols: usize, fill: f32) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let n = rows * cols;
    let real = Tensor::randn(0f32, 1.0, (n, 768), &dev).unwrap();
    let pad = Tensor::full(fill, (1024 - n, 768), &dev).unwrap();
    let pixels = Tensor::cat(&[&real, &pad], 0)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mask: Vec<u32> = (0..1024).map(|i| u32::from(i < n)).collect();
    let mask = Tensor::from_vec(mask, (1, 1024), &dev).unwrap();
    (pixels, mask)
}

#[test]
fn padding_patches_do_not_change_features() {
    let Some(m) = model(DType::F32) else { return };
    let (pixels, mask) = view(20, 26, 0.0);
    let clean = m.image_features(&pixels, &mask, &[(20, 26)]).unwrap();
    // Same real patches, garbage in the padding rows.
    let noisy = Tensor::cat(
        &[
            &pixels.i((.., ..520, ..)).unwrap(),
            &Tensor::full(1e3f32, (1, 504, 768), &Device::Cpu).unwrap(),
        ],
        1,
    )
    .unwrap();
    let noisy = m.image_features(&noisy, &mask, &[(20, 26)]).unwrap();
    assert_eq!(clean.dims(), &[130, 64]);
    assert_eq!(max_diff(&clean, &noisy), 0.0);
}

#[test]
fn masks_must_match_spatial_shapes() {
    let Some(m) = model(DType::F32) else { return };
    let (pixels, mask) = view(16, 16, 0.0);
    // Shape claims more real patches than the mask has.
    assert!(m.image_features(&pixels, &mask, &[(16, 18)]).is_err());
    // A hole in the real prefix.
    let mut holed = mask.to_vec2::<u32>().unwrap();
    holed[0][3] = 0;
    let holed = Tensor::new(holed, &Device::Cpu).unwrap();
    assert!(m.image_features(&pixels, &holed, &[(16, 16)]).is_err());
    // Odd patch grids cannot be unshuffled by 2.
    let (pixels, mask) = view(15, 16, 0.0);
    assert!(m.image_features(&pixels, &mask, &[(15, 16)]).is_err());
}

#[test]
fn small_and_extreme_views_use_the_antialiased_grid() {
    let Some(m) = model(DType::F32) else { return };
    // Sides under 16 patches shrink the position grid (antialiased), long sides stretch it.
    for (rows, cols) in [(8, 12), (2, 64), (64, 4)] {
        let (pixels, mask) = view(rows, cols, 0.0);
        let f = m.image_features(&pixels, &mask, &[(rows, cols)]).unwrap();
        assert_eq!(f.dims(), &[rows * cols / 4, 64]);
        let finite = f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(finite.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn image_token_count_must_match_features() {
    let Some(m) = model(DType::F32) else { return };
    let image = m.config().image_token_id;
    let ids = Tensor::new(&[[1u32, image, image, 7]], &Device::Cpu).unwrap();
    let three = Tensor::zeros((3, 64), DType::F32, &Device::Cpu).unwrap();
    let err = m.embed(&ids, Some(&three)).unwrap_err().to_string();
    assert!(err.contains("2 `<image>` tokens, 3 feature rows"), "{err}");
    assert!(m.embed(&ids, None).is_err());
    // Ids past the embedding table are an error, not a panic.
    let bad = Tensor::new(&[[1u32, 5000]], &Device::Cpu).unwrap();
    assert!(m.embed(&bad, None).is_err());
}

#[test]
fn half_precision_models_track_f32() {
    let (Some(m32), Some(refs)) = (
        model(DType::F32),
        shared_path("reference/ref_tiny_512x512.safetensors"),
    ) else {
        return;
    };
    let r = candle_core::safetensors::load(refs, &Device::Cpu).unwrap();
    let run = |m: &Lfm2VlModel| {
        let f = m
            .image_features(&r["pixel_values"], &r["pixel_attention_mask"], &[(32, 32)])
            .unwrap();
        let mut cache = m.new_cache(1);
        m.forward(
            &r["input_ids"],
            Some(&f),
            None,
            &mut cache,
            LogitsMode::Last,
        )
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
    };
    let reference = run(&m32);
    let scale = reference
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let Some(m) = model(dtype) else { return };
        assert_eq!(m.dtype(), dtype);
        let diff = max_diff(&run(&m), &reference);
        assert!(
            diff < 0.05 * scale,
            "{dtype:?}: logits differ by {diff} (max {scale})"
        );
    }
}
