//! One linear weight held as ggml blocks, multiplied through candle's quantized matmul or our
//! CPU products.

use std::fmt;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};

use crate::model::kernels::{q4k, q4k_vnni, q6k_vnni, q8, q8_vnni};

/// A frozen `[out, in]` weight quantized into ggml blocks along `in` (one row = one output).
///
/// Products go through our CPU products where they measured faster ([`Self::cpu_product`]),
/// else through [`QMatMul`]: on the CPU candle quantizes the activation rows to the
/// block type's dot-product partner (Q8_0 for Q8_0/Q5_0, Q8_K for the k-quants) and runs its
/// AVX2/AVX-512/NEON dot products (or its repacked tile kernels where they apply); on CUDA and
/// Metal its own kernels. The dense weight is gone once this exists.
#[derive(Clone)]
pub struct QuantWeight {
    store: Store,
    out_dim: usize,
    in_dim: usize,
}

#[derive(Clone)]
enum Store {
    /// candle's blocks and its product over them.
    Ggml {
        tensor: Arc<QTensor>,
        matmul: QMatMul,
    },
    /// Q8_0 on the CPU: the same bytes regrouped for our integer kernel ([`q8::Grouped`]), not a
    /// copy beside candle's. candle's `QTensor` is rebuilt from them only when asked for
    /// ([`QuantWeight::qtensor`], or a product only `QMatMul` takes) and then kept.
    Q8Grouped {
        grouped: Arc<q8::Grouped>,
        ggml: Arc<OnceLock<Arc<QTensor>>>,
    },
    /// Q8_0 on a CPU with AVX-512 VNNI: the same bytes in 16-row tiles for our `vpdpbusd`
    /// kernel ([`q8_vnni::Tiled`]), held as `Q8Grouped` holds them elsewhere.
    Q8Tiled {
        tiled: Arc<q8_vnni::Tiled>,
        ggml: Arc<OnceLock<Arc<QTensor>>>,
    },
    /// Q4_K on the CPU: the same bytes regrouped by 8 rows for our kernel
    /// ([`q4k::Grouped`]), held as `Q8Grouped` holds Q8_0 (candle's copy rebuilt only when
    /// asked for).
    Q4KGrouped {
        grouped: Arc<q4k::Grouped>,
        ggml: Arc<OnceLock<Arc<QTensor>>>,
    },
    /// Q4_K on a CPU with AVX-512 VNNI: the same bytes in 16-row tiles for our `vpdpbusd`
    /// kernel ([`q4k_vnni::Tiled`]), every row count, held as `Q8Grouped` holds Q8_0.
    Q4KTiled {
        tiled: Arc<q4k_vnni::Tiled>,
        ggml: Arc<OnceLock<Arc<QTensor>>>,
    },
    /// Q6_K on a CPU with AVX-512 VNNI: the same values in 16-row tiles for our `vpdpbusd`
    /// kernel ([`q6k_vnni::Tiled`]), every row count, held as `Q8Grouped` holds Q8_0.
    Q6KTiled {
        tiled: Arc<q6k_vnni::Tiled>,
        ggml: Arc<OnceLock<Arc<QTensor>>>,
    },
}

/// Where a CPU Q8_0 weight is held, which decides the products it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Q8Layout {
    /// 16-row tiles for our AVX-512 VNNI kernel (`kernels::q8_vnni`), every row count.
    Tiled,
    /// Rows regrouped by 8 for our AVX2 kernels (`kernels::q8`, `prefill`).
    Grouped,
    /// candle's blocks, for `QMatMul`'s repacked VNNI tiles.
    Candle,
}

