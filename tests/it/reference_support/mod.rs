//! Shared helpers of the `reference_*` tests: reading the committed transformers fixtures
//! (`tests/fixtures/reference/`, see `tests/reference/README.md`), assembling the tiny
//! checkpoints, rebuilding the reference `pixel_values` from the stored views, and a collector
//! that records every mismatch of a case before failing, so one run shows all of them.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::collections::HashMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};

use crate::support::shared_path;
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde_json::Value;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestResult<T = ()> = Result<T, BoxError>;

/// `tests/fixtures/reference/`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference")
}

/// A view PNG (path relative to the fixtures folder) as 8-bit RGB.
pub fn read_view(rel: &str) -> TestResult<RgbImage> {
    let path = fixtures().join(rel);
    Ok(image::open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .to_rgb8())
}

/// A file's bytes, naming the file on failure.
pub fn read(path: &Path) -> TestResult<Vec<u8>> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// One `model/<case>.safetensors`: its tensors (on the CPU, dtypes as stored) and `harness`.
pub struct ModelFixture {
    pub tensors: HashMap<String, Tensor>,
    pub harness: Value,
}

impl ModelFixture {
    pub fn load(case: &str) -> TestResult<Self> {
        let path = fixtures().join(format!("model/{case}.safetensors"));
        let bytes = read(&path)?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
        let harness = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("harness"))
            .ok_or_else(|| format!("{}: no `harness` metadata", path.display()))?;
        let harness: Value = serde_json::from_str(harness)?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        Ok(Self { tensors, harness })
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn tensor(&self, name: &str) -> TestResult<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| format!("reference tensor `{name}` missing").into())
    }

    /// An integer tensor flattened to u32 (ids, masks, shapes, positions).
    pub fn u32s(&self, name: &str) -> TestResult<Vec<u32>> {
        Ok(self
            .tensor(name)?
            .flatten_all()?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|v| u32::try_from(v).map_err(|_| format!("`{name}` holds {v}")))
            .collect::<Result<_, _>>()?)
    }

    /// `spatial_shapes` as (rows, cols) pairs.
    pub fn spatial_shapes(&self) -> TestResult<Vec<(usize, usize)>> {
        Ok(self
            .u32s("spatial_shapes")?
            .chunks_exact(2)
            .map(|rc| (rc[0] as usize, rc[1] as usize))
            .collect())
    }

    pub fn str(&self, key: &str) -> TestResult<&str> {
        self.harness[key]
            .as_str()
            .ok_or_else(|| format!("harness `{key}` is not a string").into())
    }

    pub fn usize(&self, key: &str) -> TestResult<usize> {
        json_usize(&self.harness[key])
            .ok_or_else(|| format!("harness `{key}` is not a count").into())
    }

    /// The `views` of the harness, loaded.
    pub fn views(&self) -> TestResult<Vec<RgbImage>> {
        json_strings(&self.harness["views"])?
            .iter()
            .map(|v| read_view(v))
            .collect()
    }
}

pub fn json_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}

pub fn json_strings(v: &Value) -> TestResult<Vec<String>> {
    v.as_array()
        .ok_or("expected a list of strings")?
        .iter()
        .map(|s| {
            s.as_str()
                .map(str::to_owned)
                .ok_or_else(|| "expected a string".into())
        })
        .collect()
}

/// transformers' padded vision inputs.
pub struct VisionInputs {
    /// f32 `[V, max_patches, p*p*3]`.
    pub pixel_values: Tensor,
    /// u8 `[V, max_patches]`, 1 = real patch.
    pub pixel_attention_mask: Tensor,
    /// (patch rows, patch cols) per view.
    pub spatial_shapes: Vec<(usize, usize)>,
}

