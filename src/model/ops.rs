//! Numerical building blocks shared by the vision tower, projector and decoder.
//!
//! candle's fused CPU kernels (`rms_norm`, `layer_norm`, `softmax_last_dim`) record no backward
//! pass, so each helper here uses them for inference and falls back to composite, differentiable
//! ops when a tensor takes part in autograd (LoRA training backpropagates through frozen layers).
//!
//! On CPU with f32, GELU-tanh and SiLU are our own: candle 0.11 evaluates `tanh`/`exp` per element
//! with libm (GELU-tanh 3-5x slower than torch); ours use a polynomial `exp` the compiler
//! vectorises (measured 2.6x faster than candle's GELU at the vision MLP shape). candle also runs a
//! single-row matmul (every decode step) on one thread, so [`matmul_wt`] splits it over the pool.
//!
//! This is the bridge between tensors and [`crate::model::kernels`]: the only module that hands a
//! tensor's storage to a kernel as a slice (including the tensor side of
//! [`PackedWeight`], defined here so the kernel file knows no tensor).

use std::sync::Arc;

use candle_core::{D, DType, Device, Result, Tensor};
use rayon::prelude::*;

use crate::model::autograd;
use crate::model::config::Activation;
use crate::model::kernels::ViewSpan;
use crate::model::kernels::backward::profile;
use crate::model::kernels::packed::{Kernel, PackedWeight};
use crate::model::kernels::{cpu, packed_grad};

/// True when gradients must flow through `xs` (it is, or derives from, a `Var`).
fn tracks(xs: &Tensor) -> bool {
    xs.track_op()
}

/// candle's variable for how long its idle CPU workers spin before they sleep.
const CANDLE_SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Tells candle's CPU workers to sleep as soon as they run out of work, unless the user set
/// [`CANDLE_SPIN_LIMIT`] themselves.
///
/// candle 0.11 runs element-wise ops of 64K elements or more (residual adds, the autograd's
/// gradient sums) on a pool of its own, one thread fewer than the cores, beside rayon's pool that
/// runs our products. After each such op its workers spin 25,000 `pause`s before sleeping, on the
/// cores rayon's threads are computing on: 6.0% of a 450M LoRA step's CPU samples (`perf`), 1.0%
/// once told to sleep at once (BENCHMARKS.md, "The step on rayon's threads"; the step's wall time
/// moved within its run-to-run noise). Waking a sleeping worker costs a futex call per op, well
/// under the op's own time at that size. Must run before any other thread exists: it sets an
/// environment variable, which candle reads when its pool starts.
pub(crate) fn park_candle_workers_when_idle() {
    if std::env::var_os(CANDLE_SPIN_LIMIT).is_none() {
        // SAFETY: called first thing in `main` (via `tune_process`), while no other thread exists
        // that could read the environment concurrently.
        unsafe { std::env::set_var(CANDLE_SPIN_LIMIT, "0") };
    }
}

/// Runs `f` on one of rayon's compute threads (at once when already on one).
///
/// A forward pass makes a few hundred parallel products and element-wise ops. Called from a
/// thread outside the pool, each of them hands its work to the pool's threads and puts the
/// caller to sleep until they finish, and between them the pool's threads spin or sleep while
/// the caller runs the small ops: three threads taking turns on two cores. A decode step on
/// Q8_0 weights spent about a tenth of its time in that scheduling (`perf`, 2 cores); run on a
/// pool thread, the caller works on its own products' tasks instead.
pub(crate) fn on_compute_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// `x [m, k] @ w[n, k]^T -> [m, n]`, the layout of every PyTorch `Linear` weight.
pub(crate) fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, _) = x.dims2()?;
    let (n, _) = w.dims2()?;
    if tracks(x) && !tracks(w) && is_cpu_f32(x) && w.dtype() == DType::F32 {
        return frozen_weight_matmul_wt(x, w);
    }
    let threads = rayon::current_num_threads();
    // Decode steps multiply one row: candle runs that on one thread, which reads the weight at
    // about half the machine's bandwidth. Splitting the output rows over the pool fixes that.
    if m <= 4 && n >= 1024 && threads > 1 && is_cpu_f32(x) && !tracks(x) && !tracks(w) {
        let chunk = n.div_ceil(threads);
        let parts: Vec<Result<Tensor>> = (0..threads)
            .into_par_iter()
            .filter_map(|i| {
                let start = i * chunk;
                (start < n).then(|| {
                    let len = chunk.min(n - start);
                    x.matmul(&w.narrow(0, start, len)?.t()?)
                })
            })
            .collect();
        let parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
        return Tensor::cat(&parts, 1);
    }
    if let Some(y) = cpu_linear(x, w, None)? {
        return Ok(y);
    }
    x.matmul(&w.t()?)
}