/// The layout of a CPU Q8_0 `[n, k]` weight. Where the CPU has AVX-512 VNNI, our tiles: they
/// ran the LFM2-VL-450M vision tower, prefill and decode faster than candle's repacked tiles
/// (BENCHMARKS.md, "Q8_0 on our VNNI kernel"). With AVX-VNNI but no AVX-512, candle's tiles
/// (`candle_core::quantized::repack_x86`: used where `n` is whole tiles of 16 and `k` whole
/// 256-value blocks, its private `select`, mirrored here), which ran the 450M prefill 2.6x
/// faster than our dequantized panels on an AVX-512 VNNI CPU (1156 against 429 ms; they are the
/// baseline of "Q8_0 on our VNNI kernel"). Elsewhere our regrouped rows.
/// `VLMPIPE_QUANT_PRODUCT=qmatmul` keeps candle's blocks, `int8|panels` our regrouped rows, to
/// compare.
fn q8_0_layout(n: usize, k: usize) -> Q8Layout {
    match std::env::var("VLMPIPE_QUANT_PRODUCT").as_deref() {
        Ok("int8" | "panels") => return Q8Layout::Grouped,
        Ok("qmatmul") if q8::candle_has_vnni_tiles() => return Q8Layout::Candle,
        _ => {}
    }
    if q8_vnni::available() {
        Q8Layout::Tiled
    } else if q8::candle_has_vnni_tiles() && n.is_multiple_of(16) && k.is_multiple_of(256) {
        Q8Layout::Candle
    } else {
        Q8Layout::Grouped
    }
}

/// Where a CPU Q4_K weight is held, which decides the products it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Q4KLayout {
    /// 16-row tiles for our AVX-512 VNNI kernel (`kernels::q4k_vnni`), every row count.
    Tiled,
    /// Rows regrouped by 8 for our AVX2 kernel (`kernels::q4k`): decode steps there, many rows
    /// on candle's repacked tiles over its blocks rebuilt beside ours (or every row count there
    /// with `VLMPIPE_QUANT_PRODUCT=int8`).
    Grouped,
    /// candle's blocks, every product through `QMatMul`.
    Candle,
}

/// The layout of a CPU Q4_K weight. Where the CPU has AVX-512 VNNI, our tiles: they ran the
/// LFM2-VL-450M prefill and decode faster than candle's repacked tiles and our regrouped rows
/// (BENCHMARKS.md, "Q4_K on our VNNI kernel"), from one copy. Elsewhere our regrouped rows.
/// `VLMPIPE_QUANT_PRODUCT=qmatmul` keeps candle's blocks, `grouped` (the default before the
/// tiles) and `int8` our regrouped rows, to compare.
fn q4_k_layout() -> Q4KLayout {
    match std::env::var("VLMPIPE_QUANT_PRODUCT").as_deref() {
        Ok("qmatmul") => Q4KLayout::Candle,
        Ok("grouped" | "int8") => Q4KLayout::Grouped,
        _ if q4k_vnni::available() => Q4KLayout::Tiled,
        _ => Q4KLayout::Grouped,
    }
}

/// Whether a CPU Q6_K weight goes into our tiles: where the CPU has AVX-512 VNNI, since one
/// decode step's LM head (the `--quant q4_k` tied embedding) ran there at the read time of its
/// bytes, 0.7x candle's block dot, and 2 to 270 rows 0.6-0.73x `QMatMul`'s time (BENCHMARKS.md,
/// "The Q6_K head on our VNNI kernel"). `VLMPIPE_QUANT_PRODUCT=qmatmul` keeps candle's blocks,
/// to compare.
fn q6_k_tiled() -> bool {
    std::env::var("VLMPIPE_QUANT_PRODUCT").as_deref() != Ok("qmatmul") && q6k_vnni::available()
}