/// The reference processor's padded inputs rebuilt from its views, with the README's formula
/// (`(u8 - 127.5) / 127.5` in f32, patches row-major, within a patch y, x, channel; padding zero).
pub fn pixel_values_from_views(
    views: &[RgbImage],
    patch: usize,
    max_patches: usize,
) -> TestResult<VisionInputs> {
    let dim = patch * patch * 3;
    let mut values = vec![0f32; views.len() * max_patches * dim];
    let mut mask = vec![0u8; views.len() * max_patches];
    let mut shapes = Vec::with_capacity(views.len());
    for (v, view) in views.iter().enumerate() {
        let (rows, cols) = (
            view.height() as usize / patch,
            view.width() as usize / patch,
        );
        if rows * cols > max_patches {
            return Err(format!("view {v} has {} patches > {max_patches}", rows * cols).into());
        }
        shapes.push((rows, cols));
        for pr in 0..rows {
            for pc in 0..cols {
                let p = pr * cols + pc;
                mask[v * max_patches + p] = 1;
                let base = (v * max_patches + p) * dim;
                for y in 0..patch {
                    for x in 0..patch {
                        let px = view.get_pixel((pc * patch + x) as u32, (pr * patch + y) as u32);
                        for c in 0..3 {
                            values[base + (y * patch + x) * 3 + c] =
                                (f32::from(px.0[c]) - 127.5) / 127.5;
                        }
                    }
                }
            }
        }
    }
    let n = views.len();
    Ok(VisionInputs {
        pixel_values: Tensor::from_vec(values, (n, max_patches, dim), &Device::Cpu)?,
        pixel_attention_mask: Tensor::from_vec(mask, (n, max_patches), &Device::Cpu)?,
        spatial_shapes: shapes,
    })
}

/// The checkpoint files the real tokenizer case takes from `../shared/models/LFM2-VL-450M/`.
const REALTOK_SHARED_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
];
/// ... and those it takes from `checkpoints/tiny-realtok/`.
const REALTOK_OWN_FILES: [&str; 3] = ["config.json", "generation_config.json", "model.safetensors"];

/// A usable checkpoint directory (kept alive by the optional temp dir).
pub struct CheckpointDir {
    pub path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

/// `checkpoints/<name>`; tiny-realtok is assembled in a temp dir with the real tokenizer files,
/// and is `None` (with a skip message) when `../shared` is absent.
pub fn checkpoint_dir(name: &str) -> TestResult<Option<CheckpointDir>> {
    let own = fixtures().join("checkpoints").join(name);
    if name != "tiny-realtok" {
        return Ok(Some(CheckpointDir {
            path: own,
            _temp: None,
        }));
    }
    let Some(real) = shared_path("models/LFM2-VL-450M") else {
        return Ok(None);
    };
    let temp = tempfile::tempdir()?;
    for file in REALTOK_SHARED_FILES {
        std::fs::copy(real.join(file), temp.path().join(file))
            .map_err(|e| format!("{}: {e}", real.join(file).display()))?;
    }
    for file in REALTOK_OWN_FILES {
        std::fs::copy(own.join(file), temp.path().join(file))
            .map_err(|e| format!("{}: {e}", own.join(file).display()))?;
    }
    Ok(Some(CheckpointDir {
        path: temp.path().to_path_buf(),
        _temp: Some(temp),
    }))
}

/// Where two tensors differ most.
#[derive(Debug, Clone, Copy)]
pub struct Diff {
    pub max_abs: f32,
    /// Flat index of the largest difference.
    pub at: usize,
    pub ours: f32,
    pub theirs: f32,
}

pub fn diff(ours: &Tensor, theirs: &Tensor) -> TestResult<Diff> {
    if ours.dims() != theirs.dims() {
        return Err(format!("shape {:?} vs reference {:?}", ours.dims(), theirs.dims()).into());
    }
    let a = ours.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = theirs
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut worst = Diff {
        max_abs: 0.0,
        at: 0,
        ours: a.first().copied().unwrap_or(0.0),
        theirs: b.first().copied().unwrap_or(0.0),
    };
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        let d = (x - y).abs();
        // NaN counts as the worst possible difference.
        if d > worst.max_abs || d.is_nan() {
            worst = Diff {
                max_abs: if d.is_nan() { f32::INFINITY } else { d },
                at: i,
                ours: x,
                theirs: y,
            };
        }
    }
    Ok(worst)
}

