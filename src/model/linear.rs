//! The one `Linear` every projection of LFM2-VL uses, with the seam where LoRA plugs in.
//!
//! Each [`Linear`] knows its full dotted checkpoint path (`model.language_model.layers.3.conv.in_proj`),
//! so fine-tuning can list the projections ([`LinearVisitor`]), validate LoRA target names against
//! them and attach an adapter ([`LinearAdapter`]) without the model code knowing about LoRA.

use std::fmt;
use std::sync::Arc;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::kernels::packed::{Kernel, PackedWeight};
use crate::model::ops;
use crate::model::quant::QuantWeight;

/// Something that changes a linear layer's output, e.g. a LoRA delta `scale * B(A(x))`.
///
/// `forward` receives the layer input and the frozen layer's output and returns the final output,
/// so an adapter may add a low-rank term, gate, or replace the output entirely.
pub trait LinearAdapter: Send + Sync + fmt::Debug {
    fn forward(&self, input: &Tensor, base_output: Tensor) -> Result<Tensor>;

    /// The whole layer (frozen `[out, in]` product, bias and adapter) as one op, for adapters
    /// that can fuse them (LoRA while training on CPU); `None`, the default, runs the frozen
    /// product and then [`LinearAdapter::forward`].
    fn forward_fused(
        &self,
        _input: &Tensor,
        _weight: FrozenWeight<'_>,
        _bias: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// A layer's frozen weight as [`LinearAdapter::forward_fused`] receives it: dense, packed or
/// quantized, opaque outside the crate.
#[derive(Clone, Copy, Debug)]
pub struct FrozenWeight<'a>(pub(crate) &'a WeightMatrix);

/// `y = x W^T + b` over the last dimension, optionally followed by an adapter.
#[derive(Clone)]
pub struct Linear {
    weight: WeightMatrix,
    bias: Option<Tensor>,
    name: String,
    adapter: Option<Arc<dyn LinearAdapter>>,
}

/// A frozen `[out, in]` weight matrix as products read it: a projection's weight, or the LM head.
#[derive(Debug, Clone)]
pub(crate) enum WeightMatrix {
    /// `[out, in]` as in PyTorch, on any device and dtype.
    Dense(Tensor),
    /// Pre-packed for the CPU f32 kernel ([`WeightMatrix::pack_for_cpu`]); the dense form is gone.
    Packed(Arc<PackedWeight>),
    /// ggml blocks ([`crate::model::quant`]); the dense form is gone.
    Quantized(Arc<QuantWeight>),
}

impl WeightMatrix {
    pub(crate) fn out_dim(&self) -> usize {
        match self {
            WeightMatrix::Dense(w) => w.dims2().map_or(0, |(o, _)| o),
            WeightMatrix::Packed(p) => p.n(),
            WeightMatrix::Quantized(q) => q.out_dim(),
        }
    }

    pub(crate) fn in_dim(&self) -> usize {
        match self {
            WeightMatrix::Dense(w) => w.dims2().map_or(0, |(_, i)| i),
            WeightMatrix::Packed(p) => p.k(),
            WeightMatrix::Quantized(q) => q.in_dim(),
        }
    }

    pub(crate) fn is_packed(&self) -> bool {
        matches!(self, WeightMatrix::Packed(_))
    }

    /// The `[out, in]` tensor; a packed matrix is unpacked into a new CPU tensor, a quantized
    /// one dequantized into f32.
    pub(crate) fn to_tensor(&self) -> Result<Tensor> {
        match self {
            WeightMatrix::Dense(w) => Ok(w.clone()),
            WeightMatrix::Packed(p) => p.to_tensor(),
            WeightMatrix::Quantized(q) => q.to_tensor(),
        }
    }

    /// `x [rows, in] -> x W^T + b [rows, out]`.
    pub(crate) fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        match self {
            WeightMatrix::Dense(w) => ops::linear(x, w, bias),
            WeightMatrix::Packed(p) => p.linear(x, bias),
            WeightMatrix::Quantized(q) => q.linear(x, bias),
        }
    }

    /// Replaces a dense CPU f32 matrix by its packed form for `kernel` (faster products, same
    /// memory); leaves any other (GPU, half precision, tracked by autograd, already packed) as it
    /// is. Returns whether it packed.
    pub(crate) fn pack_for_cpu(&mut self, kernel: Kernel) -> Result<bool> {
        let WeightMatrix::Dense(w) = self else {
            return Ok(false);
        };
        let Some(packed) = PackedWeight::from_tensor(w, kernel)? else {
            return Ok(false);
        };
        *self = WeightMatrix::Packed(Arc::new(packed));
        Ok(true)
    }
}

