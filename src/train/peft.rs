//! Adapters on disk in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Tensor names are PEFT's saved names, `base_model.model.<module>.lora_A.weight` (`[r, in]`) and
//! `….lora_B.weight` (`[out, r]`); fully trained modules are PEFT's `modules_to_save`, saved as
//! `base_model.model.<module>.weight`/`.bias`. Loading places tensors by name rather than by
//! re-matching `target_modules`, because PEFT's suffix rule would also hit the vision tower.
//! Writing lists full module names in `target_modules`, so PEFT attaches exactly the modules that
//! have tensors.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use crate::file_error::FileError;
use crate::model::lfm2_vl::Lfm2VlModel;
use crate::model::linear::LinearVisitor;
use crate::train::error::TrainError;
use crate::train::io::{read_safetensors, write_atomic, write_safetensors};
use crate::train::lora::{
    FullAdapter, LoraAdapter, LoraConfig, PEFT_PREFIX, TrainMode, Trainable, lora_scale,
    target_matches,
};

/// The vision tower's prefix in the Hub layout (and in transformers 4.x modules) ...
const HUB_VISION: &str = "model.vision_tower.vision_model.";
/// ... and in transformers 5.x modules, which PEFT's saved names follow.
const V5_VISION: &str = "model.vision_tower.";

/// A module name as PEFT under transformers 5.x writes it (`vision_model.` dropped).
pub(crate) fn peft_module_name(module: &str) -> String {
    match module.strip_prefix(HUB_VISION) {
        Some(rest) => format!("{V5_VISION}{rest}"),
        None => module.to_string(),
    }
}

/// The name among `known` that a PEFT module name refers to: itself, or with the Hub layout's
/// `vision_model.` restored.
pub(crate) fn resolve_module_name(name: &str, known: impl Fn(&str) -> bool) -> Option<String> {
    if known(name) {
        return Some(name.to_string());
    }
    let rest = name.strip_prefix(V5_VISION)?;
    let hub = format!("{HUB_VISION}{rest}");
    known(&hub).then_some(hub)
}

pub(crate) use crate::model::load::resolve::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
/// The way out for an adapter vlmpipe cannot apply.
const MERGE_IN_PYTHON: &str = "merge it into its base model with PEFT (`merge_and_unload()` then \
     `save_pretrained`) and load the result as a model (`local(...)`, `--model`)";

/// One LoRA module's weights.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// Full dotted module name, e.g. `model.language_model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    pub scale: f64,
}

/// One fully trained module's weights.
#[derive(Debug, Clone)]
pub struct FullWeights {
    pub module: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// An adapter independent of any model: hyperparameters and tensors.
///
/// Module names are PEFT's (transformers 5.x); [`PeftAdapter::attach`] and
/// [`crate::train::merge::merge_checkpoint`] map them onto the model's own names.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub use_rslora: bool,
    /// As written in the config (module names or suffixes).
    pub target_modules: Vec<String>,
    pub base_model: Option<String>,
    pub lora: Vec<LoraWeights>,
    pub full: Vec<FullWeights>,
}