/// `x [m, k] @ w[n, k]^T + b`, the bias added inside the product on CPU f32.
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (m, _) = x.dims2()?;
    if m > 4
        && !b.is_some_and(tracks)
        && let Some(y) = cpu_linear(x, w, b)?
    {
        return Ok(y);
    }
    let y = matmul_wt(x, w)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// [`cpu::linear`] when every operand is an untracked CPU f32 tensor; `None` otherwise.
fn cpu_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    if !is_cpu_f32(x) || !is_cpu_f32(w) || tracks(x) || tracks(w) {
        return Ok(None);
    }
    if b.is_some_and(|b| !is_cpu_f32(b) || tracks(b)) {
        return Ok(None);
    }
    let ((m, k), (n, w_k)) = (x.dims2()?, w.dims2()?);
    if k != w_k || b.is_some_and(|b| b.dims() != [n]) {
        candle_core::bail!(
            "linear: input [{m}, {k}] against weight [{n}, {w_k}]{}",
            b.map(|b| format!(" and bias {:?}", b.dims()))
                .unwrap_or_default()
        )
    }
    let y = with_cpu_f32(x, |xs| {
        with_cpu_f32(w, |ws| match b {
            Some(b) => with_cpu_f32(b, |bs| cpu::linear(xs, m, k, ws, n, Some(bs))),
            None => Ok(cpu::linear(xs, m, k, ws, n, None)),
        })
    })???;
    Ok(Some(Tensor::from_vec(y, (m, n), x.device())?))
}

/// Bidirectional attention of packed views (`[N, heads * hd]` each for `q`, `k`, `v`; each view's
/// rows attend only to its own rows) with the fused CPU kernel; `None` when any operand is not an
/// untracked CPU f32 tensor, so the caller uses candle ops.
pub(crate) fn packed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spans: &[ViewSpan],
    heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    if [q, k, v].iter().any(|t| !is_cpu_f32(t) || tracks(t)) {
        return Ok(None);
    }
    let (n, width) = q.dims2()?;
    if k.dims2()? != (n, width) || v.dims2()? != (n, width) || heads == 0 || width % heads != 0 {
        candle_core::bail!("packed attention: q, k, v must all be [N, heads * head_dim]")
    }
    let out = with_cpu_f32(q, |qs| {
        with_cpu_f32(k, |ks| {
            with_cpu_f32(v, |vs| {
                cpu::packed_attention(qs, ks, vs, width, spans, heads, scale as f32)
            })
        })
    })???
    .map_err(|e| candle_core::Error::Msg(format!("packed attention: {e}")))?;
    if out.len() != n * width {
        candle_core::bail!("packed attention: the views do not cover all {n} patches")
    }
    Ok(Some(Tensor::from_vec(out, (n, width), q.device())?))
}

