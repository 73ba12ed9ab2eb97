//! LoRA ([Hu et al. 2021](https://arxiv.org/abs/2106.09685)) and full fine-tuning at the model's
//! `Linear` seam.
//!
//! A LoRA module adds `scale * B(A(dropout(x)))` to a frozen projection, with `A [r, in]`,
//! `B [out, r]` and `scale = alpha / r` (rsLoRA: `alpha / sqrt(r)`), exactly like PEFT's
//! `lora.Linear`. A fully fine-tuned module replaces the projection with trainable copies of its
//! weight and bias. Both are [`LinearAdapter`]s, so the model code knows nothing about training.
//!
//! Adapters read a shared [`TrainMode`]: in training they hand candle's autograd their `Var`s and
//! apply dropout; otherwise they use detached tensors, so evaluation and inference take the model's
//! fast, graph-free kernels.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::{DType, Tensor, Var};

use crate::model::kernels::packed::Kernel;
use crate::model::lfm2_vl::{Lfm2VlModel, pack_where};
use crate::model::linear::{FrozenWeight, LinearAdapter, LinearVisitor};
use crate::model::ops;
use crate::rng::{SeededRng, mix, name_hash};
use crate::train::error::TrainError;
use crate::train::fused;

/// PEFT's prefix for tensor names of a `PeftModel` around a transformers model.
pub(crate) const PEFT_PREFIX: &str = "base_model.model.";

/// LoRA hyperparameters and where to apply them.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` of `A [r, in]` and `B [out, r]`.
    pub rank: usize,
    /// `lora_alpha`; the update is scaled by `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub alpha: f64,
    /// Dropout on the LoRA branch's input, in training only.
    pub dropout: f32,
    /// rsLoRA scaling ([Kalajdzievski 2023](https://arxiv.org/abs/2312.03732)).
    pub use_rslora: bool,
    /// Module names or dotted suffixes, matched like PEFT's `target_modules` list
    /// (`q_proj` matches `model.language_model.layers.0.self_attn.q_proj`).
    pub targets: Vec<String>,
    /// Also match modules of the vision tower and projector (PEFT would, by suffix; the tutorial's
    /// fine-tune excludes them).
    pub include_vision: bool,
    /// Seeds the initialisation of `A` and the dropout masks.
    pub seed: u64,
}

impl Default for LoraConfig {
    /// The published cats-vs-dogs recipe (r 8, alpha 16, dropout 0.05) on every LFM2 projection.
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            use_rslora: false,
            targets: LFM2_TARGETS.iter().map(|s| s.to_string()).collect(),
            include_vision: false,
            seed: 0,
        }
    }
}

/// Every linear projection of an LFM2 decoder layer.
pub const LFM2_TARGETS: [&str; 8] = [
    "q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3",
];

impl LoraConfig {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub(crate) fn scale(&self) -> f64 {
        lora_scale(self.alpha, self.rank, self.use_rslora)
    }

    fn validate(&self) -> Result<(), TrainError> {
        if self.rank == 0 {
            return Err(setting("lora.rank", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(setting("lora.dropout", "must be in [0, 1)"));
        }
        if !self.alpha.is_finite() {
            return Err(setting("lora.alpha", "must be finite"));
        }
        Ok(())
    }
}

/// PEFT's scaling rule.
pub(crate) fn lora_scale(alpha: f64, rank: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

fn setting(name: &'static str, message: impl Into<String>) -> TrainError {
    TrainError::Setting {
        name,
        message: message.into(),
    }
}

/// What to train: LoRA on some modules, full fine-tuning of others, or both.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainableSpec {
    pub lora: Option<LoraConfig>,
    /// Modules whose weight and bias are trained directly, matched like LoRA targets but over the
    /// whole model (e.g. `linear_1`, `linear_2` for the projector).
    pub full: Vec<String>,
}

/// Which part of LFM2-VL a linear module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ModulePart {
    VisionTower,
    Projector,
    LanguageModel,
}

impl ModulePart {
    fn label(self) -> &'static str {
        match self {
            ModulePart::VisionTower => "vision tower",
            ModulePart::Projector => "projector",
            ModulePart::LanguageModel => "language model",
        }
    }
}

/// One linear module: full name, part, `[out, in]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModuleInfo {
    pub name: String,
    pub part: ModulePart,
    pub in_dim: usize,
    pub out_dim: usize,
}

