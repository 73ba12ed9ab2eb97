//! Tensor types and the file itself: which tensors stay F32, which take the file's type, the
//! per-tensor fallback when a row does not fill whole blocks, and the GGUF v3 file.
//!
//! The rules are `ModelBase.prepare_tensors` of llama.cpp's converter: 1-D tensors, `*_norm`
//! weights, biases, the short-conv kernels and position embeddings stay F32; the mmproj's patch
//! embedding is F16 in an F16 file and F32 otherwise; every other weight takes the file's type.
//! A weight whose rows are not a whole number of Q8_0 blocks (32) falls back to F16, as the
//! converter's `QuantError` handler does, and the export reports each such tensor.
//!
//! Quantization is candle's (`QTensor::quantize`): its Q8_0 is ggml's reference quantizer
//! (`quantize_row_q8_0_ref`: `d = amax / 127`, `round(x / d)` half away from zero, `d` stored as
//! f16) and its F16/BF16 conversions round to nearest even like numpy's and gguf-py's; the
//! integration tests compare the bytes with the converter's.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use candle_core::Tensor;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};

use super::GgufError;
use super::metadata::Kv;
use super::quant::GgufQuant;

/// A weight that could not take the file's type, and what it got instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fallback {
    pub tensor: String,
    pub wanted: GgmlDType,
    pub used: GgmlDType,
    /// The row width (ggml's `ne[0]`) that is not a whole number of blocks.
    pub row: usize,
}

/// The type `gguf_name` is stored as in a file of type `quant`.
pub(crate) fn tensor_type(
    gguf_name: &str,
    n_dims: usize,
    quant: GgufQuant,
    mmproj: bool,
) -> GgmlDType {
    if n_dims <= 1 || gguf_name.ends_with("_norm.weight") {
        return GgmlDType::F32;
    }
    if mmproj && gguf_name.contains(".patch_embd.weight") {
        return if quant == GgufQuant::F16 {
            GgmlDType::F16
        } else {
            GgmlDType::F32
        };
    }
    let always_f32 = gguf_name.ends_with(".shortconv.conv.weight")
        || gguf_name == "v.position_embd.weight"
        || gguf_name == "position_embd.weight"
        || !gguf_name.ends_with(".weight");
    if always_f32 {
        return GgmlDType::F32;
    }
    quant.ggml_dtype()
}

/// Reshapes a checkpoint tensor into the layout llama.cpp reads.
///
/// - the short-conv kernel `(C, 1, L)` loses its middle axis (ggml's conv op takes it 2-D);
/// - SigLIP2's patch embedding, a linear layer over `(patch_y, patch_x, channel)` pixels, becomes
///   the `(out, channel, patch_y, patch_x)` convolution kernel clip.cpp applies.
pub(crate) fn llama_cpp_layout(
    gguf_name: &str,
    tensor: Tensor,
    patch_size: usize,
) -> candle_core::Result<Tensor> {
    if gguf_name.ends_with(".shortconv.conv.weight") && tensor.rank() == 3 {
        return tensor.squeeze(1);
    }
    if gguf_name == "v.patch_embd.weight" && tensor.rank() == 2 {
        let out = tensor.dim(0)?;
        return tensor
            .reshape((out, patch_size, patch_size, 3))?
            .permute((0, 3, 1, 2))?
            .contiguous();
    }
    Ok(tensor)
}

/// Converts `tensor` to `wanted`, or to F16 when its rows are not whole blocks of `wanted`.
pub(crate) fn to_qtensor(
    gguf_name: &str,
    tensor: &Tensor,
    wanted: GgmlDType,
) -> Result<(QTensor, Option<Fallback>), GgufError> {
    let row = tensor.dims().last().copied().unwrap_or(1);
    let (dtype, fallback) = if row % wanted.block_size() == 0 {
        (wanted, None)
    } else {
        let fallback = Fallback {
            tensor: gguf_name.to_owned(),
            wanted,
            used: GgmlDType::F16,
            row,
        };
        (GgmlDType::F16, Some(fallback))
    };
    let q = QTensor::quantize(tensor, dtype).map_err(|e| GgufError::Tensor {
        tensor: gguf_name.to_owned(),
        message: e.to_string(),
    })?;
    Ok((q, fallback))
}

