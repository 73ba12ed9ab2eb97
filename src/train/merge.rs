//! `merge`: folds an adapter into the base weights (`W += scale * B A`) and writes a checkpoint
//! folder in the Hub layout that transformers' Auto classes and vlmpipe load like the original.
//!
//! The merge is computed in f32 and the result saved in the dtype asked for. bf16 keeps 8 bits of
//! mantissa, so a LoRA update smaller than half a bf16 step of its weight rounds away entirely
//! (measured at the 450M shapes: 70% of the nonzero update elements); [`RoundingReport`] says how
//! much of the update the saved dtype keeps, so a lossy export is never silent.
//!
//! `config.json` is rewritten for transformers: `model_type` `lfm2_vl` (the name transformers
//! registers; LiquidAI's files say `lfm2-vl`), the architecture, the nested model types, and the
//! dtype fields of the saved weights. `preprocessor_config.json` names `Lfm2VlImageProcessorFast`
//! with the LFM2-VL settings the model's files spread over three files (the Hub's 450M names
//! `Siglip2ImageProcessor` there, which `AutoProcessor` would build and which neither tiles nor
//! resizes like LFM2-VL). Every other file of the base folder (tokenizer, chat template,
//! `processor_config.json`) is copied as is.
//!
//! The destination is never wiped: the files are written into a temporary folder and renamed into
//! place one by one, and a folder that holds anything else is refused unless it is a previous
//! export of the same stage (recognised by the [`EXPORT_MANIFEST`] vlmpipe writes into every
//! export) or the caller forces it; forced or not, only the files vlmpipe writes are replaced.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dtype::Dtype;
use crate::file_error::FileError;
use crate::model::checkpoint::Checkpoint;
use crate::train::error::TrainError;
use crate::train::io::{write_atomic, write_safetensors};
use crate::train::peft::{PeftAdapter, resolve_module_name};

/// The file vlmpipe writes into every export, naming the stage it came from and its files.
pub const EXPORT_MANIFEST: &str = "vlmpipe-export.json";
/// The merged weights.
const WEIGHTS_FILE: &str = "model.safetensors";
const CONFIG_FILE: &str = "config.json";
const PREPROCESSOR_FILE: &str = "preprocessor_config.json";
const PROCESSOR_FILE: &str = "processor_config.json";
/// Above this fraction of lost update elements the export warns.
pub(crate) const LOST_WARN_FRACTION: f64 = 0.01;

/// Which pipeline stage an export comes from (recorded in [`EXPORT_MANIFEST`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportOrigin {
    pub pipeline: String,
    pub stage: String,
}

/// How to merge and where the files may go.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// The dtype of the saved weights (`F32`, `BF16` or `F16`); the merge itself is f32.
    pub dtype: DType,
    /// Write into a folder that holds other files, replacing only files of the names vlmpipe
    /// writes.
    pub force: bool,
    pub origin: ExportOrigin,
}

/// What a merge changed.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    pub merged_lora_modules: usize,
    pub replaced_tensors: usize,
    pub copied_files: Vec<String>,
    pub rounding: RoundingReport,
}

/// What saving the merged weights in the chosen dtype did to the adapter's update.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundingReport {
    pub dtype: DType,
    /// Elements of the LoRA modules' weights whose update `scale * B A` is nonzero.
    pub update_elements: u64,
    /// Of those, the ones whose saved weight equals the base weight saved in the same dtype:
    /// the update rounded away.
    pub lost_elements: u64,
    /// The largest `|scale * B A|` element.
    pub max_update: f32,
    /// The largest `|saved - (W + scale * B A)|` over the merged weights (the rounding error).
    pub max_merged_error: f32,
    /// The largest change rounding made to any weight the adapter did not touch (nonzero only
    /// when the base is stored wider than the saved dtype).
    pub max_other_error: f32,
}

impl RoundingReport {
    /// The fraction of update elements lost (0 when there is no update).
    pub fn lost_fraction(&self) -> f64 {
        if self.update_elements == 0 {
            0.0
        } else {
            self.lost_elements as f64 / self.update_elements as f64
        }
    }

    /// Whether the saved model differs enough from the evaluated one to warn about.
    pub fn is_large(&self) -> bool {
        self.lost_fraction() > LOST_WARN_FRACTION
    }
}

