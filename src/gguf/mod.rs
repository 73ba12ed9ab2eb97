//! GGUF export: an LFM2-VL checkpoint (Hub layout) as the pair of files llama.cpp (and LEAP,
//! built on it) runs: `<name>-<QUANT>.gguf`, the text model under llama.cpp's `lfm2`
//! architecture with its tokenizer and chat template, and `mmproj-<name>-<QUANT>.gguf`, the
//! SigLIP2 vision tower and LFM2 projector for llama.cpp's `clip`/`mtmd` (projector type `lfm2`).
//!
//! The files follow llama.cpp's own converter (`convert_hf_to_gguf.py`, and with `--mmproj`, of
//! the llama.cpp that `tests/llama_cpp/build.sh` pins): tensor names ([`names`]), shapes and
//! types ([`write`]), metadata keys and values ([`metadata`], [`tokenizer`]). The integration
//! tests (`tests/it/gguf_export.rs`) compare both files with the converter's output for the same
//! checkpoint and run llama.cpp's `llama-mtmd-cli` on vlmpipe's export.
//!
//! `Q4_K_M` is the file `llama-quantize FILE-F16.gguf OUT.gguf Q4_K_M` makes of the F16 export:
//! the per-tensor types of [`mixture`], blocks from ggml's reference quantizers, quantized from
//! the f16-rounded weights, since `llama-quantize` reads the F16 file and that is what makes the
//! bytes equal (a bf16 checkpoint's weights are f16 values already, subnormals apart). The test
//! compares the two files, tensor order apart (`llama-quantize` writes the loader's).
//!
//! Where vlmpipe differs, on purpose: `general.name` is the name the export is given (the
//! converter guesses name, base name, size and version from the folder name and model card),
//! and a trimmed LFM2 vocabulary whose check hash llama.cpp does not list is still written as the
//! `lfm2` pre-tokenizer when it splits like LFM2 (the converter refuses it).

pub mod metadata;
pub(crate) mod mixture;
pub(crate) mod names;
pub(crate) mod quant;
pub mod read;
pub mod tokenizer;
pub mod tokenizer_read;
pub mod write;

use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use serde_json::Value as Json;

pub use quant::{GgufQuant, KNOWN_QUANTS, MMPROJ_QUANTS, UnknownQuant};
pub use write::Fallback;

use crate::model::checkpoint::Checkpoint;
use names::Target;

/// Why an export failed; each names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read or write `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` {message}")]
    Input { path: PathBuf, message: String },
    #[error(
        "`{path}` is a `{found}` checkpoint; GGUF export takes LFM2-VL checkpoints \
         (`Lfm2VlForConditionalGeneration`, model_type `lfm2-vl`)"
    )]
    Architecture { path: PathBuf, found: String },
    #[error("tensor `{tensor}` of the checkpoint has no place in llama.cpp's LFM2-VL files")]
    UnknownTensor { tensor: String },
    #[error("tensor `{tensor}`: {message}")]
    Tensor { tensor: String, message: String },
    #[error(
        "`{path}` exists; vlmpipe does not overwrite files it did not write (pass --force to \
         replace it)"
    )]
    Exists { path: PathBuf },
}

impl GgufError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One file's tensors in llama.cpp's layout and types, their fallbacks and parameter count.
type Converted = (Vec<(String, QTensor)>, Vec<Fallback>, u64);

/// What to write.
#[derive(Clone, Debug)]
pub struct GgufOptions {
    /// `<name>` in the file names and `general.name`.
    pub name: String,
    /// The text model's type.
    pub quant: GgufQuant,
    /// The mmproj's type.
    pub mmproj_quant: GgufQuant,
    /// Replace files of the same names in the destination.
    pub force: bool,
}

/// One written file.
#[derive(Clone, Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub bytes: u64,
    pub tensors: usize,
    /// Weights that could not take the file's type (rows not whole blocks) and went F16.
    pub fallbacks: Vec<Fallback>,
}

/// The pair written.
#[derive(Clone, Debug)]
pub struct GgufExport {
    pub text: GgufFile,
    pub mmproj: GgufFile,
}