/// `softmax(scale * q kᵀ) v` for one query position (a decode step): `q [B, H, 1, hd]`, `k`
/// and `v [B, KVH, T, hd]` (views into a cache with spare capacity are read in place), query
/// head `h` on key/value head `h / (H / KVH)`; `[B, H, 1, hd]`. `None` when the operands are not
/// untracked CPU f32 tensors of those shapes with rows of `hd` contiguous floats, so the caller
/// uses candle ops.
pub(crate) fn attention_step(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Option<Tensor>> {
    use crate::model::kernels::attention_step::{CacheLayout, attend};
    if [q, k, v].iter().any(|t| !is_cpu_f32(t) || tracks(t)) {
        return Ok(None);
    }
    let (b, heads, l, hd) = q.dims4()?;
    let (kb, kv_heads, len, khd) = k.dims4()?;
    if l != 1 || kb != b || khd != hd || v.dims() != k.dims() || kv_heads == 0 {
        return Ok(None);
    }
    if !heads.is_multiple_of(kv_heads) || len == 0 {
        return Ok(None);
    }
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let (candle_core::Storage::Cpu(ks), candle_core::Storage::Cpu(vs)) = (&*k_storage, &*v_storage)
    else {
        return Ok(None);
    };
    let stride = k_layout.stride();
    if v_layout.stride() != stride || stride[2] != hd || stride[3] != 1 {
        return Ok(None);
    }
    let (ks, vs) = (ks.as_slice::<f32>()?, vs.as_slice::<f32>()?);
    let layout = CacheLayout {
        kv_heads,
        len,
        head_dim: hd,
        head_stride: stride[1],
    };
    let span = (kv_heads - 1) * stride[1] + len * hd;
    let out = with_cpu_f32(q, |qs| {
        let mut out = Vec::with_capacity(b * heads * hd);
        for (row, q) in qs.chunks_exact(heads * hd).enumerate() {
            let (k0, v0) = (
                k_layout.start_offset() + row * stride[0],
                v_layout.start_offset() + row * stride[0],
            );
            let (Some(k), Some(v)) = (ks.get(k0..k0 + span), vs.get(v0..v0 + span)) else {
                return None;
            };
            out.extend(attend(q, k, v, layout, scale as f32));
        }
        Some(out)
    })?;
    let Some(out) = out else { return Ok(None) };
    Ok(Some(Tensor::from_vec(out, (b, heads, 1, hd), q.device())?))
}

/// Runs `f` on the elements of a CPU f32 tensor in row-major order (copying only when it is not
/// contiguous).
pub(crate) fn with_cpu_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU tensor")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor")
    };
    Ok(f(&cpu.as_slice::<f32>()?[start..end]))
}

/// The elements of a CPU f32 storage a custom op's `layout` covers; an error naming `op` when
/// they are not contiguous.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op} needs contiguous operands")
    };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// `x @ w^T` for a tracked `x` and a frozen `w` (training through frozen layers).
///
/// candle's matmul backward computes the gradient of both operands, so every frozen weight would
/// cost a weight-sized matmul and buffer per step that training never reads (for LFM2-VL-450M,
/// about 1.4 GB and a third of the backward FLOPs). This op's backward returns only `grad @ w`.
fn frozen_weight_matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op1(FrozenWeightMatmul { w: w.clone() })
}

struct FrozenWeightMatmul {
    /// `[n, k]`, untracked.
    w: Tensor,
}

impl candle_core::CustomOp1 for FrozenWeightMatmul {
    fn name(&self) -> &'static str {
        "frozen-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = Tensor::from_slice(
            contiguous_f32(storage, layout, "frozen-weight matmul")?,
            layout.shape(),
            &Device::Cpu,
        )?;
        // Neither operand is tracked here, so this is the plain (fast) product.
        let y = x.matmul(&self.w.t()?)?;
        let shape = y.shape().clone();
        let data = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((candle_core::CpuStorage::F32(data), shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // [m, n] @ [n, k] -> [m, k]
        Ok(Some(grad_res.matmul(&self.w)?))
    }
}

/// `x [m, k] @ w^T (+ bias)` for a tracked `x` and a frozen packed `w`: the forward and the
/// gradient of `x` (`dY·W`, [`packed_grad::dy_w`]) both read the packed weight, so the tied LM head
/// in training neither keeps a dense copy nor repacks 65536 x 1024 floats in every product (as
/// the `gemm` crate does for `x.matmul(wᵀ)`).
struct PackedLinear {
    w: Arc<PackedWeight>,
    /// `[n]`, untracked.
    bias: Option<Tensor>,
}