/// `tensor` in `dtype` blocks, as ggml's reference quantizers make them: Q4_K and Q6_K through
/// vlmpipe's ports of `quantize_row_q4_K_ref` / `…_q6_K_ref` (candle's are older ggml
/// algorithms, see `crate::model::quant::ggml_q4k`), every other type through candle (its Q8_0
/// and Q5_0 are ggml's `…_ref` quantizers). The rows must be whole blocks of `dtype`.
pub(crate) fn quantize_as(
    gguf_name: &str,
    tensor: &Tensor,
    dtype: GgmlDType,
) -> Result<QTensor, GgufError> {
    use crate::model::quant::ggml_q4k;
    let err = |e: candle_core::Error| GgufError::Tensor {
        tensor: gguf_name.to_owned(),
        message: e.to_string(),
    };
    type Quantizer = fn(&[f32]) -> Vec<u8>;
    let port: Option<Quantizer> = match dtype {
        GgmlDType::Q4K => Some(ggml_q4k::quantize_q4_k),
        GgmlDType::Q6K => Some(ggml_q4k::quantize_q6_k),
        _ => None,
    };
    let Some(quantize) = port else {
        return QTensor::quantize(tensor, dtype).map_err(err);
    };
    let values = tensor
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(err)?;
    // Rows are independent blocks: quantize whole-row chunks on every core.
    let row = tensor.dims().last().copied().unwrap_or(1).max(1);
    let rows_per_chunk = (1 << 16) / row + 1;
    let bytes: Vec<u8> = {
        use rayon::prelude::*;
        values
            .par_chunks(rows_per_chunk * row)
            .map(quantize)
            .collect::<Vec<_>>()
            .concat()
    };
    candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype,
        &bytes,
        tensor.dims().to_vec(),
        &candle_core::Device::Cpu,
    )
    .map_err(err)
}