/// `<name>-<QUANT>.gguf` and `mmproj-<name>-<QUANT>.gguf`, as llama.cpp's converter names them.
pub fn file_names(name: &str, quant: GgufQuant, mmproj_quant: GgufQuant) -> (String, String) {
    let name = name.trim().replace([' ', '/'], "-");
    (
        format!("{name}-{}.gguf", quant.name()),
        format!("mmproj-{name}-{}.gguf", mmproj_quant.name()),
    )
}

/// Reads `config.json` of `dir` and refuses anything but LFM2-VL, before any weight is read.
pub(crate) fn check_architecture(dir: &Path) -> Result<Json, GgufError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| GgufError::io(&path, e))?;
    let config: Json = serde_json::from_str(&text).map_err(|e| GgufError::Input {
        path: path.clone(),
        message: format!("is not valid JSON: {e}"),
    })?;
    let arch = config["architectures"][0].as_str().unwrap_or_default();
    let model_type = config["model_type"].as_str().unwrap_or_default();
    let is_lfm2_vl =
        arch == "Lfm2VlForConditionalGeneration" || matches!(model_type, "lfm2-vl" | "lfm2_vl");
    if !is_lfm2_vl {
        let found = if arch.is_empty() { model_type } else { arch };
        return Err(GgufError::Architecture {
            path,
            found: if found.is_empty() {
                "unknown".into()
            } else {
                found.into()
            },
        });
    }
    Ok(config)
}

