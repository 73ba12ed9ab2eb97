//! Differentiable fused ops for training through the frozen model: candle `CustomOp`s whose
//! forward and backward run [`crate::model::kernels::backward`] on CPU f32 tensors.
//!
//! [`crate::model::ops`] calls these when a tensor takes part in autograd (LoRA training);
//! each returns `None` for tensors the kernels cannot take (GPU, half precision, a tracked norm
//! weight), and the caller keeps candle's composite differentiable ops.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::model::kernels::attention_train;
use crate::model::kernels::backward as kernels;
use crate::model::kernels::packed::Kernel;

/// `false` when `VLMPIPE_TRAIN_KERNELS=off`: training then runs through candle's composite
/// differentiable ops and the whole sequence, as before these ops existed (to measure them).
pub(crate) fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("VLMPIPE_TRAIN_KERNELS").as_deref(),
            Ok("off") | Ok("0")
        )
    })
}

// `ops` calls these ops, so the two storage helpers below are this file's own (importing
// `ops`' would be an import circle).
fn is_cpu_f32(x: &Tensor) -> bool {
    matches!(x.device(), candle_core::Device::Cpu) && x.dtype() == candle_core::DType::F32
}

/// Runs `f` on the elements of a CPU f32 tensor in row-major order.
fn with_cpu_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU tensor")
    };
    Ok(f(slice(cpu, layout)?))
}

/// The contiguous elements of a CPU f32 storage.
fn slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused op needs contiguous operands")
    };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// RMSNorm over the last dimension with a frozen weight; `None` when not eligible.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !enabled() {
        return Ok(None);
    }
    if !is_cpu_f32(x) || !is_cpu_f32(w) || w.track_op() {
        return Ok(None);
    }
    if w.dims1()? != x.dim(candle_core::D::Minus1)? {
        candle_core::bail!("rms norm: weight {:?} for input {:?}", w.dims(), x.dims())
    }
    let op = RmsNorm {
        w: w.contiguous()?,
        eps: eps as f32,
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

struct RmsNorm {
    w: Tensor,
    eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout)?;
        let y = with_cpu_f32(&self.w, |w| kernels::rms_norm_forward(x, w, self.eps))?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_cpu_f32(arg, |x| {
            with_cpu_f32(&self.w, |w| {
                with_cpu_f32(grad, |g| kernels::rms_norm_backward(x, w, g, self.eps))
            })
        })???;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `silu(gate) * up` (SwiGLU); `None` when not eligible.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if !enabled() {
        return Ok(None);
    }
    if !is_cpu_f32(gate) || !is_cpu_f32(up) {
        return Ok(None);
    }
    if gate.dims() != up.dims() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        )
    }
    Ok(Some(
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?,
    ))
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        g_l: &Layout,
        u: &CpuStorage,
        u_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = kernels::swiglu_forward(slice(g, g_l)?, slice(u, u_l)?);
        Ok((CpuStorage::F32(h), g_l.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_cpu_f32(gate, |g| {
            with_cpu_f32(up, |u| {
                with_cpu_f32(grad, |dh| kernels::swiglu_backward(g, u, dh))
            })
        })???;
        let (shape, dev) = (gate.shape(), gate.device());
        Ok((
            Some(Tensor::from_vec(dg, shape, dev)?),
            Some(Tensor::from_vec(du, shape, dev)?),
        ))
    }
}

/// Softmax over the last dimension; `None` when not eligible.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Option<Tensor>> {
    if !enabled() {
        return Ok(None);
    }
    if !is_cpu_f32(x) {
        return Ok(None);
    }
    let row = x.dim(candle_core::D::Minus1)?;
    if row == 0 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(Softmax { row })?))
}