/// Every linear module of `model`, in checkpoint order.
pub(crate) fn linear_modules(model: &Lfm2VlModel) -> Vec<ModuleInfo> {
    let mut out = Vec::new();
    let push = |part: ModulePart| {
        move |l: &crate::model::linear::Linear| ModuleInfo {
            name: l.name().to_string(),
            part,
            in_dim: l.in_dim(),
            out_dim: l.out_dim(),
        }
    };
    let f = push(ModulePart::VisionTower);
    model.vision().visit_linears(&mut |l| out.push(f(l)));
    let f = push(ModulePart::Projector);
    model.projector().visit_linears(&mut |l| out.push(f(l)));
    let f = push(ModulePart::LanguageModel);
    model.text().visit_linears(&mut |l| out.push(f(l)));
    out
}

/// Packs, for `kernel`, every frozen weight a training step multiplies, as inference does
/// ([`crate::model::kernels::lora`] says why): all projections but the fully trained ones, and
/// the LM head (never trained; a tied embedding table then reads its rows from it). Where a
/// product's input is tracked (the decoder, a trained projector's input), its gradient reads the
/// packed weight too: through the fused LoRA op under an adapter, through
/// [`crate::model::ops`]'s packed differentiable product elsewhere. Returns how many were packed.
pub(crate) fn pack_frozen_weights(
    model: &mut Lfm2VlModel,
    fully_trained: &[String],
    kernel: Kernel,
) -> candle_core::Result<usize> {
    let mut packed = pack_where(model, kernel, &|lin| {
        !fully_trained.iter().any(|name| name == lin.name())
    })?;
    packed += usize::from(model.text_mut().pack_head_for_cpu(kernel)?);
    Ok(packed)
}

/// PEFT's `target_modules` rule: the exact name or a dotted suffix of it.
pub(crate) fn target_matches(module: &str, target: &str) -> bool {
    module == target
        || (module.len() > target.len()
            && module.ends_with(target)
            && module.as_bytes()[module.len() - target.len() - 1] == b'.')
}

/// The modules `targets` select among `modules` restricted to `parts`, in model order.
///
/// Every target must match at least one module; otherwise the error lists the real module names
/// (the tutorial's `o_proj`/`gate_proj` silently matched nothing in PEFT).
pub(crate) fn select_modules<'a>(
    modules: &'a [ModuleInfo],
    targets: &[String],
    parts: &[ModulePart],
) -> Result<Vec<&'a ModuleInfo>, TrainError> {
    let in_scope: Vec<&ModuleInfo> = modules.iter().filter(|m| parts.contains(&m.part)).collect();
    for target in targets {
        if !in_scope.iter().any(|m| target_matches(&m.name, target)) {
            let mut available = describe_modules(modules, parts);
            if modules
                .iter()
                .any(|m| !parts.contains(&m.part) && target_matches(&m.name, target))
            {
                available
                    .push_str(" (it matches the vision tower or projector, which are excluded)");
            }
            return Err(TrainError::UnknownTarget {
                target: target.clone(),
                available,
            });
        }
    }
    Ok(in_scope
        .into_iter()
        .filter(|m| targets.iter().any(|t| target_matches(&m.name, t)))
        .collect())
}

/// `language model: in_proj, k_proj, ...; vision tower: ...` over the parts in scope.
fn describe_modules(modules: &[ModuleInfo], parts: &[ModulePart]) -> String {
    let mut groups = Vec::new();
    for part in [
        ModulePart::LanguageModel,
        ModulePart::VisionTower,
        ModulePart::Projector,
    ] {
        if !parts.contains(&part) {
            continue;
        }
        let leaves: BTreeSet<&str> = modules
            .iter()
            .filter(|m| m.part == part)
            .filter_map(|m| m.name.rsplit('.').next())
            .collect();
        let leaves: Vec<&str> = leaves.into_iter().collect();
        groups.push(format!("{}: {}", part.label(), leaves.join(", ")));
    }
    groups.join("; ")
}

/// Training flag, micro-batch counter and seed shared by every adapter of one model.
#[derive(Debug)]
pub struct TrainMode {
    training: AtomicBool,
    micro_step: AtomicU64,
    seed: u64,
}

impl TrainMode {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            training: AtomicBool::new(false),
            micro_step: AtomicU64::new(0),
            seed,
        }
    }

    pub(crate) fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// Dropout masks depend on (seed, micro-batch, module), so a resumed run draws the same masks.
    pub(crate) fn set_micro_step(&self, step: u64) {
        self.micro_step.store(step, Ordering::Relaxed);
    }

    fn dropout_rng(&self, module_index: u64) -> SeededRng {
        let step = self.micro_step.load(Ordering::Relaxed);
        SeededRng::from_words(&[self.seed, step, module_index, 0x6c6f_7261])
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    mix(&[seed, name_hash(name)])
}