impl PeftAdapter {
    /// Snapshots the current values of a trainable set.
    pub(crate) fn from_trainable(
        t: &Trainable,
        base_model: Option<&str>,
    ) -> Result<Self, TrainError> {
        let cfg = t.lora_config().cloned().unwrap_or(LoraConfig {
            targets: Vec::new(),
            ..LoraConfig::default()
        });
        // Copies: a `Var`'s detached tensor shares storage that later optimizer steps overwrite.
        let snapshot = |v: &candle_core::Var| v.as_detached_tensor().copy();
        let lora = t
            .lora()
            .iter()
            .map(|l| {
                Ok(LoraWeights {
                    module: peft_module_name(l.module()),
                    a: snapshot(l.a())?,
                    b: snapshot(l.b())?,
                    scale: l.scale(),
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let full = t
            .full()
            .iter()
            .map(|f| {
                Ok(FullWeights {
                    module: peft_module_name(f.module()),
                    weight: snapshot(f.weight())?,
                    bias: f.bias().map(snapshot).transpose()?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            rank: cfg.rank,
            alpha: cfg.alpha,
            dropout: cfg.dropout,
            use_rslora: cfg.use_rslora,
            target_modules: t
                .lora()
                .iter()
                .map(|l| peft_module_name(l.module()))
                .collect(),
            base_model: base_model.map(str::to_string),
            lora,
            full,
        })
    }

    /// Trained scalars.
    pub fn num_parameters(&self) -> usize {
        let lora: usize = self
            .lora
            .iter()
            .map(|l| l.a.elem_count() + l.b.elem_count())
            .sum();
        let full: usize = self
            .full
            .iter()
            .map(|f| f.weight.elem_count() + f.bias.as_ref().map_or(0, Tensor::elem_count))
            .sum();
        lora + full
    }

    /// Every tensor under its PEFT name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for l in &self.lora {
            out.push((
                format!("{PEFT_PREFIX}{}.lora_A.weight", l.module),
                l.a.clone(),
            ));
            out.push((
                format!("{PEFT_PREFIX}{}.lora_B.weight", l.module),
                l.b.clone(),
            ));
        }
        for f in &self.full {
            out.push((
                format!("{PEFT_PREFIX}{}.weight", f.module),
                f.weight.clone(),
            ));
            if let Some(b) = &f.bias {
                out.push((format!("{PEFT_PREFIX}{}.bias", f.module), b.clone()));
            }
        }
        out
    }

    /// The `adapter_config.json` PEFT reads.
    pub(crate) fn config_json(&self) -> Value {
        let mut targets: Vec<&String> = self.target_modules.iter().collect();
        targets.sort();
        targets.dedup();
        let modules_to_save: Option<Vec<&String>> =
            (!self.full.is_empty()).then(|| self.full.iter().map(|f| &f.module).collect());
        json!({
            "peft_type": "LORA",
            "task_type": null,
            "base_model_name_or_path": self.base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": shortest_f64(self.dropout),
            "use_rslora": self.use_rslora,
            "target_modules": targets,
            "modules_to_save": modules_to_save,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "use_dora": false,
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }

    /// Writes the two files into `dir` (created if needed), each atomically.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        std::fs::create_dir_all(dir).map_err(FileError::create(dir))?;
        let config =
            serde_json::to_string_pretty(&self.config_json()).map_err(|e| TrainError::Json {
                path: dir.join(ADAPTER_CONFIG),
                message: e.to_string(),
            })?;
        write_atomic(&dir.join(ADAPTER_CONFIG), config.as_bytes())?;
        write_safetensors(&dir.join(ADAPTER_WEIGHTS), &self.named_tensors())
    }

    /// Reads a PEFT LoRA adapter directory (written by PEFT or by [`Self::save`]).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, TrainError> {
        let config_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&config_path).map_err(FileError::read(&config_path))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| TrainError::Json {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
        let bad = |message: String| TrainError::Adapter {
            path: config_path.clone(),
            message,
        };
        if let Some(kind) = json.get("peft_type").and_then(Value::as_str)
            && kind != "LORA"
        {
            return Err(bad(format!(
                "`peft_type` is `{kind}`, only `LORA` is supported; {MERGE_IN_PYTHON}"
            )));
        }
        if json.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(bad(format!(
                "DoRA adapters are not supported; {MERGE_IN_PYTHON}"
            )));
        }
        let rank = json
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("`r` is missing".into()))? as usize;
        let alpha = json
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .unwrap_or(rank as f64);
        let dropout = json
            .get("lora_dropout")
            .and_then(Value::as_f64)
            .unwrap_or(0.0) as f32;
        let use_rslora = json
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let target_modules = match json.get("target_modules") {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        };
        let alpha_pattern: BTreeMap<String, f64> = json
            .get("alpha_pattern")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_f64().map(|a| (k.clone(), a)))
                    .collect()
            })
            .unwrap_or_default();
        let base_model = json
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string);

        let weights_path = dir.join(ADAPTER_WEIGHTS);
        let tensors = read_safetensors(&weights_path, device)?;
        let bad_w = |message: String| TrainError::Adapter {
            path: weights_path.clone(),
            message,
        };
        let mut a_of = BTreeMap::new();
        let mut b_of = BTreeMap::new();
        let mut w_of = BTreeMap::new();
        let mut bias_of = BTreeMap::new();
        for (name, t) in tensors {
            let Some(rest) = name.strip_prefix(PEFT_PREFIX) else {
                return Err(bad_w(format!(
                    "tensor `{name}` does not start with `{PEFT_PREFIX}`"
                )));
            };
            let t = t.to_dtype(DType::F32)?;
            if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                a_of.insert(m.to_string(), t);
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                b_of.insert(m.to_string(), t);
            } else if let Some(m) = rest.strip_suffix(".weight") {
                w_of.insert(m.to_string(), t);
            } else if let Some(m) = rest.strip_suffix(".bias") {
                bias_of.insert(m.to_string(), t);
            } else {
                return Err(bad_w(format!(
                    "tensor `{name}` is neither LoRA nor a module weight"
                )));
            }
        }
        let mut lora = Vec::new();
        for (module, a) in a_of {
            let b = b_of
                .remove(&module)
                .ok_or_else(|| bad_w(format!("`{module}` has lora_A but no lora_B")))?;
            let (r, _) = a.dims2()?;
            let (_, rb) = b.dims2()?;
            if r != rb {
                return Err(bad_w(format!(
                    "`{module}`: lora_A has rank {r}, lora_B {rb}"
                )));
            }
            let module_alpha = alpha_pattern
                .iter()
                .find(|(k, _)| target_matches(&module, k))
                .map_or(alpha, |(_, &a)| a);
            lora.push(LoraWeights {
                scale: lora_scale(module_alpha, r, use_rslora),
                module,
                a,
                b,
            });
        }
        if let Some(module) = b_of.keys().next() {
            return Err(bad_w(format!("`{module}` has lora_B but no lora_A")));
        }
        let mut full = Vec::new();
        for (module, weight) in w_of {
            let bias = bias_of.remove(&module);
            full.push(FullWeights {
                module,
                weight,
                bias,
            });
        }
        if let Some(module) = bias_of.keys().next() {
            return Err(bad_w(format!("`{module}` has a bias but no weight")));
        }
        Ok(Self {
            rank,
            alpha,
            dropout,
            use_rslora,
            target_modules,
            base_model,
            lora,
            full,
        })
    }

    /// Attaches the adapter to `model` for inference (no dropout, detached tensors); returns the
    /// attached set, whose mode can be switched to training to continue training it.
    ///
    /// Every tensor must name a linear module of `model` with matching shapes.
    pub fn attach(&self, model: &mut Lfm2VlModel) -> Result<Trainable, TrainError> {
        let mut shapes = BTreeMap::new();
        model.visit_linears(&mut |l| {
            shapes.insert(l.name().to_string(), (l.out_dim(), l.in_dim()));
        });
        let names: BTreeSet<&str> = self
            .lora
            .iter()
            .map(|l| l.module.as_str())
            .chain(self.full.iter().map(|f| f.module.as_str()))
            .collect();
        let path = std::path::PathBuf::from(self.base_model.clone().unwrap_or_default());
        // PEFT name -> the model's own name.
        let mut resolved: BTreeMap<&str, String> = BTreeMap::new();
        for name in names {
            let Some(own) = resolve_module_name(name, |n| shapes.contains_key(n)) else {
                let sample: Vec<&String> = shapes.keys().take(6).collect();
                return Err(TrainError::Adapter {
                    path,
                    message: format!(
                        "module `{name}` is not a linear module of this model (its modules look \
                         like {sample:?}); an adapter fits only the base model it was trained on{}",
                        self.base_model
                            .as_ref()
                            .map(|b| format!(" (its config names `{b}`)"))
                            .unwrap_or_default()
                    ),
                });
            };
            resolved.insert(name, own);
        }
        let own = |peft: &str| -> String {
            resolved
                .get(peft)
                .cloned()
                .unwrap_or_else(|| peft.to_string())
        };
        for l in &self.lora {
            let (out, inp) = shapes[&own(&l.module)];
            let (_, a_in) = l.a.dims2()?;
            let (b_out, _) = l.b.dims2()?;
            if (a_in, b_out) != (inp, out) {
                return Err(TrainError::Adapter {
                    path: path.clone(),
                    message: format!(
                        "`{}`: adapter is {b_out}x{a_in}, the module is {out}x{inp}; an adapter \
                         fits only the base model it was trained on",
                        l.module
                    ),
                });
            }
        }
        let mode = Arc::new(TrainMode::new(0));
        let mut lora_out = Vec::new();
        let mut full_out = Vec::new();
        let mut failure = None;
        let mut index = 0u64;
        model.visit_linears_mut(&mut |lin| {
            let name = lin.name().to_string();
            let result = if let Some(l) = self.lora.iter().find(|l| own(&l.module) == name) {
                LoraAdapter::new(
                    &name,
                    index,
                    &l.a,
                    &l.b,
                    l.scale,
                    self.dropout,
                    mode.clone(),
                )
                .map(|a| {
                    let a = Arc::new(a);
                    lin.set_adapter(Some(a.clone()));
                    lora_out.push(a);
                })
            } else if let Some(f) = self.full.iter().find(|f| own(&f.module) == name) {
                FullAdapter::new(&name, &f.weight, f.bias.as_ref(), mode.clone()).map(|a| {
                    let a = Arc::new(a);
                    lin.set_adapter(Some(a.clone()));
                    full_out.push(a);
                })
            } else {
                Ok(())
            };
            index += 1;
            if let Err(e) = result
                && failure.is_none()
            {
                failure = Some(e);
            }
        });
        if let Some(e) = failure {
            return Err(e.into());
        }
        let cfg = LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            use_rslora: self.use_rslora,
            targets: self.target_modules.clone(),
            include_vision: true,
            seed: 0,
        };
        Ok(Trainable::from_parts(mode, lora_out, full_out, Some(cfg)))
    }
}

