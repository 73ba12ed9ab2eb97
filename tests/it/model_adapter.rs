//! The LoRA seam: an adapter holding trainable `Var`s attached to named projections changes the
//! output and receives gradients through the frozen network (norms, RoPE, conv, attention).

use std::sync::Arc;

use crate::support::shared_path;
use candle_core::{DType, Device, Result, Tensor, Var};
use vlmpipe::model::checkpoint::{self, LoadOptions};
use vlmpipe::model::lfm2_vl::LogitsMode;
use vlmpipe::model::linear::{LinearAdapter, LinearVisitor};

/// `base + x A^T B^T`, a LoRA delta without scaling.
#[derive(Debug)]
struct LowRank {
    a: Var,
    b: Var,
}

impl LinearAdapter for LowRank {
    fn forward(&self, input: &Tensor, base_output: Tensor) -> Result<Tensor> {
        let delta = input
            .broadcast_matmul(&self.a.as_tensor().t()?)?
            .broadcast_matmul(&self.b.as_tensor().t()?)?;
        base_output + delta
    }
}

#[test]
fn adapters_attach_by_name_and_get_gradients() -> Result<()> {
    let Some(dir) = shared_path("reference/tiny-lfm2vl") else {
        return Ok(());
    };
    let mut model = checkpoint::load(&dir, &LoadOptions::default()).expect("tiny model loads");
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[1u32, 6, 20, 300, 41, 7, 6]], &dev)?;
    let baseline = {
        let mut cache = model.new_cache(1);
        model.forward(&ids, None, None, &mut cache, LogitsMode::Last)?
    };

    let targets = [
        "model.language_model.layers.0.conv.in_proj",
        "model.language_model.layers.2.self_attn.q_proj",
    ];
    let mut adapters = Vec::new();
    model.visit_linears_mut(&mut |linear| {
        if targets.contains(&linear.name()) {
            let (out_dim, in_dim) = (linear.out_dim(), linear.in_dim());
            let make = || -> Result<Arc<LowRank>> {
                Ok(Arc::new(LowRank {
                    a: Var::randn(0f32, 0.1, (2, in_dim), &Device::Cpu)?,
                    b: Var::randn(0f32, 0.1, (out_dim, 2), &Device::Cpu)?,
                }))
            };
            if let Ok(adapter) = make() {
                adapters.push(adapter.clone());
                linear.set_adapter(Some(adapter));
            }
        }
    });
    assert_eq!(adapters.len(), 2);

    let mut cache = model.new_cache(1);
    let logits = model.forward(&ids, None, None, &mut cache, LogitsMode::Last)?;
    let changed = (&logits - &baseline)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(changed > 0.0, "adapters did not change the logits");

    let loss = logits.to_dtype(DType::F32)?.sqr()?.mean_all()?;
    let grads = loss.backward()?;
    for adapter in &adapters {
        for var in [&adapter.a, &adapter.b] {
            let g = grads
                .get(var.as_tensor())
                .expect("adapter weight has a gradient");
            let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
        }
    }
    Ok(())
}