pub fn max_abs(t: &Tensor) -> TestResult<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// The logits tolerance of the README: 5e-4 + 2e-5 * max|logit|.
pub fn logits_tol(reference: &Tensor) -> TestResult<f32> {
    Ok(5e-4 + 2e-5 * max_abs(reference)?)
}

/// Records every check of one case; [`Checks::finish`] fails with all the mismatches.
pub struct Checks {
    case: String,
    failures: Vec<String>,
    passed: usize,
}

impl Checks {
    pub fn new(case: impl Into<String>) -> Self {
        Self {
            case: case.into(),
            failures: Vec::new(),
            passed: 0,
        }
    }

    pub fn fail(&mut self, msg: impl Into<String>) {
        self.failures.push(msg.into());
    }

    /// Records an error from a step that could not run (its later checks are skipped).
    pub fn step<T>(&mut self, what: &str, r: Result<T, impl std::fmt::Display>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.fail(format!("{what}: error: {e}"));
                None
            }
        }
    }

    pub fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if ok {
            self.passed += 1;
        } else {
            self.fail(msg());
        }
    }

    /// Exact equality, showing the first differing element of sequences via `Debug`.
    pub fn eq<T: PartialEq + Debug>(&mut self, what: &str, ours: &T, theirs: &T) {
        if ours == theirs {
            self.passed += 1;
        } else {
            let (a, b) = (format!("{ours:?}"), format!("{theirs:?}"));
            let first = a
                .chars()
                .zip(b.chars())
                .position(|(x, y)| x != y)
                .unwrap_or(a.len().min(b.len()));
            let from = first.saturating_sub(40);
            let clip = |s: &str| s.chars().skip(from).take(120).collect::<String>();
            self.fail(format!(
                "{what}: differs at char {first}:\n      ours:   …{}\n      theirs: …{}",
                clip(&a),
                clip(&b)
            ));
        }
    }

    /// `max |ours - theirs| <= tol`, printing the measured difference either way.
    pub fn close(&mut self, what: &str, ours: &Tensor, theirs: &Tensor, tol: f32) -> Option<Diff> {
        match diff(ours, theirs) {
            Ok(d) => {
                eprintln!(
                    "[{}] {what}: max |diff| {:.3e} (tolerance {tol:.1e})",
                    self.case, d.max_abs
                );
                self.check(d.max_abs <= tol, || {
                    format!(
                        "{what}: max |diff| {:.3e} > {tol:.1e} at flat index {} of {:?} (ours {}, reference {})",
                        d.max_abs,
                        d.at,
                        theirs.dims(),
                        d.ours,
                        d.theirs
                    )
                });
                Some(d)
            }
            Err(e) => {
                self.fail(format!("{what}: {e}"));
                None
            }
        }
    }

    /// Panics with every recorded failure.
    pub fn finish(self) {
        if self.failures.is_empty() {
            eprintln!("[{}] all {} checks passed", self.case, self.passed);
            return;
        }
        panic!(
            "[{}] {} of {} checks failed:\n  - {}",
            self.case,
            self.failures.len(),
            self.failures.len() + self.passed,
            self.failures.join("\n  - ")
        );
    }
}

/// Compares two lists of views byte for byte, recording sizes and how many bytes differ.
pub fn compare_views(checks: &mut Checks, what: &str, ours: &[RgbImage], theirs: &[RgbImage]) {
    checks.eq(
        &format!("{what}: number of views"),
        &ours.len(),
        &theirs.len(),
    );
    for (v, (a, b)) in ours.iter().zip(theirs).enumerate() {
        if a.dimensions() != b.dimensions() {
            checks.fail(format!(
                "{what}: view {v} is {:?}, reference {:?}",
                a.dimensions(),
                b.dimensions()
            ));
            continue;
        }
        let (mut differing, mut max_step) = (0usize, 0u8);
        for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
            if x != y {
                differing += 1;
                max_step = max_step.max(x.abs_diff(*y));
            }
        }
        checks.check(differing == 0, || {
            format!(
                "{what}: view {v} ({}x{}): {differing} of {} bytes differ, by up to {max_step}",
                a.width(),
                a.height(),
                a.as_raw().len()
            )
        });
    }
}
