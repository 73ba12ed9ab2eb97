//! One linear weight held as ggml blocks, multiplied through candle's quantized matmul.

use std::fmt;
use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};

/// Which of our CPU products multiplies (see [`QuantWeight::cpu_product`]).
#[derive(Clone, Copy)]
enum Product {
    Int8,
    Panels,
    Matvec,
}

/// A frozen `[out, in]` weight quantized into ggml blocks along `in` (one row = one output).
///
/// Products go through our CPU products where they measured faster ([`Self::cpu_product`]),
/// else through [`QMatMul`]: on the CPU candle quantizes the activation rows to the
/// block type's dot-product partner (Q8_0 for Q8_0/Q5_0, Q8_K for the k-quants) and runs its
/// AVX2/AVX-512/NEON dot products (or its repacked tile kernels where they apply); on CUDA and
/// Metal its own kernels. The dense weight is gone once this exists.
#[derive(Clone)]
pub struct QuantWeight {
    tensor: Arc<QTensor>,
    matmul: QMatMul,
    out_dim: usize,
    in_dim: usize,
}

impl fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuantWeight")
            .field("dtype", &self.tensor.dtype())
            .field("shape", &[self.out_dim, self.in_dim])
            .finish()
    }
}

impl QuantWeight {
    /// Quantizes `w [out, in]` (any float dtype, any device) into `dtype` blocks on `w`'s device;
    /// the rows must be whole blocks (see [`super::choose_type`]).
    pub fn quantize(w: &Tensor, dtype: GgmlDType) -> Result<Self> {
        let (out_dim, in_dim) = w.dims2()?;
        if !in_dim.is_multiple_of(dtype.block_size()) {
            candle_core::bail!(
                "cannot quantize a [{out_dim}, {in_dim}] weight to {dtype:?}: rows of {in_dim} are \
                 not whole blocks of {}",
                dtype.block_size()
            )
        }
        // The quantizers run on the host; the blocks then go to the weight's device.
        let host = w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let ggml_port = match dtype {
            GgmlDType::Q4K => Some(super::ggml_q4k::quantize_q4_k as fn(&[f32]) -> Vec<u8>),
            GgmlDType::Q6K => Some(super::ggml_q4k::quantize_q6_k as fn(&[f32]) -> Vec<u8>),
            _ => None,
        };
        if let Some(quantize) = ggml_port {
            // ggml's own algorithms, not candle's older ports (see `ggml_q4k`).
            let values = host.flatten_all()?.to_vec1::<f32>()?;
            let bytes = quantize(&values);
            let q = qtensor_from_ggml(dtype, &bytes, vec![out_dim, in_dim], w.device())?;
            return Self::from_qtensor(Arc::new(q));
        }
        Self::from_qtensor(Arc::new(QTensor::quantize_onto(&host, dtype, w.device())?))
    }

    /// Wraps blocks already made (a GGUF file's tensor, `[out, in]`), on their own device.
    pub(crate) fn from_qtensor(tensor: Arc<QTensor>) -> Result<Self> {
        let (out_dim, in_dim) = tensor.shape().dims2()?;
        let dtype = tensor.dtype();
        if !in_dim.is_multiple_of(dtype.block_size()) {
            candle_core::bail!(
                "a [{out_dim}, {in_dim}] {dtype:?} weight: rows of {in_dim} are not whole blocks \
                 of {}",
                dtype.block_size()
            )
        }
        let device = tensor.device();
        // candle's Q5_0/Q5_1 dot products insist on an even number of blocks a row (a debug
        // assertion; the arithmetic would be right). Such a row (a fallback on narrow test
        // models, never at LFM2-VL-450M's widths) multiplies by the dequantized blocks instead:
        // the same weight values, f32 activations.
        let odd_blocks = (in_dim / dtype.block_size()) % 2 == 1;
        let matmul = if odd_blocks && matches!(dtype, GgmlDType::Q5_0 | GgmlDType::Q5_1) {
            QMatMul::Tensor(tensor.dequantize(&device)?)
        } else {
            QMatMul::QTensor(tensor.clone())
        };
        Ok(Self {
            matmul,
            tensor,
            out_dim,
            in_dim,
        })
    }