impl fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuantWeight")
            .field("dtype", &self.dtype())
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
        if dtype == GgmlDType::Q8_0 && device.is_cpu() {
            let layout = q8_0_layout(out_dim, in_dim);
            let data = tensor.data()?;
            let kb = in_dim / q8::QK8_0;
            let store = match (layout, q8::view_blocks(&data)) {
                (Q8Layout::Tiled, Some(blocks)) => Some(Store::Q8Tiled {
                    tiled: Arc::new(q8_vnni::Tiled::from_blocks(blocks, out_dim, kb)),
                    ggml: Arc::new(OnceLock::new()),
                }),
                (Q8Layout::Grouped, Some(blocks)) => Some(Store::Q8Grouped {
                    grouped: Arc::new(q8::Grouped::from_blocks(blocks, out_dim, kb)),
                    ggml: Arc::new(OnceLock::new()),
                }),
                _ => None,
            };
            if let Some(store) = store {
                return Ok(Self {
                    store,
                    out_dim,
                    in_dim,
                });
            }
        }
        if dtype == GgmlDType::Q4K && device.is_cpu() {
            let kb = in_dim / q4k::QK_K;
            let store = match q4_k_layout() {
                Q4KLayout::Tiled => Some(Store::Q4KTiled {
                    tiled: Arc::new(q4k_vnni::Tiled::from_ggml(&tensor.data()?, out_dim, kb)),
                    ggml: Arc::new(OnceLock::new()),
                }),
                Q4KLayout::Grouped => Some(Store::Q4KGrouped {
                    grouped: Arc::new(q4k::Grouped::from_ggml(&tensor.data()?, out_dim, kb)),
                    ggml: Arc::new(OnceLock::new()),
                }),
                Q4KLayout::Candle => None,
            };
            if let Some(store) = store {
                return Ok(Self {
                    store,
                    out_dim,
                    in_dim,
                });
            }
        }
        if dtype == GgmlDType::Q6K && device.is_cpu() && q6_k_tiled() {
            let kb = in_dim / q4k::QK_K;
            return Ok(Self {
                store: Store::Q6KTiled {
                    tiled: Arc::new(q6k_vnni::Tiled::from_ggml(&tensor.data()?, out_dim, kb)),
                    ggml: Arc::new(OnceLock::new()),
                },
                out_dim,
                in_dim,
            });
        }
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
            store: Store::Ggml { tensor, matmul },
            out_dim,
            in_dim,
        })
    }

    /// The block type.
    pub(crate) fn dtype(&self) -> GgmlDType {
        match &self.store {
            Store::Ggml { tensor, .. } => tensor.dtype(),
            Store::Q8Grouped { .. } | Store::Q8Tiled { .. } => GgmlDType::Q8_0,
            Store::Q4KGrouped { .. } | Store::Q4KTiled { .. } => GgmlDType::Q4K,
            Store::Q6KTiled { .. } => GgmlDType::Q6K,
        }
    }

    pub(crate) fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub(crate) fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Bytes of the blocks (what a GGUF file holds for this tensor).
    pub fn storage_bytes(&self) -> usize {
        match &self.store {
            Store::Ggml { tensor, .. } => tensor.storage_size_in_bytes(),
            Store::Q8Grouped { grouped, .. } => grouped.ggml_bytes(),
            Store::Q8Tiled { tiled, .. } => tiled.ggml_bytes(),
            Store::Q4KGrouped { grouped, .. } => grouped.ggml_bytes(),
            Store::Q4KTiled { tiled, .. } => tiled.ggml_bytes(),
            Store::Q6KTiled { tiled, .. } => tiled.ggml_bytes(),
        }
    }

    /// The blocks as candle (and a GGUF file) holds them. Regrouped or tiled Q8_0, Q4_K and Q6_K
    /// weights are put back into ggml's order on the first call, and that copy is kept beside
    /// them.
    pub fn qtensor(&self) -> Result<Arc<QTensor>> {
        match &self.store {
            Store::Ggml { tensor, .. } => Ok(tensor.clone()),
            Store::Q8Grouped { grouped, ggml } => self.rebuilt(ggml, GgmlDType::Q8_0, || {
                q8::blocks_as_bytes(&grouped.to_blocks()).to_vec()
            }),
            Store::Q8Tiled { tiled, ggml } => self.rebuilt(ggml, GgmlDType::Q8_0, || {
                q8::blocks_as_bytes(&tiled.to_blocks()).to_vec()
            }),
            Store::Q4KGrouped { grouped, ggml } => {
                self.rebuilt(ggml, GgmlDType::Q4K, || grouped.to_ggml())
            }
            Store::Q4KTiled { tiled, ggml } => {
                self.rebuilt(ggml, GgmlDType::Q4K, || tiled.to_ggml())
            }
            Store::Q6KTiled { tiled, ggml } => {
                self.rebuilt(ggml, GgmlDType::Q6K, || tiled.to_ggml())
            }
        }
    }

    /// candle's copy of regrouped blocks, from `ggml_bytes()` (ggml's order) on the first call,
    /// then kept in `ggml`.
    fn rebuilt(
        &self,
        ggml: &OnceLock<Arc<QTensor>>,
        dtype: GgmlDType,
        ggml_bytes: impl FnOnce() -> Vec<u8>,
    ) -> Result<Arc<QTensor>> {
        if let Some(q) = ggml.get() {
            return Ok(q.clone());
        }
        let q = Arc::new(qtensor_from_ggml(
            dtype,
            &ggml_bytes(),
            vec![self.out_dim, self.in_dim],
            &Device::Cpu,
        )?);
        Ok(ggml.get_or_init(|| q).clone())
    }

    /// candle's product over these blocks (built on first use for regrouped weights).
    fn qmatmul(&self) -> Result<QMatMul> {
        match &self.store {
            Store::Ggml { matmul, .. } => Ok(matmul.clone()),
            Store::Q8Grouped { .. }
            | Store::Q8Tiled { .. }
            | Store::Q4KGrouped { .. }
            | Store::Q4KTiled { .. }
            | Store::Q6KTiled { .. } => Ok(QMatMul::QTensor(self.qtensor()?)),
        }
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
            None => self.qmatmul()?.forward(&x)?,
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
    /// tiled Q8_0 blocks (AVX-512 VNNI CPUs) through [`q8_vnni`] for every row count; regrouped
    /// Q8_0 blocks through the integer kernel ([`crate::model::kernels::q8`], ggml's block dot
    /// values) or, for many rows, the panel-dequantized f32 product ([`super::prefill`]) where
    /// that measured faster; tiled Q4_K and Q6_K blocks (AVX-512 VNNI CPUs) through
    /// [`q4k_vnni`] and [`q6k_vnni`] for every row count; a decode step by regrouped Q4_K blocks through
    /// [`crate::model::kernels::q4k`], by other k-quant blocks through [`super::matvec`]. `None`
    /// (use `QMatMul`) otherwise: other block types, another device or dtype.
    /// `VLMPIPE_QUANT_PRODUCT=qmatmul` (or `int8`, `panels` for Q8_0, `int8`, `grouped` for
    /// Q4_K) forces a path, to compare.
    fn cpu_product(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if x.track_op() || !x.device().is_cpu() {
            return Ok(None);
        }
        let forced = std::env::var("VLMPIPE_QUANT_PRODUCT").ok();
        if forced.as_deref() == Some("qmatmul") {
            return Ok(None);
        }
        let rows = x.elem_count() / self.in_dim.max(1);
        let (m, k, n) = (rows, self.in_dim, self.out_dim);
        let tensor = match &self.store {
            Store::Q8Grouped { grouped, .. } => {
                let panels = match forced.as_deref() {
                    Some("int8") => false,
                    Some("panels") => true,
                    _ => super::prefill::choose_path(rows) == super::prefill::Path::Panels,
                };
                // Our kernels take f32 activations: half-precision ones are widened first.
                let x32 = x.to_dtype(DType::F32)?;
                let y = crate::model::ops::with_cpu_f32(&x32, |xs| {
                    if panels {
                        super::prefill::grouped_dequantized_matmul(grouped, xs, m)
                    } else {
                        super::prefill::int8_matmul(grouped, xs, m)
                    }
                })?;
                let Some(y) = y else { return Ok(None) };
                y
            }
            Store::Q8Tiled { tiled, .. } => {
                if x.elem_count() != m * k {
                    return Ok(None);
                }
                let x32 = x.to_dtype(DType::F32)?;
                crate::model::ops::with_cpu_f32(&x32, |xs| {
                    q8_vnni::matmul(tiled, &q8_vnni::quantize_rows(xs, k), m)
                })?
            }
            Store::Q4KTiled { tiled, .. } => {
                if x.elem_count() != m * k {
                    return Ok(None);
                }
                let x32 = x.to_dtype(DType::F32)?;
                crate::model::ops::with_cpu_f32(&x32, |xs| {
                    q4k_vnni::matmul(tiled, &q4k::quantize_rows(xs, k), m)
                })?
            }
            Store::Q6KTiled { tiled, .. } => {
                if x.elem_count() != m * k {
                    return Ok(None);
                }
                let x32 = x.to_dtype(DType::F32)?;
                crate::model::ops::with_cpu_f32(&x32, |xs| {
                    q6k_vnni::matmul(tiled, &q4k::quantize_rows(xs, k), m)
                })?
            }
            Store::Q4KGrouped { grouped, .. } => {
                // Many rows (a prefill, the vision side) go to candle's repacked tiles: they ran
                // a prefill 1.25-1.6x faster than this kernel (BENCHMARKS.md, "Q4_K decode over
                // rows regrouped by 8"), and a classification is mostly prefill. That rebuilds
                // candle's blocks once beside ours (`qtensor`), about 150 MiB at the 450M
                // shapes; `VLMPIPE_QUANT_PRODUCT=int8` keeps every row count here instead.
                if rows > super::matvec::MAX_ROWS && forced.as_deref() != Some("int8") {
                    return Ok(None);
                }
                let x32 = x.to_dtype(DType::F32)?;
                crate::model::ops::with_cpu_f32(&x32, |xs| {
                    q4k::matmul(grouped, &q4k::quantize_rows(xs, k), m)
                })?
            }
            Store::Ggml { matmul, .. } => {
                let QMatMul::QTensor(q) = matmul else {
                    return Ok(None);
                };
                let dtype = q.dtype();
                let few_rows = rows <= super::matvec::MAX_ROWS;
                if !(crate::model::ops::is_cpu_f32(x)
                    && super::matvec::supported(dtype)
                    && few_rows)
                {
                    // Many rows by k-quant blocks: candle's repacked tiles measured faster than
                    // the dequantized panels (`prefill::tests::crossover`: Q4_K at 270 rows
                    // 43 ms against 51).
                    return Ok(None);
                }
                let bytes = q.data()?;
                let y = crate::model::ops::with_cpu_f32(x, |xs| {
                    super::matvec::matvec(dtype, &bytes, xs, m, k, n)
                })?;
                let Some(y) = y else { return Ok(None) };
                y
            }
        };
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("x has an `in` dimension") = n;
        Ok(Some(Tensor::from_vec(tensor, dims, x.device())?))
    }

    /// The dequantized `[out, in]` weight in f32 (what every product effectively multiplies by).
    pub fn to_tensor(&self) -> Result<Tensor> {
        let dense = |dequantize_rows: &dyn Fn(std::ops::Range<usize>, &mut [f32])| {
            let mut w = vec![0f32; self.out_dim * self.in_dim];
            dequantize_rows(0..self.out_dim, &mut w);
            Tensor::from_vec(w, (self.out_dim, self.in_dim), &Device::Cpu)
        };
        match &self.store {
            Store::Ggml { tensor, .. } => tensor.dequantize(&tensor.device()),
            Store::Q8Grouped { grouped, .. } => dense(&|r, w| grouped.dequantize_rows(r, w)),
            Store::Q8Tiled { tiled, .. } => dense(&|r, w| tiled.dequantize_rows(r, w)),
            Store::Q4KGrouped { grouped, .. } => dense(&|r, w| grouped.dequantize_rows(r, w)),
            Store::Q4KTiled { tiled, .. } => dense(&|r, w| tiled.dequantize_rows(r, w)),
            Store::Q6KTiled { tiled, .. } => dense(&|r, w| tiled.dequantize_rows(r, w)),
        }
    }

    /// Rows `ids` dequantized, `[ids.len(), in]` in f32: a tied embedding table read from the
    /// quantized LM head, as llama.cpp reads `token_embd`.
    pub(crate) fn gather_rows(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.store {
            Store::Ggml { tensor, .. } => tensor.embedding(ids),
            Store::Q8Grouped { grouped, .. } => {
                self.gather_dequantized(ids, |r, row| grouped.dequantize_rows(r..r + 1, row))
            }
            Store::Q8Tiled { tiled, .. } => {
                self.gather_dequantized(ids, |r, row| tiled.dequantize_rows(r..r + 1, row))
            }
            Store::Q4KGrouped { grouped, .. } => {
                self.gather_dequantized(ids, |r, row| grouped.dequantize_rows(r..r + 1, row))
            }
            Store::Q4KTiled { tiled, .. } => {
                self.gather_dequantized(ids, |r, row| tiled.dequantize_rows(r..r + 1, row))
            }
            Store::Q6KTiled { tiled, .. } => {
                self.gather_dequantized(ids, |r, row| tiled.dequantize_rows(r..r + 1, row))
            }
        }
    }

    /// [`Self::gather_rows`] through a row dequantizer of regrouped blocks.
    fn gather_dequantized(
        &self,
        ids: &Tensor,
        dequantize_row: impl Fn(usize, &mut [f32]),
    ) -> Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let k = self.in_dim;
        dims.push(k);
        let mut out = vec![0f32; ids.len() * k];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(k.max(1))) {
            let id = id as usize;
            if id >= self.out_dim {
                candle_core::bail!("embedding row {id} of {} rows", self.out_dim)
            }
            dequantize_row(id, row);
        }
        Tensor::from_vec(out, dims, &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `got` is `want` bit for bit (a product routed to that kernel).
    fn assert_same_bits(got: &[f32], want: &[f32], rows: usize) {
        let same = got
            .iter()
            .zip(want)
            .all(|(g, w)| g.to_bits() == w.to_bits());
        assert!(same, "{rows} rows: not the tiled kernel's values");
    }

    /// The dequantized matrix and gathered embedding rows of `q` are candle's for the same
    /// blocks, bit for bit.
    fn assert_reads_as_candle(q: &QuantWeight, want_q: &QTensor) {
        let dev = Device::Cpu;
        let diff = (q.to_tensor().unwrap() - want_q.dequantize(&dev).unwrap()).unwrap();
        let worst = diff.abs().unwrap().max_all().unwrap();
        assert_eq!(worst.to_scalar::<f32>().unwrap(), 0.0);
        let ids = Tensor::new(&[[3u32, 69], [0, 3]], &dev).unwrap();
        let diff = (q.gather_rows(&ids).unwrap() - want_q.embedding(&ids).unwrap()).unwrap();
        let worst = diff.abs().unwrap().max_all().unwrap();
        assert_eq!(worst.to_scalar::<f32>().unwrap(), 0.0);
    }

    /// A CPU Q8_0 weight holds its blocks once, regrouped (or tiled where the CPU has AVX-512
    /// VNNI): products of one row (decode), a few and many rows (prefill), a half-precision
    /// input, the dequantized matrix and gathered embedding rows all come from them without
    /// rebuilding candle's copy, and give the values of the kernel their layout routes to
    /// (regrouped: candle's block dot, or the f32 product for many rows; tiled: our VNNI
    /// kernel's, bit for bit); the copy is made only when the ggml blocks themselves are asked
    /// for, and they are the blocks quantized.
    #[test]
    fn cpu_q8_0_weights_are_held_once_and_answer_as_their_kernel() {
        let dev = Device::Cpu;
        let (n, k) = (70, 96);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q = QuantWeight::quantize(&w, GgmlDType::Q8_0).unwrap();
        let want_q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let want_bytes = want_q.data().unwrap().into_owned();
        let want_blocks = q8::view_blocks(&want_bytes).unwrap();
        let (ggml, tiled) = match &q.store {
            Store::Q8Grouped { ggml, .. } => (ggml, false),
            Store::Q8Tiled { ggml, .. } => (ggml, true),
            _ => panic!("a CPU Q8_0 weight is neither regrouped nor tiled"),
        };
        assert_eq!(tiled, q8_vnni::available());
        for rows in [1, 3, 70] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let got = q.linear(&x, None).unwrap();
            assert_eq!(got.dims(), &[rows, n]);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if tiled {
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let t = q8_vnni::Tiled::from_blocks(want_blocks, n, k / 32);
                let want = q8_vnni::matmul(&t, &q8_vnni::quantize_rows(&xs, k), rows);
                assert_same_bits(&got, &want, rows);
                continue;
            }
            let want = if rows < super::super::prefill::PANEL_MIN_ROWS {
                crate::model::quant::qmatmul_values(&want_q, &x)
            } else {
                let dense = want_q.dequantize(&dev).unwrap();
                x.matmul(&dense.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{rows} rows: {g} vs {w}"
                );
            }
        }
        let half = Tensor::randn(0f32, 1.0, (1, k), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        assert_eq!(q.linear(&half, None).unwrap().dtype(), DType::BF16);
        assert_reads_as_candle(&q, &want_q);
        let ids = Tensor::new(&[[3u32, 69], [0, 3]], &dev).unwrap();
        assert_eq!(q.gather_rows(&ids).unwrap().dims(), &[2, 2, k]);
        assert!(
            ggml.get().is_none(),
            "candle's copy was rebuilt by a product"
        );
        assert_eq!(q.storage_bytes(), n * k / 32 * 34);
        assert_eq!(q.qtensor().unwrap().data().unwrap(), want_q.data().unwrap());
        assert!(ggml.get().is_some());
    }

    /// A CPU Q4_K weight holds its blocks once, regrouped (or tiled where the CPU has AVX-512
    /// VNNI; `storage_bytes` is ggml's size): products of 1 and 3 rows give candle's block dot
    /// (`vec_dot` per output) within f32 summation-order rounding, and tiled weights give their
    /// kernel's values bit for bit at 1, 3 and 70 rows, without rebuilding candle's copy; the
    /// dequantized matrix and gathered rows equal candle's bit for bit; the copy rebuilt on
    /// request is the blocks quantized.
    #[test]
    fn cpu_q4_k_weights_are_held_once_and_answer_as_candle() {
        let dev = Device::Cpu;
        let (n, k) = (70, 512);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q = QuantWeight::quantize(&w, GgmlDType::Q4K).unwrap();
        let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let blocks = super::super::ggml_q4k::quantize_q4_k(&values);
        let want_q =
            Arc::new(qtensor_from_ggml(GgmlDType::Q4K, &blocks, vec![n, k], &dev).unwrap());
        let (ggml, tiled) = match &q.store {
            Store::Q4KGrouped { ggml, .. } => (ggml, false),
            Store::Q4KTiled { ggml, .. } => (ggml, true),
            _ => panic!("a CPU Q4_K weight is neither regrouped nor tiled"),
        };
        assert_eq!(tiled, q4k_vnni::available());
        let bytes = want_q.data().unwrap().into_owned();
        // Many rows by regrouped blocks go to candle's tiles (its copy rebuilt): tiles only.
        let row_counts: &[usize] = if tiled { &[1, 3, 70] } else { &[1, 3] };
        for &rows in row_counts {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = q.linear(&x, None).unwrap();
            assert_eq!(got.dims(), &[rows, n]);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if tiled {
                let t = q4k_vnni::Tiled::from_ggml(&bytes, n, k / 256);
                let want = q4k_vnni::matmul(&t, &q4k::quantize_rows(&xs, k), rows);
                assert_same_bits(&got, &want, rows);
            }
            if rows > super::super::matvec::MAX_ROWS {
                continue;
            }
            let want = super::super::matvec::matvec(GgmlDType::Q4K, &bytes, &xs, rows, k, n)
                .expect("candle's block dot");
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * scale, "{rows} rows: {g} vs {w}");
            }
        }
        assert_reads_as_candle(&q, &want_q);
        assert!(
            ggml.get().is_none(),
            "candle's copy was rebuilt by a product"
        );
        assert_eq!(q.storage_bytes(), n * k / 256 * 144);
        assert_eq!(q.qtensor().unwrap().data().unwrap(), want_q.data().unwrap());
        assert!(ggml.get().is_some());
    }

    /// A CPU Q6_K weight (the `--quant q4_k` LM head) is held once, tiled where the CPU has
    /// AVX-512 VNNI: products of 1, 3 and 70 rows give the tiled kernel's values bit for bit
    /// and candle's product (its block dot for few rows, `QMatMul` for many) within f32
    /// summation-order rounding, without rebuilding candle's copy; the dequantized matrix and
    /// gathered rows equal candle's bit for bit; the copy rebuilt on request is the blocks
    /// quantized.
    #[test]
    fn cpu_q6_k_weights_are_held_once_and_answer_as_candle() {
        let dev = Device::Cpu;
        let (n, k) = (70, 512);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q = QuantWeight::quantize(&w, GgmlDType::Q6K).unwrap();
        let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let blocks = super::super::ggml_q4k::quantize_q6_k(&values);
        let want_q =
            Arc::new(qtensor_from_ggml(GgmlDType::Q6K, &blocks, vec![n, k], &dev).unwrap());
        let ggml = match &q.store {
            Store::Q6KTiled { ggml, .. } => Some(ggml),
            Store::Ggml { .. } => None,
            _ => panic!("a CPU Q6_K weight is neither tiled nor candle's"),
        };
        assert_eq!(ggml.is_some(), q6k_vnni::available());
        for rows in [1, 3, 70] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = q.linear(&x, None).unwrap();
            assert_eq!(got.dims(), &[rows, n]);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if ggml.is_some() {
                let t = q6k_vnni::Tiled::from_ggml(&blocks, n, k / 256);
                let want = q6k_vnni::matmul(&t, &q4k::quantize_rows(&xs, k), rows);
                assert_same_bits(&got, &want, rows);
            }
            let want = crate::model::quant::qmatmul_values(&want_q, &x);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * scale, "{rows} rows: {g} vs {w}");
            }
        }
        assert_reads_as_candle(&q, &want_q);
        if let Some(ggml) = ggml {
            assert!(
                ggml.get().is_none(),
                "candle's copy was rebuilt by a product"
            );
        }
        assert_eq!(q.storage_bytes(), n * k / 256 * 210);
        assert_eq!(q.qtensor().unwrap().data().unwrap(), want_q.data().unwrap());
        if let Some(ggml) = ggml {
            assert!(ggml.get().is_some());
        }
    }

    /// Activations are quantized to Q8_K exactly as candle's `BlockQ8K::from_float` does.
    #[test]
    fn q8_k_activations_are_candles() {
        use candle_core::quantized::k_quants::{BlockQ8K, GgmlType};
        let mut x: Vec<f32> = (0..3 * 256)
            .map(|i| ((i * 7919) % 1001) as f32 / 250.0 - 2.0)
            .collect();
        x[5] = 2.5;
        x[300] = -3.0;
        x[512..768].fill(0.0);
        let ours = q4k::quantize_rows(&x, 256);
        let mut theirs = vec![BlockQ8K::zeros(); 3];
        BlockQ8K::from_float(&x, &mut theirs);
        assert_eq!(std::mem::size_of_val(ours.as_slice()), 3 * 292);
        // SAFETY: both are `repr(C)` blocks of the same 292 bytes, no padding (size asserted
        // by both crates), read as bytes.
        let (a, b): (&[u8], &[u8]) = unsafe {
            (
                std::slice::from_raw_parts(ours.as_ptr().cast(), 3 * 292),
                std::slice::from_raw_parts(theirs.as_ptr().cast(), 3 * 292),
            )
        };
        assert_eq!(a, b);
    }
}