/// Writes the pair for the checkpoint in `dir` into `out_dir`.
pub fn export(dir: &Path, out_dir: &Path, opts: &GgufOptions) -> Result<GgufExport, GgufError> {
    let config = check_architecture(dir)?;
    let mmproj_quant = opts
        .mmproj_quant
        .for_mmproj()
        .map_err(|e| GgufError::Input {
            path: dir.to_path_buf(),
            message: format!("cannot be exported with that mmproj type: {e}"),
        })?;
    let (text_name, mmproj_name) = file_names(&opts.name, opts.quant, opts.mmproj_quant);
    let text_path = out_dir.join(&text_name);
    let mmproj_path = out_dir.join(&mmproj_name);
    if !opts.force {
        for path in [&text_path, &mmproj_path] {
            if path.exists() {
                return Err(GgufError::Exists { path: path.clone() });
            }
        }
    }
    let h = metadata::text_hparams(&config);
    let vocab_size = h
        .get("vocab_size")
        .and_then(Json::as_u64)
        .ok_or_else(|| GgufError::Input {
            path: dir.join("config.json"),
            message: "has no `vocab_size`".into(),
        })? as usize;
    let patch_size = config["vision_config"]["patch_size"].as_u64().unwrap_or(16) as usize;
    let vocab = tokenizer::read_vocab(dir, vocab_size)?;

    let ckpt = Checkpoint::open(dir).map_err(|e| GgufError::Input {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    // SAFETY: read-only maps of the checkpoint's files; every tensor is copied out (converted to
    // f32) before it is used, so a later change to the files cannot alias live data.
    let st =
        unsafe { MmapedSafetensors::multi(&ckpt.weight_files) }.map_err(|e| GgufError::Input {
            path: dir.to_path_buf(),
            message: format!("weights cannot be read: {e}"),
        })?;
    let mut hf_names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    hf_names.sort();
    let mut plan: Vec<(String, Target)> = Vec::with_capacity(hf_names.len());
    for hf in hf_names {
        if hf.ends_with(".rotary_emb.inv_freq") {
            continue;
        }
        let target =
            names::map_name(&hf).ok_or_else(|| GgufError::UnknownTensor { tensor: hf.clone() })?;
        plan.push((hf, target));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| GgufError::io(out_dir, e))?;

    // `{arch}.block_count` as `metadata::text_metadata` reads it (llama.cpp's `n_layer_all`).
    let block_count = ["n_layers", "num_hidden_layers", "n_layer", "num_layers"]
        .iter()
        .find_map(|k| h.get(*k).and_then(Json::as_u64))
        .unwrap_or(0) as usize;
    let mixture = if opts.quant.is_mixture() {
        Some(mixture_plan(&st, &plan, opts.quant, block_count)?)
    } else {
        None
    };

    let convert = |mmproj: bool, quant: GgufQuant| -> Result<Converted, GgufError> {
        let mut out = Vec::new();
        let mut fallbacks = Vec::new();
        let mut params = 0u64;
        for (hf, target) in &plan {
            let gguf_name = match (target, mmproj) {
                (Target::Text(n), false) | (Target::Mmproj(n), true) => n,
                _ => continue,
            };
            let tensor_err = |e: candle_core::Error| GgufError::Tensor {
                tensor: hf.clone(),
                message: e.to_string(),
            };
            let t = st
                .load(hf, &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(tensor_err)?;
            let t = write::llama_cpp_layout(gguf_name, t, patch_size).map_err(tensor_err)?;
            params += t.elem_count() as u64;
            let q = match mixture.as_ref().filter(|_| !mmproj) {
                Some(m) => {
                    let used = m.types[gguf_name.as_str()];
                    if let Some(&wanted) = m.wanted.get(gguf_name.as_str()) {
                        fallbacks.push(Fallback {
                            tensor: gguf_name.clone(),
                            wanted,
                            used,
                            row: t.dims().last().copied().unwrap_or(1),
                        });
                    }
                    // llama-quantize reads the F16 export: quantize the same f16 values.
                    let t = match used {
                        GgmlDType::F32 => t,
                        _ => t
                            .to_dtype(DType::F16)
                            .and_then(|t| t.to_dtype(DType::F32))
                            .map_err(tensor_err)?,
                    };
                    write::quantize_as(gguf_name, &t, used)?
                }
                None => {
                    let wanted = write::tensor_type(gguf_name, t.rank(), quant, mmproj);
                    let (q, fallback) = write::to_qtensor(gguf_name, &t, wanted)?;
                    fallbacks.extend(fallback);
                    q
                }
            };
            out.push((gguf_name.clone(), q));
        }
        Ok((out, fallbacks, params))
    };

    let (tensors, fallbacks, params) = convert(false, opts.quant)?;
    let kv = metadata::text_metadata(
        &dir.join("config.json"),
        &config,
        &vocab,
        &opts.name,
        opts.quant,
        params,
    )?;
    let bytes = write::write_file(&text_path, &kv, &tensors)?;
    let text = GgufFile {
        path: text_path,
        bytes,
        tensors: tensors.len(),
        fallbacks,
    };
    drop(tensors);

    let (tensors, fallbacks, params) = convert(true, mmproj_quant)?;
    let mut kv = metadata::mmproj_metadata(dir, &config, &opts.name, mmproj_quant)?;
    // gguf-py sets a size label on every file from its parameter count.
    kv.insert(
        3,
        (
            "general.size_label".into(),
            candle_core::quantized::gguf_file::Value::String(metadata::size_label(params)),
        ),
    );
    let bytes = write::write_file(&mmproj_path, &kv, &tensors)?;
    let mmproj = GgufFile {
        path: mmproj_path,
        bytes,
        tensors: tensors.len(),
        fallbacks,
    };
    Ok(GgufExport { text, mmproj })
}

/// The text file's tensor types under a mixture, from the checkpoint's shapes before any weight
/// is read (the choice depends on every tensor's name and on the layer count).
fn mixture_plan(
    st: &MmapedSafetensors,
    plan: &[(String, Target)],
    quant: GgufQuant,
    block_count: usize,
) -> Result<mixture::MixtureTypes, GgufError> {
    let mut shapes = Vec::new();
    for (hf, target) in plan {
        let Target::Text(name) = target else { continue };
        let view = st.get(hf).map_err(|e| GgufError::Tensor {
            tensor: hf.clone(),
            message: e.to_string(),
        })?;
        let mut dims = view.shape().to_vec();
        // The short-conv kernel loses its middle axis in llama.cpp's layout.
        if name.ends_with(".shortconv.conv.weight") && dims.len() == 3 {
            dims.remove(1);
        }
        shapes.push(mixture::TensorShape {
            name: name.clone(),
            row: dims.last().copied().unwrap_or(1),
            n_dims: dims.len(),
            f16_type: write::tensor_type(name, dims.len(), GgufQuant::F16, false),
        });
    }
    Ok(mixture::mixture_types(quant, &shapes, block_count))
}