struct Softmax {
    row: usize,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = kernels::softmax_forward(slice(storage, layout)?, self.row);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_cpu_f32(res, |y| {
            with_cpu_f32(grad, |g| kernels::softmax_backward(y, g, self.row))
        })??;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// LFM2's gated short convolution from a zero state, `C ∘ conv(B ∘ X ∘ mask)` over
/// `bcx [B, L, 3D]` with frozen `taps` (`K` of `[D]`) and `bias`, `pad_mask [B, L, 1]` 0 at
/// padding; `None` when not eligible.
pub(crate) fn short_conv(
    bcx: &Tensor,
    pad_mask: Option<&Tensor>,
    taps: &[Tensor],
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let frozen = |t: &Tensor| is_cpu_f32(t) && !t.track_op();
    if !enabled() {
        return Ok(None);
    }
    if !is_cpu_f32(bcx)
        || !taps.iter().all(frozen)
        || bias.is_some_and(|b| !frozen(b))
        || pad_mask.is_some_and(|m| !frozen(m))
    {
        return Ok(None);
    }
    let (batch, len, three_d) = bcx.dims3()?;
    let dim = three_d / 3;
    if three_d != 3 * dim || taps.iter().any(|t| t.dims() != [dim]) {
        candle_core::bail!(
            "short conv: input {:?} against {} taps of [{dim}]",
            bcx.dims(),
            taps.len()
        )
    }
    let tap_values = taps
        .iter()
        .map(|t| t.to_vec1::<f32>())
        .collect::<Result<Vec<_>>>()?;
    let op = ShortConv {
        taps: tap_values,
        bias: bias.map(Tensor::to_vec1::<f32>).transpose()?,
        mask: pad_mask
            .map(|m| m.flatten_all()?.to_vec1::<f32>())
            .transpose()?,
        shape: kernels::ConvShape { batch, len, dim },
    };
    Ok(Some(bcx.contiguous()?.apply_op1(op)?))
}

struct ShortConv {
    taps: Vec<Vec<f32>>,
    bias: Option<Vec<f32>>,
    mask: Option<Vec<f32>>,
    shape: kernels::ConvShape,
}

impl ShortConv {
    fn taps(&self) -> Vec<&[f32]> {
        self.taps.iter().map(Vec::as_slice).collect()
    }
}

impl CustomOp1 for ShortConv {
    fn name(&self) -> &'static str {
        "fused-short-conv"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = self.shape;
        let y = kernels::short_conv_forward(
            slice(storage, layout)?,
            self.mask.as_deref(),
            &self.taps(),
            self.bias.as_deref(),
            s,
        );
        Ok((CpuStorage::F32(y), Shape::from((s.batch, s.len, s.dim))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = with_cpu_f32(arg, |bcx| {
            with_cpu_f32(grad, |dy| {
                kernels::short_conv_backward(
                    bcx,
                    self.mask.as_deref(),
                    &self.taps(),
                    self.bias.as_deref(),
                    dy,
                    self.shape,
                )
            })
        })??;
        Ok(Some(Tensor::from_vec(d, arg.shape(), arg.device())?))
    }
}

/// Up to this many bytes of probabilities per attention layer, the forward keeps them for the
/// backward; beyond, the backward recomputes them (`q kᵀ` and the softmax again), so what a
/// layer holds for its backward stays bounded at long sequences. LFM2-VL-450M's 270-token step
/// keeps 4.7 MB per layer; recomputing them instead cost it about 3 ms per step for no measurable
/// peak-memory gain (BENCHMARKS.md, "LoRA training step").
const KEEP_PROBS_MAX_BYTES: usize = 32 << 20;

/// The decoder's attention in training: `softmax(scale · rope(q) rope(k)ᵀ + mask) · v` with
/// `q [B, L, heads * hd]`, `k`, `v [B, T, kv_heads * hd]` (after the per-head norms, before
/// RoPE), `cos`/`sin [B, T, hd / 2]` (queries are the last `L` positions) and the additive `mask`
/// (`[B, 1, 1, L, T]`, `-inf` hides a key; `None`: nothing hidden). Returns `[B, L, heads * hd]`,
/// or `None` when not eligible (nothing tracked, GPU, half precision).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: Option<&Tensor>,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    let frozen = |t: &Tensor| is_cpu_f32(t) && !t.track_op();
    if !enabled() || !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(None);
    }
    if ![q, k, v].into_iter().all(is_cpu_f32)
        || !frozen(cos)
        || !frozen(sin)
        || mask.is_some_and(|m| !frozen(m))
    {
        return Ok(None);
    }
    let (batch, q_rows, q_width) = q.dims3()?;
    let (_, kv_rows, kv_width) = k.dims3()?;
    let head_dim = q_width / heads.max(1);
    let shape = attention_train::Shape {
        batch,
        q_rows,
        kv_rows,
        heads,
        kv_heads,
        head_dim,
        scale: scale as f32,
    };
    let half = head_dim / 2;
    if heads == 0
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || q_width != heads * head_dim
        || kv_width != kv_heads * head_dim
        || !head_dim.is_multiple_of(2)
        || q_rows > kv_rows
        || v.dims() != k.dims()
        || k.dim(0)? != batch
        || cos.dims() != [batch, kv_rows, half]
        || sin.dims() != cos.dims()
        || mask.is_some_and(|m| m.dims() != [batch, 1, 1, q_rows, kv_rows])
    {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?}, rope {:?}, mask {:?} for {heads} heads over \
             {kv_heads}",
            q.dims(),
            k.dims(),
            v.dims(),
            cos.dims(),
            mask.map(Tensor::dims)
        )
    }
    let op = Attention {
        shape,
        cos: cos.flatten_all()?.to_vec1::<f32>()?,
        sin: sin.flatten_all()?.to_vec1::<f32>()?,
        mask: mask
            .map(|m| m.flatten_all()?.to_vec1::<f32>())
            .transpose()?,
        kernel: Kernel::for_this_cpu(),
        keep_probs: batch * heads * q_rows * kv_rows * size_of::<f32>() <= KEEP_PROBS_MAX_BYTES,
        probs: OnceLock::new(),
    };
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        op,
    )?))
}