/// Applies `f` to `x [..., in]` as a 2-D `[rows, in]` matrix and restores the leading dims.
fn on_rows(
    x: &Tensor,
    out_dim: usize,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let Some((&in_dim, lead)) = dims.split_last() else {
        candle_core::bail!("adapter got a scalar input")
    };
    let rows: usize = lead.iter().product();
    let y = f(&x.reshape((rows, in_dim))?)?;
    let mut out = lead.to_vec();
    out.push(out_dim);
    y.reshape(out)
}

/// `y = W x + scale * B(A(dropout(x)))`.
#[derive(Debug)]
pub struct LoraAdapter {
    module: String,
    index: u64,
    a: Var,
    b: Var,
    scale: f64,
    dropout: f32,
    mode: Arc<TrainMode>,
}

impl LoraAdapter {
    /// Wraps `a [r, in]` and `b [out, r]` (copied into fresh `Var`s).
    pub(crate) fn new(
        module: impl Into<String>,
        index: u64,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        dropout: f32,
        mode: Arc<TrainMode>,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            module: module.into(),
            index,
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            scale,
            dropout,
            mode,
        })
    }

    pub(crate) fn module(&self) -> &str {
        &self.module
    }

    pub(crate) fn a(&self) -> &Var {
        &self.a
    }

    pub(crate) fn b(&self) -> &Var {
        &self.b
    }

    pub(crate) fn scale(&self) -> f64 {
        self.scale
    }

    pub fn rank(&self) -> usize {
        self.a.dim(0).unwrap_or(0)
    }

    /// This micro-batch's dropout multipliers (0 or `1 / (1 - p)`) for `len` inputs.
    fn dropout_values(&self, len: usize) -> Vec<f32> {
        let p = self.dropout;
        let keep = 1.0 / (1.0 - p);
        let mut rng = self.mode.dropout_rng(self.index);
        (0..len)
            .map(|_| if rng.uniform_f32() < p { 0.0 } else { keep })
            .collect()
    }

    fn dropout_mask(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mask = self.dropout_values(x.elem_count());
        Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())
    }
}

impl LinearAdapter for LoraAdapter {
    /// In training on CPU f32, the frozen product and this branch as one op with its own backward
    /// ([`fused::lora_linear`]); the same numbers up to summation order.
    fn forward_fused(
        &self,
        input: &Tensor,
        weight: FrozenWeight<'_>,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Option<Tensor>> {
        if !self.mode.is_training() || !crate::model::autograd::enabled() {
            return Ok(None);
        }
        let mask = (self.dropout > 0.0).then(|| self.dropout_values(input.elem_count()));
        fused::lora_linear(
            input,
            weight.0,
            bias,
            self.a.as_tensor(),
            self.b.as_tensor(),
            self.scale,
            mask,
        )
    }

    fn forward(&self, input: &Tensor, base_output: Tensor) -> candle_core::Result<Tensor> {
        let training = self.mode.is_training();
        let (a, b) = if training {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        } else {
            (self.a.as_detached_tensor(), self.b.as_detached_tensor())
        };
        let (a, b) = (a.to_dtype(input.dtype())?, b.to_dtype(input.dtype())?);
        let x = if training && self.dropout > 0.0 {
            (input * self.dropout_mask(input)?)?
        } else {
            input.clone()
        };
        let out_dim = b.dim(0)?;
        let delta = on_rows(&x, out_dim, |x2| {
            ops::matmul_wt(&ops::matmul_wt(x2, &a)?, &b)? * self.scale
        })?;
        base_output + delta
    }
}

/// Replaces a projection by trainable copies of its weight and bias (full fine-tuning).
///
/// The frozen projection still runs (the seam passes its output), which costs one extra matmul for
/// these few modules; in exchange the model needs no training-specific code.
#[derive(Debug)]
pub(crate) struct FullAdapter {
    module: String,
    weight: Var,
    bias: Option<Var>,
    mode: Arc<TrainMode>,
}

