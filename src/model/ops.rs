//! Numerical building blocks shared by the vision tower, projector and decoder.
//!
//! candle's fused CPU kernels (`rms_norm`, `layer_norm`, `softmax_last_dim`) record no backward
//! pass, so each helper here uses them for inference and falls back to composite, differentiable
//! ops when a tensor takes part in autograd (LoRA training backpropagates through frozen layers).

use candle_core::{D, DType, Result, Tensor};

use crate::model::config::Activation;

/// True when gradients must flow through `xs` (it is, or derives from, a `Var`).
fn tracks(xs: &Tensor) -> bool {
    xs.track_op()
}

/// `x [m, k] @ w[n, k]^T -> [m, n]`, the layout of every PyTorch `Linear` weight.
pub fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * w` (LFM2 multiplies by `w`, not `1 + w`).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if tracks(x) || tracks(w) {
        return candle_nn::ops::rms_norm_slow(x, w, eps as f32);
    }
    candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)
}

/// LayerNorm over the last dimension with weight and bias.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if tracks(x) || tracks(w) || tracks(b) {
        return candle_nn::ops::layer_norm_slow(x, w, b, eps as f32);
    }
    candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32)
}

/// Softmax over the last dimension, computed in f32 for half-precision inputs.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = if dtype == DType::F32 {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    };
    let p = if tracks(&x32) {
        candle_nn::ops::softmax(&x32, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&x32.contiguous()?)?
    };
    if dtype == DType::F32 {
        Ok(p)
    } else {
        p.to_dtype(dtype)
    }
}

/// Applies a configured activation.
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::GeluTanh => x.gelu(),
        Activation::GeluErf => x.gelu_erf(),
        Activation::Silu => candle_nn::ops::silu(x),
    }
}

/// LayerNorm with affine weight and bias (`nn.LayerNorm`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(dim: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// RMSNorm with a weight (LFM2's `operator_norm`, `ffn_norm`, `q_layernorm`, ...).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(dim: usize, eps: f64, vb: candle_nn::VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
