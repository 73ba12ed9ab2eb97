//! Training's fused ops: candle `CustomOp`s whose forward and backward run the slice kernels of
//! [`crate::model::kernels`] instead of chains of small differentiable candle ops.
//!
//! - [`lora_linear`]: a frozen projection with its LoRA branch as one graph node; the frozen
//!   weight is a constant of the op (it never enters the graph, so nothing computes or stores a
//!   gradient for it), and the backward pass returns `dX` (when the input is tracked), `dA`, `dB`.
//!
//! Each entry point returns `None` when its operands are not CPU f32 tensors (GPU, half
//! precision), and the caller keeps candle's differentiable ops, which run on every backend.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::model::kernels::lora::{Frozen, LoraShape, lora_backward, lora_forward};
use crate::model::kernels::packed::PackedWeight;
use crate::model::linear::WeightMatrix;
use crate::model::ops::{contiguous_f32, is_cpu_f32, with_cpu_f32};

/// `x [..., k] Wᵀ (+ bias) + scale · (x ∘ mask) Aᵀ Bᵀ` with `W [n, k]` and `bias [n]` frozen,
/// `A [r, k]`, `B [n, r]` trained; `mask` (dropout, `x`'s element count) scales the branch input.
/// `None` when an operand is not an untracked-where-frozen CPU f32 tensor, or `W` is quantized.
pub(crate) fn lora_linear(
    x: &Tensor,
    w: &WeightMatrix,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Vec<f32>>,
) -> Result<Option<Tensor>> {
    let frozen_ok = |t: &Tensor| is_cpu_f32(t) && !t.track_op();
    let w = match w {
        WeightMatrix::Dense(w) if frozen_ok(w) => Weight::Dense(w.contiguous()?),
        WeightMatrix::Packed(p) => Weight::Packed(p.clone()),
        _ => return Ok(None),
    };
    if !is_cpu_f32(x) || !is_cpu_f32(a) || !is_cpu_f32(b) {
        return Ok(None);
    }
    if bias.is_some_and(|b| !frozen_ok(b)) {
        return Ok(None);
    }
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last() else {
        candle_core::bail!("lora linear got a scalar input")
    };
    let (n, wk) = match &w {
        Weight::Dense(w) => w.dims2()?,
        Weight::Packed(p) => (p.n(), p.k()),
    };
    let (r, ak) = a.dims2()?;
    if wk != k || ak != k || b.dims2()? != (n, r) {
        candle_core::bail!(
            "lora linear: input [.., {k}], W [{n}, {wk}], A [{r}, {ak}], B {:?}",
            b.dims()
        )
    }
    if mask.as_ref().is_some_and(|m| m.len() != x.elem_count()) {
        candle_core::bail!("lora linear: the dropout mask does not match the input")
    }
    let m: usize = lead.iter().product();
    let op = LoraLinear {
        w,
        bias: bias.map(Tensor::contiguous).transpose()?,
        mask: mask.map(Arc::new),
        shape: LoraShape {
            m,
            k,
            n,
            r,
            scale: scale as f32,
        },
    };
    let x2 = x.reshape((m, k))?.contiguous()?;
    let y = x2.apply_op3(&a.contiguous()?, &b.contiguous()?, op)?;
    let mut out = lead.to_vec();
    out.push(n);
    Ok(Some(y.reshape(out)?))
}

/// The frozen weight as the op holds it.
enum Weight {
    /// `[n, k]`, contiguous, untracked.
    Dense(Tensor),
    Packed(Arc<PackedWeight>),
}