/// The f64 with the shortest decimal that reads back as `x`: `0.05f32` is `0.05`, not the
/// `0.05000000074505806` of a plain widening, so the config says what the pipeline wrote.
fn shortest_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_the_hub_base_and_the_dropout_as_written() {
        let adapter = PeftAdapter {
            rank: 4,
            alpha: 8.0,
            dropout: 0.05,
            use_rslora: false,
            target_modules: vec!["q_proj".into()],
            base_model: Some("LiquidAI/LFM2-VL-450M".into()),
            lora: Vec::new(),
            full: Vec::new(),
        };
        let config = adapter.config_json();
        assert_eq!(config["lora_dropout"].to_string(), "0.05");
        assert_eq!(config["base_model_name_or_path"], "LiquidAI/LFM2-VL-450M");
        for x in [0.1f32, 0.0, 0.3, 1e-3] {
            assert_eq!(shortest_f64(x).to_string(), x.to_string());
        }
    }

    #[test]
    fn vision_names_map_between_layouts() {
        let hub = "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj";
        let v5 = "model.vision_tower.encoder.layers.0.self_attn.q_proj";
        assert_eq!(peft_module_name(hub), v5);
        let lm = "model.language_model.layers.0.self_attn.q_proj";
        assert_eq!(peft_module_name(lm), lm);
        assert_eq!(resolve_module_name(v5, |n| n == hub).as_deref(), Some(hub));
        assert_eq!(resolve_module_name(hub, |n| n == hub).as_deref(), Some(hub));
        assert_eq!(resolve_module_name(lm, |n| n == hub), None);
    }
}