impl candle_core::CustomOp1 for PackedLinear {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = contiguous_f32(storage, layout, "packed linear")?;
        let m = x.len() / self.w.k().max(1);
        let y = profile::time("LM head fwd (packed)", || match &self.bias {
            Some(b) => with_cpu_f32(b, |b| self.w.matmul(x, m, Some(b))),
            None => Ok(self.w.matmul(x, m, None)),
        })?;
        Ok((
            candle_core::CpuStorage::F32(y),
            candle_core::Shape::from((m, self.w.n())),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (m, _) = grad_res.dims2()?;
        let dx = profile::time("LM head bwd: dY·W (packed)", || {
            with_cpu_f32(grad_res, |dy| packed_grad::dy_w(&self.w, dy, m))
        })?;
        Ok(Some(Tensor::from_vec(dx, (m, self.w.k()), &Device::Cpu)?))
    }
}

pub(crate) fn is_cpu_f32(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32
}

/// Runs `f(input, output)` over a contiguous CPU f32 tensor in parallel row blocks of `row`
/// elements; `None` when the tensor is not eligible (other device or dtype, or tracked).
fn map_rows_f32(
    x: &Tensor,
    row: usize,
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) -> Result<Option<Tensor>> {
    if !is_cpu_f32(x) || tracks(x) || row == 0 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let src = &cpu.as_slice::<f32>()?[start..end];
    let mut out = vec![0f32; src.len()];
    // Blocks of whole rows, large enough to amortise scheduling.
    let rows_per_block = (16 * 1024 / row).max(1);
    out.par_chunks_mut(row * rows_per_block)
        .zip(src.par_chunks(row * rows_per_block))
        .for_each(|(o, i)| {
            for (o, i) in o.chunks_mut(row).zip(i.chunks(row)) {
                f(i, o);
            }
        });
    drop(storage);
    Ok(Some(Tensor::from_vec(out, x.shape(), x.device())?))
}

/// SiLU (`x * sigmoid(x)`).
pub(crate) fn silu(x: &Tensor) -> Result<Tensor> {
    match map_rows_f32(x, x.dim(D::Minus1)?, cpu::silu_rows)? {
        Some(y) => Ok(y),
        None => candle_nn::ops::silu(x),
    }
}

/// `silu(gate) * up` (SwiGLU); one fused differentiable op when either takes part in autograd.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if (tracks(gate) || tracks(up))
        && let Some(h) = autograd::swiglu(gate, up)?
    {
        return Ok(h);
    }
    silu(gate)? * up
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * w` (LFM2 multiplies by `w`, not `1 + w`).
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if tracks(x) || tracks(w) {
        if let Some(y) = autograd::rms_norm(x, w, eps)? {
            return Ok(y);
        }
        return candle_nn::ops::rms_norm_slow(x, w, eps as f32);
    }
    candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
}

/// LayerNorm over the last dimension with weight and bias.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if tracks(x) || tracks(w) || tracks(b) {
        return candle_nn::ops::layer_norm_slow(x, w, b, eps as f32);
    }
    candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32)
}

/// Softmax over the last dimension, computed in f32 for half-precision inputs.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = if dtype == DType::F32 {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    };
    let p = if tracks(&x32) {
        match autograd::softmax_last_dim(&x32)? {
            Some(p) => p,
            None => candle_nn::ops::softmax(&x32, D::Minus1)?,
        }
    } else {
        let row = x32.dim(D::Minus1)?;
        let fast = map_rows_f32(&x32, row, |i, o| {
            o.copy_from_slice(i);
            cpu::softmax_in_place(o);
        })?;
        match fast {
            Some(p) => p,
            None => candle_nn::ops::softmax_last_dim(&x32.contiguous()?)?,
        }
    };
    if dtype == DType::F32 {
        Ok(p)
    } else {
        p.to_dtype(dtype)
    }
}

/// Applies a configured activation.
pub(crate) fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::GeluTanh => match map_rows_f32(x, x.dim(D::Minus1)?, cpu::gelu_tanh_rows)? {
            Some(y) => Ok(y),
            None => x.gelu(),
        },
        Activation::GeluErf => x.gelu_erf(),
        Activation::Silu => silu(x),
    }
}

/// LayerNorm with affine weight and bias (`nn.LayerNorm`).
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn load(dim: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// RMSNorm with a weight (LFM2's `operator_norm`, `ffn_norm`, `q_layernorm`, ...).
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub(crate) fn load(dim: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }
}

/// The tensor side of [`PackedWeight`]: what `Linear` and the LM head call.
impl PackedWeight {
    /// Packs a `[n, k]` CPU f32 weight that autograd does not track; `None` for any other
    /// (GPU, half precision, trainable), which stays dense.
    pub(crate) fn from_tensor(w: &Tensor, kernel: Kernel) -> Result<Option<Self>> {
        if !is_cpu_f32(w) || w.track_op() || w.is_variable() {
            return Ok(None);
        }
        let (n, k) = w.dims2()?;
        with_cpu_f32(w, |ws| Some(Self::pack(ws, n, k, kernel)))
    }

    /// The dense `[n, k]` weight as a new CPU tensor.
    pub(crate) fn to_tensor(&self) -> Result<Tensor> {
        Tensor::from_vec(self.to_dense(), (self.n(), self.k()), &Device::Cpu)
    }

    /// `x [rows, k] @ w^T (+ bias [n])` as `[rows, n]`. An input autograd tracks runs the packed
    /// differentiable product ([`PackedLinear`]); one the kernel cannot take (not a CPU f32
    /// tensor, or with a trained bias) goes through the unpacked weight instead.
    pub(crate) fn linear(self: &Arc<Self>, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let plain = |t: &Tensor| is_cpu_f32(t) && !t.track_op();
        if bias.is_some_and(|b| !plain(b)) || !is_cpu_f32(x) {
            return linear(&x.to_device(&Device::Cpu)?, &self.to_tensor()?, bias);
        }
        let (rows, in_dim) = x.dims2()?;
        if in_dim != self.k() || bias.is_some_and(|b| b.dims() != [self.n()]) {
            candle_core::bail!(
                "packed linear: input [{rows}, {in_dim}]{} against weight [{}, {}]",
                bias.map(|b| format!(" and bias {:?}", b.dims()))
                    .unwrap_or_default(),
                self.n(),
                self.k()
            )
        }
        if x.track_op() {
            // Training through a frozen packed weight (the LM head): the same kernels both ways.
            return x.contiguous()?.apply_op1(PackedLinear {
                w: Arc::clone(self),
                bias: bias.cloned(),
            });
        }
        let y = with_cpu_f32(x, |xs| match bias {
            Some(b) => with_cpu_f32(b, |bs| self.matmul(xs, rows, Some(bs))),
            None => Ok(self.matmul(xs, rows, None)),
        })??;
        Tensor::from_vec(y, (rows, self.n()), &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A tracked input through a packed weight (the LM head in training): output and the input's
    /// gradient as candle's differentiable product gives them, with and without bias, for a few
    /// rows (the streaming `dY·W`) and for more; the weight gets no gradient.
    #[test]
    fn packed_linear_differentiates_like_candle() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k) = (150, 70);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, n, &dev)?;
        for kernel in [Kernel::Portable, Kernel::Avx2, Kernel::Avx512] {
            if !kernel.available() {
                continue;
            }
            let packed = Arc::new(PackedWeight::pack(
                &w.flatten_all()?.to_vec1()?,
                n,
                k,
                kernel,
            ));
            for (m, with_bias) in [(2, false), (3, true), (11, true)] {
                let x = candle_core::Var::randn(0f32, 1.0, (m, k), &dev)?;
                let upstream = Tensor::randn(0f32, 1.0, (m, n), &dev)?;
                let b = with_bias.then_some(&bias);
                let ours = packed.linear(x.as_tensor(), b)?;
                let mut plain = x.as_tensor().matmul(&w.t()?)?;
                if let Some(b) = b {
                    plain = plain.broadcast_add(b)?;
                }
                let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
                };
                assert!(diff(&ours, &plain)? < 1e-4, "{kernel:?} m {m}");
                let g1 = (&ours * &upstream)?.sum_all()?.backward()?;
                let g2 = (&plain * &upstream)?.sum_all()?.backward()?;
                let (Some(d1), Some(d2)) = (g1.get(x.as_tensor()), g2.get(x.as_tensor())) else {
                    candle_core::bail!("missing input gradient")
                };
                assert!(diff(d1, d2)? < 1e-4, "{kernel:?} m {m}");
                assert!(g1.get(&w).is_none());
            }
        }
        Ok(())
    }

    /// The decode-step attention against candle's ops at the LFM2-VL-450M shapes (16 query and
    /// 8 key/value heads of 64, 280 cached positions in a buffer of 400), taking turns; prints
    /// both (a measurement: `--ignored --nocapture`, release).
    #[test]
    #[ignore = "measurement"]
    fn attention_step_against_candle_ops() {
        let dev = Device::Cpu;
        let (h, kvh, hd, t, cap) = (16, 8, 64, 280, 400);
        let q = Tensor::randn(0f32, 1.0, (1, h, 1, hd), &dev).unwrap();
        let kbuf = Tensor::randn(0f32, 1.0, (1, kvh, cap, hd), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1.0, (1, kvh, cap, hd), &dev).unwrap();
        let (k, v) = (kbuf.narrow(2, 0, t).unwrap(), vbuf.narrow(2, 0, t).unwrap());
        let scale = (hd as f64).powf(-0.5);
        let candle = || {
            let q = (&q * scale).unwrap().reshape((1, kvh, 2, hd)).unwrap();
            let s = q.matmul(&k.t().unwrap()).unwrap();
            let p = softmax_last_dim(&s).unwrap();
            p.matmul(&v).unwrap().reshape((1, h, 1, hd)).unwrap()
        };
        let ours = || attention_step(&q, &k, &v, scale).unwrap().unwrap();
        let diff = (candle() - ours())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        let (mut best_c, mut best_o) = (f64::MAX, f64::MAX);
        on_compute_threads(|| {
            for _ in 0..200 {
                let t0 = std::time::Instant::now();
                std::hint::black_box(candle());
                best_c = best_c.min(t0.elapsed().as_secs_f64());
                let t0 = std::time::Instant::now();
                std::hint::black_box(ours());
                best_o = best_o.min(t0.elapsed().as_secs_f64());
            }
        });
        eprintln!(
            "one layer's decode attention: candle ops {:.1} us, attention_step {:.1} us",
            best_c * 1e6,
            best_o * 1e6
        );
    }

    /// A forward called from outside the pool runs on one of its threads (so its products'
    /// tasks are shared with the caller), and one already there runs in place, without waiting
    /// on a pool it occupies.
    #[test]
    fn forwards_run_on_the_compute_threads() {
        assert!(rayon::current_thread_index().is_none());
        let (outer, inner) = on_compute_threads(|| {
            let outer = rayon::current_thread_index();
            let inner =
                on_compute_threads(|| (rayon::current_thread_index(), std::thread::current().id()));
            (outer.zip(Some(std::thread::current().id())), inner)
        });
        let (index, thread) = outer.expect("ran on a pool thread");
        assert_eq!(inner, (Some(index), thread));
    }

    #[test]
    fn fast_kernels_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (37, 300), &dev)? - 1.0)?;
        let close = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(close(&activation(&x, Activation::GeluTanh)?, &x.gelu()?)? < 1e-5);
        assert!(close(&silu(&x)?, &candle_nn::ops::silu(&x)?)? < 1e-5);
        let mut masked = x.to_vec2::<f32>()?;
        masked[3][5..]
            .iter_mut()
            .for_each(|v| *v = f32::NEG_INFINITY);
        let masked = Tensor::new(masked, &dev)?;
        let ours = softmax_last_dim(&masked)?;
        let theirs = candle_nn::ops::softmax_last_dim(&masked)?;
        assert!(close(&ours, &theirs)? < 1e-6);
        Ok(())
    }

    #[test]
    fn frozen_weight_matmul_gives_input_gradient_only() -> Result<()> {
        let dev = Device::Cpu;
        let x = candle_core::Var::randn(0f32, 1.0, (5, 7), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (3, 7), &dev)?;
        let y = matmul_wt(x.as_tensor(), &w)?;
        let plain = x.as_tensor().detach().matmul(&w.t()?)?;
        let diff = (&y - plain)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        let grads = y.sum_all()?.backward()?;
        let gx = grads
            .get(x.as_tensor())
            .ok_or(candle_core::Error::Msg("no grad".into()))?;
        // d sum(x w^T) / dx = ones @ w
        let expected = Tensor::ones((5, 3), DType::F32, &dev)?.matmul(&w)?;
        let diff = (gx - expected)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        assert!(grads.get(&w).is_none(), "the frozen weight got a gradient");
        Ok(())
    }

    #[test]
    fn split_gemv_matches_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 64), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (2051, 64), &dev)?;
        let a = matmul_wt(&x, &w)?;
        let b = x.matmul(&w.t()?)?;
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "{diff}");
        Ok(())
    }

    #[test]
    fn mismatched_linear_shapes_are_errors_not_panics() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((8, 5), DType::F32, &dev)?;
        let w = Tensor::zeros((3, 4), DType::F32, &dev)?;
        assert!(linear(&x, &w, None).is_err());
        let w = Tensor::zeros((3, 5), DType::F32, &dev)?;
        let b = Tensor::zeros(4, DType::F32, &dev)?;
        assert!(linear(&x, &w, Some(&b)).is_err());
        assert_eq!(linear(&x, &w, None)?.dims(), &[8, 3]);
        Ok(())
    }

    #[test]
    fn rms_norm_multiplies_by_weight() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[3f32, 4.0]], &dev)?;
        let w = Tensor::new(&[2f32, 0.5], &dev)?;
        let y = rms_norm(&x, &w, 0.0)?.to_vec2::<f32>()?;
        // rms = sqrt((9 + 16) / 2) = 3.5355
        let rms = (12.5f32).sqrt();
        assert!((y[0][0] - 2.0 * 3.0 / rms).abs() < 1e-6);
        assert!((y[0][1] - 0.5 * 4.0 / rms).abs() < 1e-6);
        Ok(())
    }
}