struct Attention {
    shape: attention_train::Shape,
    cos: Vec<f32>,
    sin: Vec<f32>,
    mask: Option<Vec<f32>>,
    kernel: Option<Kernel>,
    /// Whether the forward keeps its probabilities for the backward (else it recomputes them).
    keep_probs: bool,
    /// What the forward kept (`None` inside when it keeps nothing).
    probs: OnceLock<Option<Vec<f32>>>,
}

impl Attention {
    fn rope(&self) -> attention_train::Rope<'_> {
        attention_train::Rope {
            cos: &self.cos,
            sin: &self.sin,
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, probs) = attention_train::forward(
            slice(q, q_l)?,
            slice(k, k_l)?,
            slice(v, v_l)?,
            self.rope(),
            self.mask.as_deref(),
            self.shape,
            self.kernel,
            self.keep_probs,
        );
        if self.probs.set(probs).is_err() {
            candle_core::bail!("fused attention: one op ran forward twice")
        }
        Ok((CpuStorage::F32(out), q_l.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(probs) = self.probs.get() else {
            candle_core::bail!("fused attention: backward before forward")
        };
        let probs = probs.as_deref();
        let (dq, dk, dv) = with_cpu_f32(q, |qs| {
            with_cpu_f32(k, |ks| {
                with_cpu_f32(v, |vs| {
                    with_cpu_f32(grad, |g| {
                        attention_train::backward(
                            qs,
                            ks,
                            vs,
                            self.rope(),
                            self.mask.as_deref(),
                            probs,
                            g,
                            self.shape,
                            self.kernel,
                        )
                    })
                })
            })
        })????;
        // Inputs autograd does not track get no gradient (candle would add it into a zero-filled
        // buffer for nothing).
        let wrap = |t: &Tensor, d: Vec<f32>| -> Result<Option<Tensor>> {
            t.track_op()
                .then(|| Tensor::from_vec(d, t.shape(), t.device()))
                .transpose()
        };
        Ok((wrap(q, dq)?, wrap(k, dk)?, wrap(v, dv)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    fn grad_of(grads: &candle_core::backprop::GradStore, v: &Var) -> Result<Tensor> {
        grads
            .get(v.as_tensor())
            .cloned()
            .ok_or(candle_core::Error::Msg("missing gradient".into()))
    }

    /// The fused ops against candle's composite differentiable ones: outputs and input gradients.
    #[test]
    fn fused_ops_match_candle_autograd() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 7, 32), &dev)?;
        let w = Tensor::randn(0f32, 1.0, 32, &dev)?;
        let weights = Tensor::randn(0f32, 1.0, (2, 7, 32), &dev)?;
        let fused = rms_norm(x.as_tensor(), &w, 1e-5)?
            .ok_or(candle_core::Error::Msg("not eligible".into()))?;
        let plain = candle_nn::ops::rms_norm_slow(x.as_tensor(), &w, 1e-5)?;
        assert!(max_diff(&fused, &plain)? < 1e-5);
        let g1 = (&fused * &weights)?.sum_all()?.backward()?;
        let g2 = (&plain * &weights)?.sum_all()?.backward()?;
        assert!(max_diff(&grad_of(&g1, &x)?, &grad_of(&g2, &x)?)? < 1e-4);
        assert!(g1.get(&w).is_none());

        let fused = softmax_last_dim(x.as_tensor())?
            .ok_or(candle_core::Error::Msg("not eligible".into()))?;
        let plain = candle_nn::ops::softmax(x.as_tensor(), candle_core::D::Minus1)?;
        assert!(max_diff(&fused, &plain)? < 1e-6);
        let g1 = (&fused * &weights)?.sum_all()?.backward()?;
        let g2 = (&plain * &weights)?.sum_all()?.backward()?;
        assert!(max_diff(&grad_of(&g1, &x)?, &grad_of(&g2, &x)?)? < 1e-5);

        let u = Var::randn(0f32, 1.0, (2, 7, 32), &dev)?;
        let fused = swiglu(x.as_tensor(), u.as_tensor())?
            .ok_or(candle_core::Error::Msg("not eligible".into()))?;
        let plain = (candle_nn::ops::silu(x.as_tensor())? * u.as_tensor())?;
        assert!(max_diff(&fused, &plain)? < 1e-5);
        let g1 = (&fused * &weights)?.sum_all()?.backward()?;
        let g2 = (&plain * &weights)?.sum_all()?.backward()?;
        for v in [&x, &u] {
            assert!(max_diff(&grad_of(&g1, v)?, &grad_of(&g2, v)?)? < 1e-4);
        }
        Ok(())
    }

    /// Attention as the decoder's candle chain computes it: RoPE's composite form, the scale,
    /// grouped `q kᵀ`, the mask, softmax (the fused one `ops` picks, tested above against
    /// candle's), `p v`, heads back in place.
    #[allow(clippy::too_many_arguments)]
    fn candle_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        heads: usize,
        kv_heads: usize,
    ) -> Result<Tensor> {
        let (b, l, _) = q.dims3()?;
        let t = k.dim(1)?;
        let hd = q.dim(2)? / heads;
        let rope = |x: &Tensor, cos: &Tensor, sin: &Tensor| -> Result<Tensor> {
            let cos = Tensor::cat(&[cos, cos], 2)?.unsqueeze(1)?;
            let sin = Tensor::cat(&[sin, sin], 2)?.unsqueeze(1)?;
            let x1 = x.narrow(3, 0, hd / 2)?;
            let x2 = x.narrow(3, hd / 2, hd / 2)?;
            let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
            x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
        };
        let heads_first = |x: &Tensor, n: usize, rows: usize| -> Result<Tensor> {
            x.reshape((b, rows, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = rope(
            &heads_first(q, heads, l)?,
            &cos.narrow(1, t - l, l)?,
            &sin.narrow(1, t - l, l)?,
        )?;
        let k = rope(&heads_first(k, kv_heads, t)?, cos, sin)?;
        let v = heads_first(v, kv_heads, t)?;
        let groups = heads / kv_heads;
        let q = (q * (hd as f64).powf(-0.5))?.reshape((b, kv_heads, groups * l, hd))?;
        let scores = q
            .matmul(&k.t()?)?
            .reshape((b, kv_heads, groups, l, t))?
            .broadcast_add(mask)?
            .reshape((b, kv_heads, groups * l, t))?;
        let probs = crate::model::ops::softmax_last_dim(&scores)?;
        probs
            .matmul(&v)?
            .reshape((b, heads, l, hd))?
            .transpose(1, 2)?
            .reshape((b, l, heads * hd))
    }

    /// The fused attention against the decoder's candle chain: output and the gradients of q,
    /// k, v, grouped and not, with padded keys, a query tail and more rows than one block.
    #[test]
    fn fused_attention_matches_candle_autograd() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, query rows, key rows, heads, kv heads, head dim)
        for (b, l, t, h, kvh, hd) in [
            (2, 5, 7, 4, 2, 8),
            (1, 67, 67, 2, 2, 16),
            (2, 3, 70, 3, 1, 4),
        ] {
            let q = Var::randn(0f32, 1.0, (b, l, h * hd), &dev)?;
            let k = Var::randn(0f32, 1.0, (b, t, kvh * hd), &dev)?;
            let v = Var::randn(0f32, 1.0, (b, t, kvh * hd), &dev)?;
            let angles = Tensor::arange(0f32, (b * t * hd / 2) as f32, &dev)?
                .affine(0.37, 0.0)?
                .reshape((b, t, hd / 2))?;
            let (cos, sin) = (angles.cos()?, angles.sin()?);
            // Causal for the last `l` positions; row 0 pads position 1 (seen only by itself).
            let mut mask = vec![0f32; b * l * t];
            for row in 0..b {
                for i in 0..l {
                    let qpos = t - l + i;
                    for j in 0..t {
                        if j != qpos && (j > qpos || (row == 0 && j == 1)) {
                            mask[(row * l + i) * t + j] = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            let mask = Tensor::from_vec(mask, (b, 1, 1, l, t), &dev)?;
            let scale = (hd as f64).powf(-0.5);
            let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            let fused = attention(qt, kt, vt, &cos, &sin, Some(&mask), h, kvh, scale)?
                .ok_or(candle_core::Error::Msg("not eligible".into()))?;
            let plain = candle_attention(qt, kt, vt, &cos, &sin, &mask, h, kvh)?;
            assert!(max_diff(&fused, &plain)? < 1e-5);
            let weights = Tensor::randn(0f32, 1.0, (b, l, h * hd), &dev)?;
            let g1 = (&fused * &weights)?.sum_all()?.backward()?;
            let g2 = (&plain * &weights)?.sum_all()?.backward()?;
            for x in [&q, &k, &v] {
                assert!(max_diff(&grad_of(&g1, x)?, &grad_of(&g2, x)?)? < 1e-4);
            }
        }
        // Nothing tracked: candle's ops stay.
        let x = Tensor::zeros((1, 2, 8), candle_core::DType::F32, &dev)?;
        let rope = Tensor::zeros((1, 2, 4), candle_core::DType::F32, &dev)?;
        assert!(attention(&x, &x, &x, &rope, &rope, None, 1, 1, 1.0)?.is_none());
        Ok(())
    }

    /// One attention layer's forward and backward at the LFM2-VL-450M training shapes (270
    /// tokens, 16 query heads over 8 key/value heads of 64), the fused op against the candle
    /// chain, taking turns; prints both (a measurement: `--ignored --nocapture`, release).
    #[test]
    #[ignore = "measurement"]
    fn fused_attention_against_the_candle_chain() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, h, kvh, hd) = (1, 270, 16, 8, 64);
        let q = Var::randn(0f32, 1.0, (b, t, h * hd), &dev)?;
        let k = Var::randn(0f32, 1.0, (b, t, kvh * hd), &dev)?;
        let v = Var::randn(0f32, 1.0, (b, t, kvh * hd), &dev)?;
        let angles = Tensor::arange(0f32, (b * t * hd / 2) as f32, &dev)?
            .affine(0.01, 0.0)?
            .reshape((b, t, hd / 2))?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let mut mask = vec![0f32; t * t];
        for i in 0..t {
            mask[i * t + i + 1..(i + 1) * t].fill(f32::NEG_INFINITY);
        }
        let mask = Tensor::from_vec(mask, (b, 1, 1, t, t), &dev)?;
        let weights = Tensor::randn(0f32, 1.0, (b, t, h * hd), &dev)?;
        let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let scale = (hd as f64).powf(-0.5);
        let step = |fused: bool| -> Result<f64> {
            let start = std::time::Instant::now();
            let o = if fused {
                attention(qt, kt, vt, &cos, &sin, Some(&mask), h, kvh, scale)?
                    .ok_or(candle_core::Error::Msg("not eligible".into()))?
            } else {
                candle_attention(qt, kt, vt, &cos, &sin, &mask, h, kvh)?
            };
            std::hint::black_box((&o * &weights)?.sum_all()?.backward()?);
            Ok(start.elapsed().as_secs_f64())
        };
        let (mut chain, mut fused) = (f64::MAX, f64::MAX);
        crate::model::ops::on_compute_threads(|| -> Result<()> {
            for _ in 0..20 {
                chain = chain.min(step(false)?);
                fused = fused.min(step(true)?);
            }
            Ok(())
        })?;
        eprintln!(
            "one attention layer, forward + backward: candle chain {:.2} ms, fused {:.2} ms",
            chain * 1e3,
            fused * 1e3
        );
        Ok(())
    }
}
