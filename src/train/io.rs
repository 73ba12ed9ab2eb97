//! Small file helpers: atomic writes and safetensors with the `{"format": "pt"}` header
//! transformers expects.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};

use crate::file_error::FileError;
use crate::train::error::TrainError;

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`, so a
/// reader (or a resumed run after a kill) sees the old file or the new one, never half of one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(FileError::create(dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(FileError::create(dir))?;
    tmp.write_all(bytes).map_err(FileError::write(path))?;
    tmp.as_file().sync_all().map_err(FileError::write(path))?;
    tmp.persist(path)
        .map_err(|e| FileError::write(path)(e.error))?;
    Ok(())
}

fn to_view_parts(t: &Tensor) -> Result<(Dtype, Vec<usize>, Vec<u8>), TrainError> {
    let shape = t.dims().to_vec();
    let flat = t.flatten_all()?;
    let (dtype, bytes) = match t.dtype() {
        DType::F32 => (
            Dtype::F32,
            flat.to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            Dtype::BF16,
            flat.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            Dtype::F16,
            flat.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::I64 => (
            Dtype::I64,
            flat.to_vec1::<i64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::U32 => (
            Dtype::U32,
            flat.to_vec1::<u32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        _ => (
            Dtype::F32,
            flat.to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    };
    Ok((dtype, shape, bytes))
}

/// Serialises named tensors (any order; safetensors sorts them) with `format: pt` metadata.
pub(crate) fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>, TrainError> {
    let parts = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), to_view_parts(t)?)))
        .collect::<Result<Vec<_>, TrainError>>()?;
    let views = parts
        .iter()
        .map(|(n, (dtype, shape, bytes))| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrainError::Safetensors {
            path: "<memory>".into(),
            message: e.to_string(),
        })?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| TrainError::Safetensors {
        path: "<memory>".into(),
        message: e.to_string(),
    })
}

/// Writes named tensors to `path` atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), TrainError> {
    let bytes = safetensors_bytes(tensors).map_err(|e| match e {
        TrainError::Safetensors { message, .. } => TrainError::Safetensors {
            path: path.to_path_buf(),
            message,
        },
        other => other,
    })?;
    write_atomic(path, &bytes)
}

/// Reads every tensor of a safetensors file, sorted by name.
pub(crate) fn read_safetensors(
    path: &Path,
    device: &Device,
) -> Result<Vec<(String, Tensor)>, TrainError> {
    if !path.is_file() {
        return Err(FileError::read(path)(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "file not found",
        ))
        .into());
    }
    let mut tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(path, device)
        .map_err(|e| TrainError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
        .into_iter()
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}
