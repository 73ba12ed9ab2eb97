//! LFM2-VL multimodal projector: pixel unshuffle, LayerNorm, `linear_1`, GELU (erf), `linear_2`.
//!
//! Each view's real patch outputs are arranged as its `(rows, cols)` grid; pixel unshuffle by the
//! factor `f` turns every `f x f` block into one token whose features are the block's patches
//! concatenated row-major (for f = 2: `x[2i,2j], x[2i,2j+1], x[2i+1,2j], x[2i+1,2j+1]`). Tokens are
//! row-major within a view and views follow each other, which is the order of `<image>` tokens.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::config::ProjectorParams;
use crate::model::linear::{Linear, LinearVisitor};
use crate::model::ops::{self, LayerNorm};
use crate::model::vision::ViewSpan;

/// Pixel-unshuffles packed vision outputs `[N, D]` into `[tokens, D * f^2]`, views in order.
pub(crate) fn pixel_unshuffle(
    features: &Tensor,
    spans: &[ViewSpan],
    factor: usize,
) -> Result<Tensor> {
    let d = features.dim(1)?;
    let mut parts = Vec::with_capacity(spans.len());
    for (v, span) in spans.iter().enumerate() {
        if span.rows % factor != 0 || span.cols % factor != 0 {
            candle_core::bail!(
                "view {v}: {}x{} patches are not divisible by the downsample factor {factor}",
                span.rows,
                span.cols
            )
        }
        let (r, c) = (span.rows / factor, span.cols / factor);
        // [rows*cols, D] -> [r, f, c, f, D] -> [r, c, f(dr), f(dc), D] -> [r*c, f*f*D]
        let x = features
            .narrow(0, span.start, span.len())?
            .reshape((r, factor, c, factor, d))?
            .permute((0, 2, 1, 3, 4))?
            .reshape((r * c, factor * factor * d))?;
        parts.push(x);
    }
    Tensor::cat(&parts, 0)
}

/// Intermediates of the projector for parity checks.
#[derive(Debug, Clone)]
pub(crate) struct ProjectorOutput {
    /// `[tokens, D * f^2]` before the LayerNorm (kept only when asked for).
    pub unshuffled: Option<Tensor>,
    /// `[tokens, text hidden]`.
    pub features: Tensor,
}

/// `multi_modal_projector`.
#[derive(Debug, Clone)]
pub(crate) struct Projector {
    layer_norm: Option<LayerNorm>,
    linear_1: Linear,
    linear_2: Linear,
    cfg: ProjectorParams,
}

impl Projector {
    pub(crate) fn new(cfg: &ProjectorParams, vb: VarBuilder) -> Result<Self> {
        let layer_norm = if cfg.use_layer_norm {
            Some(LayerNorm::load(
                cfg.in_dim,
                cfg.layer_norm_eps,
                vb.pp("layer_norm"),
            )?)
        } else {
            None
        };
        Ok(Self {
            layer_norm,
            linear_1: Linear::load(cfg.in_dim, cfg.hidden_size, cfg.bias, vb.pp("linear_1"))?,
            linear_2: Linear::load(cfg.hidden_size, cfg.out_dim, cfg.bias, vb.pp("linear_2"))?,
            cfg: cfg.clone(),
        })
    }

    /// Packed vision outputs `[N, Dv]` -> image features `[tokens, D]`.
    pub(crate) fn forward(
        &self,
        vision_features: &Tensor,
        spans: &[ViewSpan],
        keep_unshuffled: bool,
    ) -> Result<ProjectorOutput> {
        let unshuffled = pixel_unshuffle(vision_features, spans, self.cfg.factor)?;
        let x = match &self.layer_norm {
            Some(ln) => ln.forward(&unshuffled)?,
            None => unshuffled.clone(),
        };
        let h = ops::activation(&self.linear_1.forward(&x)?, self.cfg.act)?;
        let features = self.linear_2.forward(&h)?;
        Ok(ProjectorOutput {
            unshuffled: keep_unshuffled.then_some(unshuffled),
            features,
        })
    }
}

impl LinearVisitor for Projector {
    fn visit_linears(&self, f: &mut dyn FnMut(&Linear)) {
        f(&self.linear_1);
        f(&self.linear_2);
    }

    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        f(&mut self.linear_1);
        f(&mut self.linear_2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::vision::view_spans;
    use candle_core::Device;

    #[test]
    fn unshuffle_order_is_block_row_major() -> Result<()> {
        // One 2x4 view with 1-dim features equal to their flat index r*4 + c.
        let x = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((8, 1))?;
        let spans = view_spans(&[(2, 4)]);
        let y = pixel_unshuffle(&x, &spans, 2)?.to_vec2::<f32>()?;
        // token (0,0) = x[0,0], x[0,1], x[1,0], x[1,1]; token (0,1) = x[0,2], x[0,3], x[1,2], x[1,3]
        assert_eq!(y, vec![vec![0.0, 1.0, 4.0, 5.0], vec![2.0, 3.0, 6.0, 7.0]]);
        Ok(())
    }

    #[test]
    fn odd_grid_is_an_error() -> Result<()> {
        let x = Tensor::zeros((6, 1), candle_core::DType::F32, &Device::Cpu)?;
        assert!(pixel_unshuffle(&x, &view_spans(&[(2, 3)]), 2).is_err());
        Ok(())
    }
}