/// Writes a GGUF v3 file at `path` (through a temporary file beside it, renamed into place).
///
/// candle's writer writes the v2 header; v3 differs from v2 only in allowing big-endian files,
/// so the little-endian file is the same once its version field says 3, as gguf-py writes it.
pub fn write_file(path: &Path, kv: &Kv, tensors: &[(String, QTensor)]) -> Result<u64, GgufError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".vlmpipe-gguf-")
        .tempfile_in(dir)
        .map_err(|e| GgufError::io(dir, e))?;
    {
        let mut w = std::io::BufWriter::new(tmp.as_file());
        let metadata: Vec<(&str, &Value)> = kv.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut w, &metadata, &refs).map_err(|e| GgufError::Tensor {
            tensor: path.display().to_string(),
            message: e.to_string(),
        })?;
        w.seek(SeekFrom::Start(4))
            .map_err(|e| GgufError::io(path, e))?;
        w.write_all(&3u32.to_le_bytes())
            .map_err(|e| GgufError::io(path, e))?;
        w.flush().map_err(|e| GgufError::io(path, e))?;
    }
    let bytes = tmp
        .as_file()
        .metadata()
        .map_err(|e| GgufError::io(path, e))?
        .len();
    // Temporary files are private (0600); the export is an ordinary file for whoever ships it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| GgufError::io(path, e))?;
    }
    tmp.persist(path)
        .map_err(|e| GgufError::io(path, e.error))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn type_rules_follow_the_converter() {
        use GgufQuant::{F16, Q8_0};
        assert_eq!(
            tensor_type("blk.0.attn_q.weight", 2, Q8_0, false),
            GgmlDType::Q8_0
        );
        assert_eq!(
            tensor_type("token_embd.weight", 2, F16, false),
            GgmlDType::F16
        );
        assert_eq!(
            tensor_type("token_embd_norm.weight", 1, Q8_0, false),
            GgmlDType::F32
        );
        assert_eq!(
            tensor_type("blk.1.shortconv.conv.weight", 2, Q8_0, false),
            GgmlDType::F32
        );
        assert_eq!(
            tensor_type("v.position_embd.weight", 2, F16, true),
            GgmlDType::F32
        );
        assert_eq!(
            tensor_type("v.patch_embd.weight", 4, F16, true),
            GgmlDType::F16
        );
        assert_eq!(
            tensor_type("v.patch_embd.weight", 4, Q8_0, true),
            GgmlDType::F32
        );
        assert_eq!(tensor_type("mm.1.bias", 1, Q8_0, true), GgmlDType::F32);
        assert_eq!(
            tensor_type("v.blk.0.attn_q.weight", 2, GgufQuant::BF16, true),
            GgmlDType::BF16
        );
    }

    #[test]
    fn rows_that_are_not_whole_blocks_fall_back_to_f16() -> candle_core::Result<()> {
        let t = Tensor::ones((4, 48), DType::F32, &Device::Cpu)?;
        let (q, fallback) = to_qtensor("blk.0.attn_q.weight", &t, GgmlDType::Q8_0).unwrap();
        assert_eq!(q.dtype(), GgmlDType::F16);
        assert_eq!(
            fallback,
            Some(Fallback {
                tensor: "blk.0.attn_q.weight".into(),
                wanted: GgmlDType::Q8_0,
                used: GgmlDType::F16,
                row: 48
            })
        );
        let t = Tensor::ones((4, 64), DType::F32, &Device::Cpu)?;
        let (q, fallback) = to_qtensor("blk.0.attn_q.weight", &t, GgmlDType::Q8_0).unwrap();
        assert_eq!((q.dtype(), fallback), (GgmlDType::Q8_0, None));
        Ok(())
    }

    #[test]
    fn q8_0_blocks_are_ggml_reference_bytes() -> candle_core::Result<()> {
        // amax 127 → d = 1 exactly; ggml rounds half away from zero (roundf), so 2.5 → 3 and
        // -2.5 → -3 where round-half-even would give 2 and -2.
        let mut xs = vec![0f32; 32];
        xs[0] = 127.0;
        xs[1] = 2.5;
        xs[2] = -2.5;
        xs[3] = -0.4;
        let t = Tensor::from_vec(xs, (1, 32), &Device::Cpu)?;
        let q = QTensor::quantize(&t, GgmlDType::Q8_0)?;
        let bytes = q.data()?;
        assert_eq!(bytes.len(), 34);
        assert_eq!(&bytes[..2], &half::f16::from_f32(1.0).to_le_bytes());
        let qs: Vec<i8> = bytes[2..].iter().map(|&b| b as i8).collect();
        assert_eq!(&qs[..4], &[127, 3, -3, 0]);
        assert!(qs[4..].iter().all(|&v| v == 0));
        Ok(())
    }

    #[test]
    fn patch_embedding_becomes_a_conv_kernel() -> candle_core::Result<()> {
        // out = 1, patch 2: input order (y, x, c) → kernel (c, y, x).
        let t = Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((1, 12))?;
        let k = llama_cpp_layout("v.patch_embd.weight", t, 2)?;
        assert_eq!(k.dims(), [1, 3, 2, 2]);
        let v = k.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(v, [0., 3., 6., 9., 1., 4., 7., 10., 2., 5., 8., 11.]);
        let conv = Tensor::zeros((8, 1, 3), DType::F32, &Device::Cpu)?;
        let c = llama_cpp_layout("blk.0.shortconv.conv.weight", conv, 16)?;
        assert_eq!(c.dims(), [8, 3]);
        Ok(())
    }
}