impl FullAdapter {
    pub(crate) fn new(
        module: impl Into<String>,
        weight: &Tensor,
        bias: Option<&Tensor>,
        mode: Arc<TrainMode>,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            module: module.into(),
            weight: Var::from_tensor(&weight.to_dtype(DType::F32)?)?,
            bias: bias
                .map(|b| Var::from_tensor(&b.to_dtype(DType::F32)?))
                .transpose()?,
            mode,
        })
    }

    pub(crate) fn module(&self) -> &str {
        &self.module
    }

    pub(crate) fn weight(&self) -> &Var {
        &self.weight
    }

    pub(crate) fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
    }
}

impl LinearAdapter for FullAdapter {
    fn forward(&self, input: &Tensor, _base_output: Tensor) -> candle_core::Result<Tensor> {
        let training = self.mode.is_training();
        let get = |v: &Var| {
            if training {
                v.as_tensor().clone()
            } else {
                v.as_detached_tensor()
            }
        };
        let w = get(&self.weight).to_dtype(input.dtype())?;
        let out_dim = w.dim(0)?;
        on_rows(input, out_dim, |x2| {
            let y = ops::matmul_wt(x2, &w)?;
            match &self.bias {
                Some(b) => y.broadcast_add(&get(b).to_dtype(input.dtype())?),
                None => Ok(y),
            }
        })
    }
}

/// The adapters attached to a model, with the shared mode switch.
#[derive(Debug, Clone)]
pub struct Trainable {
    mode: Arc<TrainMode>,
    lora: Vec<Arc<LoraAdapter>>,
    full: Vec<Arc<FullAdapter>>,
    lora_config: Option<LoraConfig>,
}

/// A trainable tensor with its PEFT-style name.
#[derive(Debug, Clone)]
pub struct NamedVar {
    pub name: String,
    pub var: Var,
}

impl Trainable {
    /// Validates `spec` against `model`'s modules and attaches fresh adapters: LoRA `A` with
    /// PEFT's default init (kaiming-uniform, a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), `B`
    /// zero, so training starts from the base model; full modules start from their weights.
    pub fn attach(model: &mut Lfm2VlModel, spec: &TrainableSpec) -> Result<Self, TrainError> {
        let seed = spec.lora.as_ref().map_or(0, |l| l.seed);
        let mode = Arc::new(TrainMode::new(seed));
        let modules = linear_modules(model);
        let all_parts = [
            ModulePart::VisionTower,
            ModulePart::Projector,
            ModulePart::LanguageModel,
        ];
        let full_names: Vec<String> = select_modules(&modules, &spec.full, &all_parts)?
            .into_iter()
            .map(|m| m.name.clone())
            .collect();
        let mut lora_inits = Vec::new();
        if let Some(cfg) = &spec.lora {
            cfg.validate()?;
            let parts: &[ModulePart] = if cfg.include_vision {
                &all_parts
            } else {
                &[ModulePart::LanguageModel]
            };
            for m in select_modules(&modules, &cfg.targets, parts)? {
                if full_names.contains(&m.name) {
                    continue;
                }
                let mut rng = SeededRng::new(name_seed(cfg.seed, &m.name));
                let bound = 1.0 / (m.in_dim as f32).sqrt();
                let a: Vec<f32> = (0..cfg.rank * m.in_dim)
                    .map(|_| (rng.uniform_f32() * 2.0 - 1.0) * bound)
                    .collect();
                let dev = model.device();
                let a = Tensor::from_vec(a, (cfg.rank, m.in_dim), dev)?;
                let b = Tensor::zeros((m.out_dim, cfg.rank), DType::F32, dev)?;
                lora_inits.push((m.name.clone(), a, b));
            }
        }
        if full_names.is_empty() && lora_inits.is_empty() {
            return Err(TrainError::NothingToTrain);
        }
        let mut out = Self {
            mode: mode.clone(),
            lora: Vec::new(),
            full: Vec::new(),
            lora_config: spec.lora.clone(),
        };
        let (scale, dropout) = spec
            .lora
            .as_ref()
            .map_or((1.0, 0.0), |c| (c.scale(), c.dropout));
        let mut index = 0u64;
        let mut failure = None;
        model.visit_linears_mut(&mut |lin| {
            if failure.is_some() {
                return;
            }
            let name = lin.name().to_string();
            let result = if full_names.contains(&name) {
                lin.weight()
                    .and_then(|w| FullAdapter::new(&name, &w, lin.bias(), mode.clone()))
                    .map(|a| {
                        let a = Arc::new(a);
                        lin.set_adapter(Some(a.clone()));
                        out.full.push(a);
                    })
            } else if let Some((_, a, b)) = lora_inits.iter().find(|(n, _, _)| *n == name) {
                LoraAdapter::new(&name, index, a, b, scale, dropout, mode.clone()).map(|a| {
                    let a = Arc::new(a);
                    lin.set_adapter(Some(a.clone()));
                    out.lora.push(a);
                })
            } else {
                Ok(())
            };
            index += 1;
            if let Err(e) = result {
                failure = Some(e);
            }
        });
        if let Some(e) = failure {
            return Err(e.into());
        }
        if let Some(kernel) = Kernel::for_this_cpu() {
            pack_frozen_weights(model, &full_names, kernel)?;
        }
        Ok(out)
    }