impl fmt::Debug for Linear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Linear")
            .field("name", &self.name)
            .field("weight", &[self.out_dim(), self.in_dim()])
            .field("packed", &self.weight.is_packed())
            .field("bias", &self.bias.is_some())
            .field("adapter", &self.adapter.is_some())
            .finish()
    }
}

impl Linear {
    /// Wraps existing tensors; `weight` is `[out, in]` as in PyTorch.
    pub(crate) fn from_tensors(
        weight: Tensor,
        bias: Option<Tensor>,
        name: impl Into<String>,
    ) -> Self {
        Self {
            weight: WeightMatrix::Dense(weight),
            bias,
            name: name.into(),
            adapter: None,
        }
    }

    /// Loads `{prefix}.weight` (and `{prefix}.bias` when `bias`) of shape `[out_dim, in_dim]`.
    pub(crate) fn load(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::from_tensors(weight, bias, vb.prefix()))
    }

    /// Full dotted checkpoint path, without `.weight`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `[out, in]` weight; a packed weight is unpacked into a new CPU tensor, so callers on
    /// a hot path should not ask for it.
    pub fn weight(&self) -> Result<Tensor> {
        self.weight.to_tensor()
    }

    pub(crate) fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn in_dim(&self) -> usize {
        self.weight.in_dim()
    }

    pub fn out_dim(&self) -> usize {
        self.weight.out_dim()
    }

    /// Replaces a CPU f32 weight by its packed form for `kernel` (faster products, same memory);
    /// leaves any other weight (GPU, half precision, tracked by autograd) as it is. Returns
    /// whether it packed.
    pub(crate) fn pack_for_cpu(&mut self, kernel: Kernel) -> Result<bool> {
        self.weight.pack_for_cpu(kernel)
    }

    /// The frozen weight as products read it (dense, packed or quantized).
    pub(crate) fn weight_matrix(&self) -> &WeightMatrix {
        &self.weight
    }

    /// Replaces the frozen weight (quantizing at load, [`crate::model::quant`]); the adapter and
    /// bias stay.
    pub(crate) fn set_weight_matrix(&mut self, weight: WeightMatrix) {
        self.weight = weight;
    }

    /// Attaches (or with `None` removes) the adapter applied after the frozen projection.
    pub fn set_adapter(&mut self, adapter: Option<Arc<dyn LinearAdapter>>) {
        self.adapter = adapter;
    }

    /// Applies the layer to `x` of shape `[..., in]`, giving `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(adapter) = &self.adapter
            && let Some(y) =
                adapter.forward_fused(x, FrozenWeight(&self.weight), self.bias.as_ref())?
        {
            return Ok(y);
        }
        let base = self.forward_frozen(x)?;
        match &self.adapter {
            Some(adapter) => adapter.forward(x, base),
            None => Ok(base),
        }
    }

    /// The projection without any adapter.
    pub fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some((&in_dim, lead)) = dims.split_last() else {
            candle_core::bail!("linear `{}` got a scalar input", self.name)
        };
        let rows: usize = lead.iter().product();
        // [..., in] -> [rows, in]
        let x2 = x.reshape((rows, in_dim))?;
        let y = self.weight.linear(&x2, self.bias.as_ref())?;
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_dim());
        // [rows, out] -> [..., out]
        y.reshape(out_dims)
    }
}

/// Walks the named linear layers of a module tree (LoRA target listing and attachment).
pub trait LinearVisitor {
    /// Calls `f` on every linear layer, in checkpoint order.
    fn visit_linears(&self, f: &mut dyn FnMut(&Linear));
    /// Calls `f` on every linear layer mutably, in checkpoint order.
    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear));

    /// The full dotted names of every linear layer.
    fn linear_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        self.visit_linears(&mut |l| names.push(l.name().to_string()));
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[derive(Debug)]
    struct AddOne;
    impl LinearAdapter for AddOne {
        fn forward(&self, _input: &Tensor, base_output: Tensor) -> Result<Tensor> {
            base_output + 1.0
        }
    }

    #[test]
    fn forward_matches_manual_and_adapter_applies() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.0, 3.0], [0.0, -1.0, 0.5]], &dev)?;
        let b = Tensor::new(&[10f32, 20.0], &dev)?;
        let mut lin = Linear::from_tensors(w, Some(b), "m.proj");
        let x = Tensor::new(&[[[1f32, 1.0, 1.0]], [[2.0, 0.0, -2.0]]], &dev)?;
        let y = lin.forward(&x)?;
        assert_eq!(y.dims(), &[2, 1, 2]);
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            vec![16.0, 19.5, 6.0, 19.0]
        );
        lin.set_adapter(Some(Arc::new(AddOne)));
        let y = lin.forward(&x)?;
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            vec![17.0, 20.5, 7.0, 20.0]
        );
        assert_eq!(lin.name(), "m.proj");
        Ok(())
    }
}
