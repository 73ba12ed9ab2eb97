//! AdamW with `torch.optim.AdamW`'s exact update, learning-rate schedules and global-norm clipping.
//!
//! The update follows torch's single-tensor path (what the CPU uses), operation by operation in
//! f32, so a few steps match PyTorch to rounding: decoupled decay `p *= 1 - lr*wd`, then
//! `m = lerp(m, g, 1 - b1)`, `v = b2*v + (1 - b2)*g*g`, and
//! `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.

use candle_core::{DType, Tensor, Var};

use crate::train::error::TrainError;

/// AdamW hyperparameters (torch's names and defaults, except the decay the recipe uses).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 5e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Moments of one parameter, as plain vectors so they save and restore bit-exactly.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// AdamW over a fixed list of `Var`s.
#[derive(Debug, Clone)]
pub struct AdamW {
    cfg: AdamWConfig,
    vars: Vec<Var>,
    state: Vec<Moments>,
    /// Completed optimizer steps (torch's `state['step']`).
    step: u64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Self {
        let state = vars
            .iter()
            .map(|v| Moments {
                m: vec![0.0; v.elem_count()],
                v: vec![0.0; v.elem_count()],
            })
            .collect();
        Self {
            cfg,
            vars,
            state,
            step: 0,
        }
    }

    pub(crate) fn moments(&self) -> &[Moments] {
        &self.state
    }

    /// Restores moments and step count saved from an optimizer over the same parameters.
    pub(crate) fn restore(&mut self, state: Vec<Moments>, step: u64) -> Result<(), TrainError> {
        let fits = state.len() == self.vars.len()
            && state
                .iter()
                .zip(&self.vars)
                .all(|(s, v)| s.m.len() == v.elem_count() && s.v.len() == v.elem_count());
        if !fits {
            return Err(TrainError::Setting {
                name: "optimizer state",
                message: "saved moments do not fit the trainable parameters".into(),
            });
        }
        self.state = state;
        self.step = step;
        Ok(())
    }

    /// One update with `grads[i]` for `vars[i]` at learning rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<(), TrainError> {
        if grads.len() != self.vars.len() {
            return Err(TrainError::Setting {
                name: "gradients",
                message: format!(
                    "{} gradients for {} parameters",
                    grads.len(),
                    self.vars.len()
                ),
            });
        }
        self.step += 1;
        let t = self.step as f64;
        let c = &self.cfg;
        let bias_correction1 = 1.0 - c.beta1.powf(t);
        let bias_correction2_sqrt = (1.0 - c.beta2.powf(t)).sqrt();
        // torch multiplies f32 tensors by Python floats, i.e. by the f32-rounded scalar.
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let step_size = (lr / bias_correction1) as f32;
        let bc2 = bias_correction2_sqrt as f32;
        let (b1w, b2, b2w, eps) = (
            (1.0 - c.beta1) as f32,
            c.beta2 as f32,
            (1.0 - c.beta2) as f32,
            c.eps as f32,
        );
        for ((var, grad), st) in self.vars.iter().zip(grads).zip(self.state.iter_mut()) {
            let shape = var.shape().clone();
            let mut p = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let g = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if g.len() != p.len() {
                return Err(TrainError::Setting {
                    name: "gradients",
                    message: format!("gradient of {} values for {} weights", g.len(), p.len()),
                });
            }
            for i in 0..p.len() {
                p[i] *= decay;
                // torch's lerp: m + w * (g - m).
                st.m[i] += b1w * (g[i] - st.m[i]);
                st.v[i] = st.v[i] * b2 + b2w * g[i] * g[i];
                let denom = st.v[i].sqrt() / bc2 + eps;
                p[i] += -step_size * (st.m[i] / denom);
            }
            let new = Tensor::from_vec(p, shape, var.device())?.to_dtype(var.dtype())?;
            var.set(&new)?;
        }
        Ok(())
    }
}

/// The global L2 norm of all gradients (computed in f64 for stability).
pub(crate) fn global_norm(grads: &[Tensor]) -> Result<f64, TrainError> {
    let mut sum = 0f64;
    for g in grads {
        let s = g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?;
        sum += f64::from(s);
    }
    Ok(sum.sqrt())
}

/// `torch.nn.utils.clip_grad_norm_`: scales every gradient by `max / (norm + 1e-6)` when that is
/// below one. Returns the norm before clipping.
pub(crate) fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64, TrainError> {
    let norm = global_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// How the learning rate decays after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Decay {
    /// Linear to zero at the last step (transformers' default).
    #[default]
    Linear,
    /// Half a cosine to zero.
    Cosine,
    /// No decay.
    Constant,
}

/// Warmup then decay, as transformers' `get_{linear,cosine,constant}_schedule_with_warmup`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub decay: Decay,
}

impl Schedule {
    /// `warmup_steps = ceil(ratio * total)`, as transformers' `get_warmup_steps`.
    pub(crate) fn new(base_lr: f64, warmup_ratio: f64, total_steps: usize, decay: Decay) -> Self {
        Self {
            base_lr,
            warmup_steps: (warmup_ratio * total_steps as f64).ceil() as usize,
            total_steps,
            decay,
        }
    }

    /// Learning rate of optimizer step `step` (0-based).
    pub(crate) fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / span;
        let factor = match self.decay {
            Decay::Linear => (1.0 - progress).max(0.0),
            Decay::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
            Decay::Constant => 1.0,
        };
        self.base_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_first_step_moves_by_lr() -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1f32, -2.0], &dev)?)?;
        let mut opt = AdamW::new(
            vec![var.clone()],
            AdamWConfig {
                lr: 0.1,
                weight_decay: 0.0,
                ..Default::default()
            },
        );
        opt.step(&[Tensor::new(&[0.5f32, -3.0], &dev)?], 0.1)?;
        // Bias-corrected m/sqrt(v) is sign(g) on the first step.
        let p = var.as_tensor().to_vec1::<f32>()?;
        assert!(
            (p[0] - 0.9).abs() < 1e-6 && (p[1] + 1.9).abs() < 1e-6,
            "{p:?}"
        );
        Ok(())
    }

    #[test]
    fn weight_decay_is_decoupled() -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[2f32], &dev)?)?;
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![var.clone()], cfg);
        opt.step(&[Tensor::new(&[0f32], &dev)?], 0.1)?;
        // Zero gradient: only p *= 1 - lr * wd.
        assert!((var.as_tensor().to_vec1::<f32>()?[0] - 1.9).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn schedules_warm_up_and_decay() {
        let s = Schedule::new(1.0, 0.1, 100, Decay::Linear);
        assert_eq!(s.warmup_steps, 10);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(55) - 0.5).abs() < 1e-12);
        let c = Schedule::new(1.0, 0.0, 10, Decay::Cosine);
        assert!((c.lr(5) - 0.5).abs() < 1e-12);
        assert!(c.lr(0) == 1.0 && c.lr(10).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_to_max_norm() -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let mut g = vec![Tensor::new(&[3f32], &dev)?, Tensor::new(&[4f32], &dev)?];
        let norm = clip_grad_norm(&mut g, 1.0)?;
        assert!((norm - 5.0).abs() < 1e-9);
        assert!((global_norm(&g)? - 1.0).abs() < 1e-5);
        Ok(())
    }
}