impl Weight {
    /// Runs `f` on the weight as the kernels read it.
    fn read<R>(&self, f: impl FnOnce(Frozen<'_>) -> R) -> Result<R> {
        match self {
            Weight::Dense(w) => with_cpu_f32(w, |w| f(Frozen::Dense(w))),
            Weight::Packed(p) => Ok(f(Frozen::Packed(p))),
        }
    }
}

struct LoraLinear {
    w: Weight,
    bias: Option<Tensor>,
    mask: Option<Arc<Vec<f32>>>,
    shape: LoraShape,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        a: &CpuStorage,
        a_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "lora linear";
        let (x, a, b) = (
            contiguous_f32(x, x_l, op)?,
            contiguous_f32(a, a_l, op)?,
            contiguous_f32(b, b_l, op)?,
        );
        let s = self.shape;
        let y = self.w.read(|w| match &self.bias {
            Some(bias) => with_cpu_f32(bias, |bias| {
                lora_forward(
                    x,
                    w,
                    Some(bias),
                    a,
                    b,
                    self.mask.as_deref().map(|m| &m[..]),
                    s,
                )
            }),
            None => Ok(lora_forward(
                x,
                w,
                None,
                a,
                b,
                self.mask.as_deref().map(|m| &m[..]),
                s,
            )),
        })??;
        Ok((CpuStorage::F32(y), Shape::from((s.m, s.n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self.shape;
        let want_dx = x.track_op();
        let grads = with_cpu_f32(x, |x| {
            self.w.read(|w| {
                with_cpu_f32(a, |a| {
                    with_cpu_f32(b, |b| {
                        with_cpu_f32(grad, |dy| {
                            let mask = self.mask.as_deref().map(|m| &m[..]);
                            lora_backward(x, w, a, b, mask, dy, s, want_dx)
                        })
                    })
                })
            })
        })?????;
        let dev = x.device();
        let dx = grads
            .dx
            .map(|dx| Tensor::from_vec(dx, (s.m, s.k), dev))
            .transpose()?;
        let da = Tensor::from_vec(grads.da, (s.r, s.k), dev)?;
        let db = Tensor::from_vec(grads.db, (s.n, s.r), dev)?;
        Ok((dx, Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::packed::Kernel;
    use candle_core::{DType, Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// The fused op against the same layer written with candle's differentiable ops: output and
    /// the gradients of the input, `A` and `B`, with and without dropout and bias, the frozen
    /// weight dense and packed.
    #[test]
    fn fused_lora_matches_candle_autograd() -> Result<()> {
        let dev = Device::Cpu;
        let (m, k, n, r) = (2 * 5, 24, 13, 4);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let mut packed = WeightMatrix::Dense(w.clone());
        assert!(packed.pack_for_cpu(Kernel::Portable)?);
        let dense = WeightMatrix::Dense(w.clone());
        let bias = Tensor::randn(0f32, 1.0, n, &dev)?;
        let mask: Vec<f32> = (0..m * k)
            .map(|i| if i % 4 == 0 { 0.0 } else { 4.0 / 3.0 })
            .collect();
        let weights = Tensor::randn(0f32, 1.0, (2, 5, n), &dev)?;
        let cases = [
            (false, false, &dense),
            (true, true, &dense),
            (true, true, &packed),
        ];
        for (with_mask, with_bias, frozen) in cases {
            let x = Var::randn(0f32, 1.0, (2, 5, k), &dev)?;
            let a = Var::randn(0f32, 1.0, (r, k), &dev)?;
            let b = Var::randn(0f32, 1.0, (n, r), &dev)?;
            let bias = with_bias.then_some(&bias);
            let mask = with_mask.then(|| mask.clone());
            let fused = lora_linear(x.as_tensor(), frozen, bias, &a, &b, 0.5, mask.clone())?
                .ok_or(candle_core::Error::Msg("not eligible".into()))?;
            let xt = x.as_tensor();
            let xl = match &mask {
                Some(mk) => (xt * Tensor::from_vec(mk.clone(), (2, 5, k), &dev)?)?,
                None => xt.clone(),
            };
            let mut plain = xt.broadcast_matmul(&w.t()?)?;
            if let Some(bias) = bias {
                plain = plain.broadcast_add(bias)?;
            }
            let plain =
                (plain + (xl.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * 0.5)?)?;
            assert!(max_diff(&fused, &plain)? < 1e-4);
            // A non-uniform upstream gradient.
            let g1 = (&fused * &weights)?.sum_all()?.backward()?;
            let g2 = (&plain * &weights)?.sum_all()?.backward()?;
            for v in [x.as_tensor(), a.as_tensor(), b.as_tensor()] {
                let (Some(d1), Some(d2)) = (g1.get(v), g2.get(v)) else {
                    candle_core::bail!("missing gradient")
                };
                assert!(max_diff(d1, d2)? < 1e-4, "{:?}", v.dims());
            }
            assert!(g1.get(&w).is_none());
        }
        let half = Tensor::zeros((3, k), DType::F16, &dev)?;
        let (a, b) = (
            Var::zeros((r, k), DType::F32, &dev)?,
            Var::zeros((n, r), DType::F32, &dev)?,
        );
        assert!(lora_linear(&half, &dense, None, &a, &b, 1.0, None)?.is_none());
        Ok(())
    }
}