/// Why an export could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The folder holds files vlmpipe did not write.
    #[error(
        "`{dir}` is not empty and is not an export of this stage (it holds {listing}); choose a new or empty folder, or pass `--force` to write the checkpoint's files into it (only files of the same names are replaced)"
    )]
    NotEmpty { dir: PathBuf, listing: String },
    /// The folder is an export of another stage.
    #[error(
        "`{dir}` holds the export of `{found}`, not of `{expected}`; choose another folder, or pass `--force` to replace its checkpoint files"
    )]
    OtherStage {
        dir: PathBuf,
        found: String,
        expected: String,
    },
    /// The destination is a file.
    #[error("`{0}` is a file; the export needs a folder")]
    NotADir(PathBuf),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Train(#[from] TrainError),
}

/// `vlmpipe-export.json` as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ExportManifest {
    written_by: String,
    pipeline: String,
    stage: String,
    dtype: String,
    /// Every file of the export vlmpipe wrote (the manifest itself aside).
    files: Vec<String>,
}

/// What is at the destination now.
#[derive(Debug)]
pub(crate) enum Destination {
    /// Nothing: the finished folder is renamed into place.
    Fresh,
    /// An empty folder, a previous export of the same stage, or (forced) a folder with other
    /// files: the files are renamed into it one by one.
    Update { previous_files: Vec<String> },
}

/// Checks that an export may be written to `out_dir` (fast: run it before the stage trains).
pub(crate) fn check_destination(
    out_dir: &Path,
    origin: &ExportOrigin,
    force: bool,
) -> Result<Destination, ExportError> {
    if !out_dir.exists() {
        return Ok(Destination::Fresh);
    }
    if !out_dir.is_dir() {
        return Err(ExportError::NotADir(out_dir.to_path_buf()));
    }
    let mut names: Vec<String> = std::fs::read_dir(out_dir)
        .map_err(FileError::list(out_dir))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(FileError::list(out_dir))?;
    if names.is_empty() {
        // Filled in place rather than replaced: the folder may be `.`, which cannot be renamed.
        return Ok(Destination::Update {
            previous_files: Vec::new(),
        });
    }
    names.sort();
    let manifest = read_manifest(out_dir);
    match manifest {
        Some(m) if m.pipeline == origin.pipeline && m.stage == origin.stage => {
            Ok(Destination::Update {
                previous_files: m.files,
            })
        }
        Some(m) if force => Ok(Destination::Update {
            previous_files: m.files,
        }),
        Some(m) => Err(ExportError::OtherStage {
            dir: out_dir.to_path_buf(),
            found: format!("{} / {}", m.pipeline, m.stage),
            expected: format!("{} / {}", origin.pipeline, origin.stage),
        }),
        None if force => Ok(Destination::Update {
            previous_files: Vec::new(),
        }),
        None => {
            let shown: Vec<String> = names.iter().take(4).map(|n| format!("`{n}`")).collect();
            let more = names.len().saturating_sub(shown.len());
            let listing = if more > 0 {
                format!("{} and {more} more", shown.join(", "))
            } else {
                shown.join(", ")
            };
            Err(ExportError::NotEmpty {
                dir: out_dir.to_path_buf(),
                listing,
            })
        }
    }
}

