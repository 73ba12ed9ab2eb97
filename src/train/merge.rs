//! `merge`: folds an adapter into the base weights (`W += scale * B A`) and writes a checkpoint
//! directory in the Hub layout that transformers and vlmpipe load like the original.
//!
//! Tensors keep their stored names and dtypes (the merge is computed in f32); every other file of
//! the base directory (config, tokenizer, chat template, processor settings) is copied as is. The
//! directory is assembled under a temporary name and renamed into place at the end.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::model::checkpoint::Checkpoint;
use crate::train::error::TrainError;
use crate::train::io::write_safetensors;
use crate::train::peft::{PeftAdapter, resolve_module_name};

/// What a merge changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeReport {
    pub merged_lora_modules: usize,
    pub replaced_tensors: usize,
    pub copied_files: Vec<String>,
}

/// Merges `adapter` into the checkpoint at `base_dir` and writes the result to `out_dir`
/// (replaced if it exists).
pub fn merge_checkpoint(
    base_dir: &Path,
    adapter: &PeftAdapter,
    out_dir: &Path,
) -> Result<MergeReport, TrainError> {
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
    let mut merged = 0;
    for l in &adapter.lora {
        let key = key_of(&tensors, &l.module, "weight");
        let w = tensors.get(&key).ok_or_else(|| missing(&key))?;
        let dtype = w.dtype();
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
        let new = (w.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)?;
        tensors.insert(key, new);
        merged += 1;
    }
    let mut replaced = 0;
    for f in &adapter.full {
        for (suffix, value) in [("weight", Some(&f.weight)), ("bias", f.bias.as_ref())] {
            let Some(value) = value else { continue };
            let key = key_of(&tensors, &f.module, suffix);
            let old = tensors.get(&key).ok_or_else(|| missing(&key))?;
            let new = value.to_dtype(old.dtype())?;
            tensors.insert(key, new);
            replaced += 1;
        }
    }

    let parent = out_dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(TrainError::io(parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(".merge-")
        .tempdir_in(parent)
        .map_err(TrainError::io(parent))?;
    let named: Vec<(String, Tensor)> = tensors.into_iter().collect();
    write_safetensors(&tmp.path().join("model.safetensors"), &named)?;
    let mut copied = Vec::new();
    let entries = std::fs::read_dir(base_dir).map_err(TrainError::io(base_dir))?;
    for entry in entries {
        let entry = entry.map_err(TrainError::io(base_dir))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if !path.is_file()
            || name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
        {
            continue;
        }
        std::fs::copy(&path, tmp.path().join(&name)).map_err(TrainError::io(&path))?;
        copied.push(name);
    }
    copied.sort();
    if out_dir.exists() {
        std::fs::remove_dir_all(out_dir).map_err(TrainError::io(out_dir))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, out_dir).map_err(TrainError::io(out_dir))?;
    Ok(MergeReport {
        merged_lora_modules: merged,
        replaced_tensors: replaced,
        copied_files: copied,
    })
}

/// The checkpoint tensor name of `module`'s `suffix` (PEFT names mapped to the stored layout).
fn key_of(tensors: &BTreeMap<String, Tensor>, module: &str, suffix: &str) -> String {
    resolve_module_name(module, |m| tensors.contains_key(&format!("{m}.weight")))
        .map_or_else(|| format!("{module}.{suffix}"), |m| format!("{m}.{suffix}"))
}
