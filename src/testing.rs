//! Helpers shared by unit and integration tests: locating the `../shared` data folder.

use std::path::PathBuf;

/// The `shared/` folder beside the checkout (or `VLMPIPE_SHARED`), if present.
///
/// Tests that need real photos, the real tokenizer or the transformers references call this and
/// skip with a message when it returns `None`, so the suite still passes on a bare clone.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("VLMPIPE_SHARED") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    };
    dir.is_dir().then_some(dir)
}

/// Like [`shared_dir`] joined with `rel`, printing why the calling test is skipped when absent.
pub fn shared_path(rel: &str) -> Option<PathBuf> {
    let Some(dir) = shared_dir() else {
        eprintln!("skipping: ../shared not found (set VLMPIPE_SHARED to the shared data folder)");
        return None;
    };
    let path = dir.join(rel);
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "skipping: {} not found (set VLMPIPE_SHARED to the shared data folder)",
            path.display()
        );
        None
    }
}

/// The device model tests run on: `VLMPIPE_TEST_DEVICE` (any `--device` spelling), the CPU when
/// unset. A GPU machine runs the parity suite with, e.g.,
/// `VLMPIPE_TEST_DEVICE=cuda cargo test --features cuda --test it reference_model`.
///
/// Panics with the reason when the variable names a device this build or machine cannot open:
/// a test asked to run on a GPU must not quietly pass on the CPU.
pub fn test_device() -> candle_core::Device {
    let Some(choice) = std::env::var("VLMPIPE_TEST_DEVICE")
        .ok()
        .filter(|s| !s.trim().is_empty())
    else {
        return candle_core::Device::Cpu;
    };
    let resolved = choice
        .parse::<crate::model::DeviceChoice>()
        .map_err(|e| e.to_string())
        .and_then(|c| c.resolve().map_err(|e| e.to_string()));
    match resolved {
        Ok(device) => device,
        Err(e) => panic!("VLMPIPE_TEST_DEVICE={choice}: {e}"),
    }
}

/// The largest absolute difference between two tensors of the same shape, as f32; panics on a
/// shape mismatch or a failed op (a test helper).
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let diff = (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.to_dtype(candle_core::DType::F32))
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>());
    diff.unwrap_or_else(|e| panic!("max_abs_diff: {e}"))
}