    /// Builds the set around adapters already attached (loaded from files).
    pub(crate) fn from_parts(
        mode: Arc<TrainMode>,
        lora: Vec<Arc<LoraAdapter>>,
        full: Vec<Arc<FullAdapter>>,
        lora_config: Option<LoraConfig>,
    ) -> Self {
        Self {
            mode,
            lora,
            full,
            lora_config,
        }
    }

    pub fn mode(&self) -> &Arc<TrainMode> {
        &self.mode
    }

    pub fn lora(&self) -> &[Arc<LoraAdapter>] {
        &self.lora
    }

    pub(crate) fn full(&self) -> &[Arc<FullAdapter>] {
        &self.full
    }

    pub(crate) fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora_config.as_ref()
    }

    /// Every trainable tensor with its PEFT name, in model order.
    pub fn named_vars(&self) -> Vec<NamedVar> {
        let mut out = Vec::new();
        for l in &self.lora {
            out.push(NamedVar {
                name: format!("{PEFT_PREFIX}{}.lora_A.weight", l.module),
                var: l.a.clone(),
            });
            out.push(NamedVar {
                name: format!("{PEFT_PREFIX}{}.lora_B.weight", l.module),
                var: l.b.clone(),
            });
        }
        for f in &self.full {
            out.push(NamedVar {
                name: format!("{PEFT_PREFIX}{}.weight", f.module),
                var: f.weight.clone(),
            });
            if let Some(b) = &f.bias {
                out.push(NamedVar {
                    name: format!("{PEFT_PREFIX}{}.bias", f.module),
                    var: b.clone(),
                });
            }
        }
        out
    }

    /// Number of trained scalars.
    pub fn num_parameters(&self) -> usize {
        self.named_vars().iter().map(|v| v.var.elem_count()).sum()
    }

    /// True when a vision-tower module is trained (image features then need gradients).
    pub fn trains_vision_tower(&self, model: &Lfm2VlModel) -> bool {
        let vision: Vec<String> = {
            let mut names = Vec::new();
            model
                .vision()
                .visit_linears(&mut |l| names.push(l.name().to_string()));
            names
        };
        self.lora
            .iter()
            .map(|l| l.module.as_str())
            .chain(self.full.iter().map(|f| f.module.as_str()))
            .any(|m| vision.iter().any(|v| v == m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str, part: ModulePart) -> ModuleInfo {
        ModuleInfo {
            name: name.into(),
            part,
            in_dim: 4,
            out_dim: 4,
        }
    }

    /// Training packs every frozen weight (the projections, trained image path or not, and the
    /// LM head) and leaves fully trained modules dense; the packed image path gives the features
    /// it gave dense.
    #[test]
    fn pack_frozen_weights_packs_all_but_fully_trained_modules() -> candle_core::Result<()> {
        use crate::model::load::checkpoint::LoadOptions;
        use crate::model::load::random_checkpoint::{random_model, tiny_test_config};
        let cfg = tiny_test_config();
        let packed_names = |model: &Lfm2VlModel| {
            let mut names = Vec::new();
            model.visit_linears(&mut |l| {
                if l.weight_matrix().is_packed() {
                    names.push(l.name().to_string());
                }
            });
            names
        };
        let dev = candle_core::Device::Cpu;
        let patch_dim = cfg.vision.patch_dim();
        let pixels = Tensor::rand(-1f32, 1.0, (1, 16, patch_dim), &dev)?;
        let mask = Tensor::ones((1, 16), DType::U32, &dev)?;

        let mut model = random_model(&cfg, &LoadOptions::default(), 3)?;
        let dense_features = model.image_features(&pixels, &mask, &[(4, 4)])?;
        let modules = linear_modules(&model);
        let count = pack_frozen_weights(&mut model, &[], Kernel::Portable)?;
        let packed = packed_names(&model);
        // Every projection and the LM head.
        assert_eq!(packed.len(), modules.len());
        assert_eq!(count, modules.len() + 1);
        assert!(model.text().lm_head_matrix().is_packed());
        let packed_features = model.image_features(&pixels, &mask, &[(4, 4)])?;
        let diff = (dense_features - packed_features)?.abs()?.max_all()?;
        assert!(diff.to_scalar::<f32>()? < 1e-5);

        // Fully trained modules (one of the decoder, one of the image path) stay dense.
        let full: Vec<String> = [ModulePart::LanguageModel, ModulePart::Projector]
            .iter()
            .filter_map(|part| modules.iter().find(|m| m.part == *part))
            .map(|m| m.name.clone())
            .collect();
        assert_eq!(full.len(), 2);
        let mut model = random_model(&cfg, &LoadOptions::default(), 3)?;
        pack_frozen_weights(&mut model, &full, Kernel::Portable)?;
        let packed = packed_names(&model);
        assert_eq!(packed.len(), modules.len() - full.len());
        assert!(!full.iter().any(|n| packed.contains(n)));
        Ok(())
    }

    #[test]
    fn suffix_matching_follows_peft() {
        assert!(target_matches("a.self_attn.q_proj", "q_proj"));
        assert!(target_matches("a.self_attn.q_proj", "self_attn.q_proj"));
        assert!(target_matches("q_proj", "q_proj"));
        assert!(!target_matches("a.self_attn.xq_proj", "q_proj"));
        assert!(!target_matches("a.q_proj.x", "q_proj"));
    }

    #[test]
    fn unknown_target_lists_real_names() {
        let modules = vec![
            module("v.layers.0.self_attn.q_proj", ModulePart::VisionTower),
            module("m.linear_1", ModulePart::Projector),
            module("l.layers.0.self_attn.q_proj", ModulePart::LanguageModel),
            module("l.layers.0.feed_forward.w1", ModulePart::LanguageModel),
        ];
        let err = select_modules(&modules, &["o_proj".into()], &[ModulePart::LanguageModel])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("`o_proj`"), "{err}");
        assert!(err.contains("language model: q_proj, w1"), "{err}");
        let err = select_modules(&modules, &["linear_1".into()], &[ModulePart::LanguageModel])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("excluded"), "{err}");
        let picked = select_modules(
            &modules,
            &["q_proj".into()],
            &[ModulePart::LanguageModel, ModulePart::VisionTower],
        )
        .map(|v| v.len())
        .unwrap_or(0);
        assert_eq!(picked, 2);
    }

    #[test]
    fn lora_adapter_adds_scaled_low_rank_term() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let mode = Arc::new(TrainMode::new(0));
        let a = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev)?;
        let b = Tensor::new(&[[1f32, 1.0]], &dev)?;
        let lora = LoraAdapter::new("m", 0, &a, &b, 2.0, 0.0, mode)?;
        let x = Tensor::new(&[[[3f32, 4.0]]], &dev)?;
        let base = Tensor::new(&[[[1f32]]], &dev)?;
        let y = lora.forward(&x, base)?.flatten_all()?.to_vec1::<f32>()?;
        // 1 + 2 * (3 + 4)
        assert_eq!(y, vec![15.0]);
        Ok(())
    }

    #[test]
    fn dropout_is_seeded_by_step_and_off_in_eval() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let mode = Arc::new(TrainMode::new(7));
        // Distinct weights per input, so different masks give different outputs.
        let a = Tensor::arange(0f32, 128.0, &dev)?.reshape((2, 64))?;
        let b = Tensor::ones((1, 2), DType::F32, &dev)?;
        let lora = LoraAdapter::new("m", 3, &a, &b, 1.0, 0.5, mode.clone())?;
        let x = Tensor::ones((1, 64), DType::F32, &dev)?;
        let zero = Tensor::zeros((1, 1), DType::F32, &dev)?;
        let run = |step| -> candle_core::Result<f32> {
            mode.set_micro_step(step);
            lora.forward(&x, zero.clone())?
                .flatten_all()?
                .to_vec1::<f32>()
                .map(|v| v[0])
        };
        // Without dropout: sum over i of (i + (64 + i)) = 8128.
        assert_eq!(run(0)?, 8128.0);
        mode.set_training(true);
        let (first, again, other) = (run(1)?, run(1)?, run(2)?);
        assert_eq!(first, again);
        assert_ne!(first, other);
        assert_ne!(first, 8128.0);
        Ok(())
    }
}