    pub(crate) fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub(crate) fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Bytes of the blocks (what a GGUF file holds for this tensor).
    pub fn storage_bytes(&self) -> usize {
        self.tensor.storage_size_in_bytes()
    }

    /// The blocks themselves, as a GGUF file stores them.
    pub fn qtensor(&self) -> &QTensor {
        &self.tensor
    }

    /// `x [rows, in] -> x W^T + b [rows, out]`, in `x`'s dtype.
    pub(crate) fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let in_dtype = x.dtype();
        // candle's CPU op takes f32/f16/bf16; its GPU kernels take f32.
        let x = match (x.device(), in_dtype) {
            (Device::Cpu, _) | (_, DType::F32) => x.contiguous()?,
            _ => x.to_dtype(DType::F32)?.contiguous()?,
        };
        let mut y = match self.cpu_product(&x)? {
            Some(y) => y,
            None => self.matmul.forward(&x)?,
        };
        if y.dtype() != in_dtype {
            y = y.to_dtype(in_dtype)?;
        }
        match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(in_dtype)?),
            None => Ok(y),
        }
    }

    /// An untracked CPU f32 `x [.., in]` by our own CPU products where they beat `QMatMul`:
    /// Q8_0 blocks through the integer kernel ([`crate::model::kernels::q8`], `QMatMul`'s
    /// values) or, for many rows, the panel-dequantized f32 product ([`super::prefill`]) where
    /// that measured faster; a decode step by k-quant blocks through [`super::matvec`]. `None`
    /// (use `QMatMul`) otherwise: other block types, another device or dtype.
    /// `VLMPIPE_QUANT_PRODUCT=qmatmul` (or `int8`, `panels` for Q8_0) forces a path, to compare.
    fn cpu_product(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let QMatMul::QTensor(q) = &self.matmul else {
            return Ok(None);
        };
        if !crate::model::ops::is_cpu_f32(x) || x.track_op() {
            return Ok(None);
        }
        let rows = x.elem_count() / self.in_dim.max(1);
        let forced = std::env::var("VLMPIPE_QUANT_PRODUCT").ok();
        let dtype = q.dtype();
        let product = match (dtype, forced.as_deref()) {
            (_, Some("qmatmul")) => return Ok(None),
            (GgmlDType::Q8_0, Some("int8")) => Product::Int8,
            (GgmlDType::Q8_0, Some("panels")) => Product::Panels,
            (GgmlDType::Q8_0, _) => match super::prefill::choose_path(rows) {
                super::prefill::Path::Int8 => Product::Int8,
                super::prefill::Path::Panels => Product::Panels,
            },
            (t, _) if super::matvec::supported(t) && rows <= super::matvec::MAX_ROWS => {
                Product::Matvec
            }
            _ => return Ok(None),
        };
        let bytes = q.data()?;
        let (m, k, n) = (rows, self.in_dim, self.out_dim);
        let y = crate::model::ops::with_cpu_f32(x, |xs| match product {
            Product::Int8 => super::prefill::int8_matmul(&bytes, xs, m, k, n),
            Product::Panels => super::prefill::dequantized_matmul(dtype, &bytes, xs, m, k, n),
            Product::Matvec => super::matvec::matvec(dtype, &bytes, xs, m, k, n),
        })?;
        let Some(y) = y else { return Ok(None) };
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("x has an `in` dimension") = n;
        Ok(Some(Tensor::from_vec(y, dims, x.device())?))
    }

    /// The dequantized `[out, in]` weight in f32 (what every product effectively multiplies by).
    pub fn to_tensor(&self) -> Result<Tensor> {
        self.tensor.dequantize(&self.tensor.device())
    }

    /// Rows `ids` dequantized, `[ids.len(), in]` in f32: a tied embedding table read from the
    /// quantized LM head, as llama.cpp reads `token_embd`.
    pub(crate) fn gather_rows(&self, ids: &Tensor) -> Result<Tensor> {
        self.tensor.embedding(ids)
    }
}