fn read_manifest(dir: &Path) -> Option<ExportManifest> {
    let text = std::fs::read_to_string(dir.join(EXPORT_MANIFEST)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Merges `adapter` into the checkpoint at `base_dir` and writes the result to `out_dir` (see
/// the module docs for what may be written where).
pub fn merge_checkpoint(
    base_dir: &Path,
    adapter: &PeftAdapter,
    out_dir: &Path,
    options: &MergeOptions,
) -> Result<MergeReport, ExportError> {
    let destination = check_destination(out_dir, &options.origin, options.force)?;
    let merged = merge_tensors(base_dir, adapter, options.dtype)?;

    // Assemble everything in a temporary folder: beside the destination when it is new, inside
    // it when it exists (renames stay on one filesystem, and the parent of `.` may not be ours).
    let staging_parent = match &destination {
        Destination::Fresh => {
            let parent = std::path::absolute(out_dir)
                .map_err(FileError::inspect(out_dir))?
                .parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
            std::fs::create_dir_all(&parent).map_err(FileError::create(&parent))?;
            parent
        }
        Destination::Update { .. } => out_dir.to_path_buf(),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".vlmpipe-export-")
        .tempdir_in(&staging_parent)
        .map_err(FileError::create(&staging_parent))?;
    let mut written = vec![WEIGHTS_FILE.to_owned()];
    write_safetensors(&tmp.path().join(WEIGHTS_FILE), &merged.tensors)?;
    let mut copied = Vec::new();
    let read_json = |name: &str| -> Result<Option<Value>, TrainError> {
        let path = base_dir.join(name);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(FileError::read(&path))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TrainError::Json {
                path: path.clone(),
                message: e.to_string(),
            })
    };
    let write_json = |name: &str, value: &Value| -> Result<(), TrainError> {
        let target = tmp.path().join(name);
        let text = serde_json::to_string_pretty(value).map_err(|e| TrainError::Json {
            path: target.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&target, text.as_bytes())
    };
    let base_config = read_json(CONFIG_FILE)?.unwrap_or_else(|| Value::Object(Default::default()));
    write_json(
        PREPROCESSOR_FILE,
        &lfm2_preprocessor_config(
            &base_config,
            read_json(PREPROCESSOR_FILE)?.as_ref(),
            read_json(PROCESSOR_FILE)?.as_ref(),
        ),
    )?;
    written.push(PREPROCESSOR_FILE.to_owned());
    for entry in std::fs::read_dir(base_dir).map_err(FileError::list(base_dir))? {
        let entry = entry.map_err(FileError::list(base_dir))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if !path.is_file()
            || name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
            || name == EXPORT_MANIFEST
            || name == PREPROCESSOR_FILE
        {
            continue;
        }
        let target = tmp.path().join(&name);
        if name == CONFIG_FILE {
            write_json(
                CONFIG_FILE,
                &transformers_config(base_config.clone(), options.dtype),
            )?;
        } else {
            std::fs::copy(&path, &target).map_err(FileError::copy_to(&target))?;
        }
        copied.push(name.clone());
        written.push(name);
    }
    copied.sort();
    written.sort();
    let manifest = ExportManifest {
        written_by: format!("vlmpipe {}", env!("CARGO_PKG_VERSION")),
        pipeline: options.origin.pipeline.clone(),
        stage: options.origin.stage.clone(),
        dtype: dtype_name(options.dtype).to_owned(),
        files: written.clone(),
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| TrainError::Json {
        path: tmp.path().join(EXPORT_MANIFEST),
        message: e.to_string(),
    })?;
    write_atomic(&tmp.path().join(EXPORT_MANIFEST), text.as_bytes())?;

    match destination {
        Destination::Fresh => {
            let kept = tmp.keep();
            std::fs::rename(&kept, out_dir).map_err(FileError::write(out_dir))?;
        }
        Destination::Update { previous_files } => {
            // The manifest goes last: until it is in place the folder does not claim the new files.
            for name in written
                .iter()
                .chain(std::iter::once(&EXPORT_MANIFEST.to_owned()))
            {
                let target = out_dir.join(name);
                std::fs::rename(tmp.path().join(name), &target)
                    .map_err(FileError::write(&target))?;
            }
            // Files an earlier export of this stage wrote and this one does not: ours to remove.
            let now: BTreeSet<&String> = written.iter().collect();
            for name in previous_files.iter().filter(|n| !now.contains(n)) {
                let path = out_dir.join(name);
                // Only plain names: a tampered manifest must not reach outside the folder.
                if Path::new(name).components().count() == 1 && path.is_file() {
                    std::fs::remove_file(&path).map_err(FileError::remove(&path))?;
                }
            }
        }
    }
    Ok(MergeReport {
        merged_lora_modules: merged.lora_modules,
        replaced_tensors: merged.replaced,
        copied_files: copied,
        rounding: merged.rounding,
    })
}

/// The merged tensors in the saved dtype, with what rounding did.
struct Merged {
    tensors: Vec<(String, Tensor)>,
    lora_modules: usize,
    replaced: usize,
    rounding: RoundingReport,
}

fn merge_tensors(
    base_dir: &Path,
    adapter: &PeftAdapter,
    dtype: DType,
) -> Result<Merged, TrainError> {
    let ckpt = Checkpoint::open(base_dir).map_err(|e| TrainError::Adapter {
        path: base_dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for file in &ckpt.weight_files {
        for (name, t) in crate::train::io::read_safetensors(file, &Device::Cpu)? {
            tensors.insert(name, t);
        }
    }
    let missing = |name: &str| TrainError::Adapter {
        path: base_dir.to_path_buf(),
        message: format!("the base checkpoint has no tensor `{name}`"),
    };
    let mut rounding = RoundingReport {
        dtype,
        update_elements: 0,
        lost_elements: 0,
        max_update: 0.0,
        max_merged_error: 0.0,
        max_other_error: 0.0,
    };
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut merged = 0;
    for l in &adapter.lora {
        let key = key_of(&tensors, &l.module, "weight");
        let w = tensors.get(&key).ok_or_else(|| missing(&key))?;
        // [out, r] @ [r, in] -> [out, in]
        let delta =
            (l.b.to_dtype(DType::F32)?
                .matmul(&l.a.to_dtype(DType::F32)?)?
                * l.scale)?;
        if delta.dims() != w.dims() {
            return Err(TrainError::Adapter {
                path: base_dir.to_path_buf(),
                message: format!(
                    "`{}`: the adapter's update is {:?}, the weight {:?}",
                    l.module,
                    delta.dims(),
                    w.dims()
                ),
            });
        }
        let exact = (w.to_dtype(DType::F32)? + &delta)?;
        let saved = exact.to_dtype(dtype)?;
        account_rounding(&mut rounding, w, &delta, &exact, &saved)?;
        out.insert(key.clone(), saved);
        done.insert(key);
        merged += 1;
    }
    let mut replaced = 0;
    for f in &adapter.full {
        for (suffix, value) in [("weight", Some(&f.weight)), ("bias", f.bias.as_ref())] {
            let Some(value) = value else { continue };
            let key = key_of(&tensors, &f.module, suffix);
            if !tensors.contains_key(&key) {
                return Err(missing(&key));
            }
            out.insert(key.clone(), value.to_dtype(dtype)?);
            done.insert(key);
            replaced += 1;
        }
    }
    for (name, t) in tensors {
        if done.contains(&name) {
            continue;
        }
        let saved = if t.dtype().is_float() {
            let saved = t.to_dtype(dtype)?;
            if narrows(t.dtype(), dtype) {
                let err = max_abs_diff(&saved, &t)?;
                rounding.max_other_error = rounding.max_other_error.max(err);
            }
            saved
        } else {
            t
        };
        out.insert(name, saved);
    }
    Ok(Merged {
        tensors: out.into_iter().collect(),
        lora_modules: merged,
        replaced,
        rounding,
    })
}

/// Adds one merged weight's numbers to `report`.
fn account_rounding(
    report: &mut RoundingReport,
    base: &Tensor,
    delta: &Tensor,
    exact: &Tensor,
    saved: &Tensor,
) -> Result<(), TrainError> {
    let flat = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
    };
    let delta = flat(delta)?;
    let exact = flat(exact)?;
    let saved = flat(saved)?;
    // The base as it would be saved in the same dtype: an element is lost when the merged weight
    // rounds back to it.
    let base_saved = flat(&base.to_dtype(report.dtype)?)?;
    for i in 0..delta.len() {
        let d = delta[i];
        report.max_update = report.max_update.max(d.abs());
        report.max_merged_error = report.max_merged_error.max((saved[i] - exact[i]).abs());
        if d != 0.0 {
            report.update_elements += 1;
            if saved[i] == base_saved[i] {
                report.lost_elements += 1;
            }
        }
    }
    Ok(())
}

/// Whether converting `from` to `to` can round (to a narrower type, or between bf16 and f16).
fn narrows(from: DType, to: DType) -> bool {
    from != to && to.size_in_bytes() <= from.size_in_bytes()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32, TrainError> {
    let diff = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
    Ok(diff.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// `f32`, `bf16`, `f16` (what `--dtype` takes and the manifest records).
pub(crate) fn dtype_name(dtype: DType) -> &'static str {
    Dtype::of(dtype).map_or("other", Dtype::name)
}

/// torch's name of a dtype, as config files spell it.
fn torch_dtype_name(dtype: DType) -> &'static str {
    Dtype::of(dtype).unwrap_or_default().torch_name()
}

/// `config.json` as transformers' Auto classes load it: the registered model type and
/// architecture, the nested configs' types, no remote-code mapping, and the saved dtype.
pub(crate) fn transformers_config(mut config: Value, dtype: DType) -> Value {
    let torch_dtype = Value::from(torch_dtype_name(dtype));
    let Some(top) = config.as_object_mut() else {
        return config;
    };
    top.insert("model_type".into(), "lfm2_vl".into());
    top.insert(
        "architectures".into(),
        Value::from(vec!["Lfm2VlForConditionalGeneration"]),
    );
    // A remote-code mapping would make `trust_remote_code` load other classes than the ones
    // the weights were merged for.
    top.remove("auto_map");
    for (key, model_type) in [
        ("text_config", "lfm2"),
        ("vision_config", "siglip2_vision_model"),
    ] {
        if let Some(nested) = top.get_mut(key).and_then(Value::as_object_mut) {
            nested.insert("model_type".into(), model_type.into());
            for field in ["torch_dtype", "dtype"] {
                if nested.contains_key(field) {
                    nested.insert(field.into(), torch_dtype.clone());
                }
            }
        }
    }
    // transformers 5 reads `dtype`, 4.x `torch_dtype` (and `dtype` since 4.56): write both, so
    // `dtype="auto"` loads the weights as saved.
    top.insert("dtype".into(), torch_dtype.clone());
    top.insert("torch_dtype".into(), torch_dtype);
    config
}

/// The image processor's keys, as `Lfm2VlImageProcessorFast` takes them.
const IMAGE_PROCESSOR_KEYS: &[&str] = &[
    "tile_size",
    "min_image_tokens",
    "max_image_tokens",
    "min_tiles",
    "max_tiles",
    "encoder_patch_size",
    "downsample_factor",
    "max_pixels_tolerance",
    "max_num_patches",
    "do_image_splitting",
    "use_thumbnail",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "resample",
];

/// `preprocessor_config.json` for `AutoProcessor`: the `Lfm2VlImageProcessorFast` class with the
/// settings vlmpipe reads, in its order (`config.json`, `preprocessor_config.json`,
/// `processor_config.json`, its nested `image_processor`; later wins), so both libraries
/// preprocess alike.
pub(crate) fn lfm2_preprocessor_config(
    config: &Value,
    preprocessor: Option<&Value>,
    processor: Option<&Value>,
) -> Value {
    let mut out = serde_json::Map::new();
    let mut overlay = |source: Option<&Value>, all_keys: bool| {
        let Some(map) = source.and_then(Value::as_object) else {
            return;
        };
        for (key, value) in map {
            if all_keys || IMAGE_PROCESSOR_KEYS.contains(&key.as_str()) {
                out.insert(key.clone(), value.clone());
            }
        }
    };
    overlay(Some(config), false);
    let foreign = preprocessor
        .and_then(|p| p.get("image_processor_type"))
        .and_then(Value::as_str)
        .is_some_and(|t| !t.starts_with("Lfm2Vl"));
    if foreign {
        // Another class's file (the Hub's 450M: `Siglip2ImageProcessor` with `do_resize: false`):
        // only the keys LFM2-VL shares with it carry over.
        overlay(preprocessor, false);
    } else {
        overlay(preprocessor, true);
    }
    overlay(processor, false);
    overlay(processor.and_then(|p| p.get("image_processor")), false);
    out.insert(
        "image_processor_type".into(),
        "Lfm2VlImageProcessorFast".into(),
    );
    out.insert("processor_class".into(), "Lfm2VlProcessor".into());
    Value::Object(out)
}

/// The checkpoint tensor name of `module`'s `suffix` (PEFT names mapped to the stored layout).
fn key_of(tensors: &BTreeMap<String, Tensor>, module: &str, suffix: &str) -> String {
    resolve_module_name(module, |m| tensors.contains_key(&format!("{m}.weight")))
        .map_or_else(|| format!("{module}.{suffix}"), |m| format!("{m}.{suffix}"))
}
