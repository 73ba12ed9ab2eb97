//! `Lfm2VlModel`: vision tower + projector + LFM2 decoder, with the image-feature splice.
//!
//! Data flow: padded views `[views, P, C*p*p]` → real patches packed → [`VisionTower`] → pixel
//! unshuffle + [`Projector`] → image features `[image tokens, D]` → spliced into the token embeddings
//! at every `image_token_id` → [`TextModel`] → logits. Each stage is public so tests can compare
//! every intermediate with transformers.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::config::Config;
use crate::model::kernels::packed::Kernel;
use crate::model::linear::{Linear, LinearVisitor};
use crate::model::projector::Projector;
use crate::model::text::{TextCache, TextModel};
use crate::model::vision::{self, ViewSpan, VisionTower};

/// Which positions get logits: the LM head over a 65k vocabulary dominates short prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// `[B, L, vocab]`.
    All,
    /// `[B, vocab]`: the last position of each row (real for left-padded batches).
    Last,
}

/// Every intermediate of the image path, for parity tests.
#[derive(Debug, Clone)]
pub struct ImageIntermediates {
    /// Real patches of each view, back to back.
    pub spans: Vec<ViewSpan>,
    /// `[N, Dv]` patch + position embeddings of the real patches.
    pub vision_embeddings: Tensor,
    /// `[N, Dv]` after `post_layernorm`.
    pub vision_last_hidden_state: Tensor,
    /// `[tokens, Dv * f^2]` before the projector LayerNorm.
    pub projector_unshuffled: Tensor,
    /// `[tokens, D]`.
    pub image_features: Tensor,
}

/// LFM2-VL for conditional generation.
#[derive(Debug, Clone)]
pub struct Lfm2VlModel {
    vision: VisionTower,
    projector: Projector,
    text: TextModel,
    cfg: Config,
}

/// Where each part lives in a checkpoint (the Hub and transformers 5.x differ).
#[derive(Debug, Clone)]
pub struct WeightPrefixes {
    pub vision_model: String,
    pub projector: String,
    pub language_model: String,
    /// `Some(name)` when the checkpoint stores an untied LM head.
    pub lm_head: Option<String>,
}

impl Default for WeightPrefixes {
    /// The Hub layout.
    fn default() -> Self {
        Self {
            vision_model: "model.vision_tower.vision_model".into(),
            projector: "model.multi_modal_projector".into(),
            language_model: "model.language_model".into(),
            lm_head: None,
        }
    }
}

impl Lfm2VlModel {
    /// Builds the network from weights under `prefixes`.
    pub fn new(cfg: &Config, vb: VarBuilder, prefixes: &WeightPrefixes) -> Result<Self> {
        let vision = VisionTower::new(&cfg.vision, vb.pp(&prefixes.vision_model))?;
        let projector = Projector::new(&cfg.projector, vb.pp(&prefixes.projector))?;
        let lm_head = match (&prefixes.lm_head, cfg.text.tie_embeddings) {
            (Some(name), false) => Some(vb.get((cfg.text.vocab_size, cfg.text.hidden_size), name)?),
            _ => None,
        };
        let text = TextModel::new(&cfg.text, vb.pp(&prefixes.language_model), lm_head)?;
        Ok(Self {
            vision,
            projector,
            text,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub(crate) fn vision(&self) -> &VisionTower {
        &self.vision
    }

    pub(crate) fn projector(&self) -> &Projector {
        &self.projector
    }

    pub fn text(&self) -> &TextModel {
        &self.text
    }

    /// The decoder, mutably (replacing the LM head when quantizing at load).
    pub(crate) fn text_mut(&mut self) -> &mut TextModel {
        &mut self.text
    }

    pub fn dtype(&self) -> DType {
        self.text.dtype()
    }

    pub fn device(&self) -> &Device {
        self.text.device()
    }

    /// An empty generation cache for `batch` rows.
    pub fn new_cache(&self, batch: usize) -> TextCache {
        TextCache::new(&self.cfg.text, batch)
    }

    /// Image features `[image tokens, D]` for padded views, views in order.
    ///
    /// `pixel_values [views, P, C*p*p]` (f32 or the model dtype), `pixel_attention_mask [views, P]`
    /// (any numeric dtype, 1 = real patch), `spatial_shapes` = (patch rows, patch cols) per view.
    pub fn image_features(
        &self,
        pixel_values: &Tensor,
        pixel_attention_mask: &Tensor,
        spatial_shapes: &[(usize, usize)],
    ) -> Result<Tensor> {
        let (patches, spans) =
            vision::pack_views(pixel_values, pixel_attention_mask, spatial_shapes)?;
        self.image_features_packed(&patches, &spans)
    }

    /// Image features for already packed real patches `[N, C*p*p]`.
    pub(crate) fn image_features_packed(
        &self,
        patches: &Tensor,
        spans: &[ViewSpan],
    ) -> Result<Tensor> {
        crate::model::ops::on_compute_threads(|| {
            let vis = self.vision.forward_packed(patches, spans, false)?;
            Ok(self
                .projector
                .forward(&vis.last_hidden_state, spans, false)?
                .features)
        })
    }

    /// Like [`Self::image_features`], keeping every intermediate.
    pub fn image_intermediates(
        &self,
        pixel_values: &Tensor,
        pixel_attention_mask: &Tensor,
        spatial_shapes: &[(usize, usize)],
    ) -> Result<ImageIntermediates> {
        let (patches, spans) =
            vision::pack_views(pixel_values, pixel_attention_mask, spatial_shapes)?;
        let vis = self.vision.forward_packed(&patches, &spans, true)?;
        let proj = self
            .projector
            .forward(&vis.last_hidden_state, &spans, true)?;
        let (Some(vision_embeddings), Some(projector_unshuffled)) =
            (vis.embeddings, proj.unshuffled)
        else {
            candle_core::bail!("intermediates were requested but not kept")
        };
        Ok(ImageIntermediates {
            spans,
            vision_embeddings,
            vision_last_hidden_state: vis.last_hidden_state,
            projector_unshuffled,
            image_features: proj.features,
        })
    }

    /// Token embeddings `[B, L, D]` with `image_features` rows written, in order, at every
    /// `image_token_id` position (row-major over the batch).
    pub fn embed(&self, input_ids: &Tensor, image_features: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let embeds = self.text.embed_ids(input_ids)?;
        let ids = input_ids
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let image_token = self.cfg.image_token_id;
        let n_image_tokens = ids.iter().filter(|&&id| id == image_token).count();
        let n_features = match image_features {
            Some(f) => f.dim(0)?,
            None => 0,
        };
        if n_image_tokens != n_features {
            candle_core::bail!(
                "image features and image tokens do not match: {n_image_tokens} `<image>` tokens, \
                 {n_features} feature rows"
            )
        }
        let Some(features) = image_features.filter(|_| n_features > 0) else {
            return Ok(embeds);
        };
        let d = self.cfg.text.hidden_size;
        // One gather from [text rows; image rows]: row p takes itself, or image row k for the
        // k-th image token.
        let table = Tensor::cat(
            &[
                &embeds.reshape((b * l, d))?,
                &features.to_dtype(embeds.dtype())?,
            ],
            0,
        )?;
        let mut next_feature = (b * l) as u32;
        let index: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(p, &id)| {
                if id == image_token {
                    next_feature += 1;
                    next_feature - 1
                } else {
                    p as u32
                }
            })
            .collect();
        let index = Tensor::from_vec(index, b * l, embeds.device())?;
        table.index_select(&index, 0)?.reshape((b, l, d))
    }

    /// Decoder forward on embeddings; returns logits per `mode`.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut TextCache,
        mode: LogitsMode,
    ) -> Result<Tensor> {
        crate::model::ops::on_compute_threads(|| {
            let hidden = match mode {
                LogitsMode::All => self.text.forward(embeds, attention_mask, cache, None)?,
                // Only the last position is read: skip the work nothing else depends on.
                LogitsMode::Last => {
                    self.text
                        .forward_tail(embeds, attention_mask, cache, None, 1)?
                }
            };
            self.logits(&hidden, mode)
        })
    }

    /// Full forward from ids and (optional) images: splice, decode, logits.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        image_features: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        cache: &mut TextCache,
        mode: LogitsMode,
    ) -> Result<Tensor> {
        let embeds = self.embed(input_ids, image_features)?;
        self.forward_embeds(&embeds, attention_mask, cache, mode)
    }

    /// A decode step's forward on generated tokens: their plain embeddings, never the image
    /// splice, so a generated `<image>` token is an ordinary token (transformers' generate passes
    /// no `pixel_values` after the prompt and embeds it the same way).
    pub fn forward_generated(
        &self,
        input_ids: &Tensor,
        cache: &mut TextCache,
        mode: LogitsMode,
    ) -> Result<Tensor> {
        let embeds = self.text.embed_ids(input_ids)?;
        self.forward_embeds(&embeds, None, cache, mode)
    }

    /// Logits for normed hidden states `[B, L, D]`.
    pub fn logits(&self, hidden: &Tensor, mode: LogitsMode) -> Result<Tensor> {
        match mode {
            LogitsMode::All => self.text.lm_head(hidden),
            LogitsMode::Last => {
                let l = hidden.dim(1)?;
                if l == 0 {
                    candle_core::bail!("no positions to take logits from")
                }
                self.text.lm_head(&hidden.narrow(1, l - 1, 1)?.squeeze(1)?)
            }
        }
    }
}

impl Lfm2VlModel {
    /// Packs every CPU f32 projection and the LM head for `kernel` ([`Linear::pack_for_cpu`],
    /// [`TextModel::pack_head_for_cpu`]), as inference loads a model (training leaves fully
    /// trained modules out: `train::lora::pack_frozen_weights`). Returns how many matrices were packed.
    pub fn pack_linears_for_cpu(&mut self, kernel: Kernel) -> Result<usize> {
        let head = usize::from(self.text.pack_head_for_cpu(kernel)?);
        Ok(head + pack_where(self, kernel, &|_| true)?)
    }
}

/// Packs the linears `part` (the model or one of its parts) visits that `keep` selects
/// ([`Linear::pack_for_cpu`]); how many were packed.
pub(crate) fn pack_where(
    part: &mut dyn LinearVisitor,
    kernel: Kernel,
    keep: &dyn Fn(&Linear) -> bool,
) -> Result<usize> {
    let mut packed = 0;
    let mut failure = None;
    part.visit_linears_mut(&mut |lin| {
        if failure.is_some() || !keep(lin) {
            return;
        }
        match lin.pack_for_cpu(kernel) {
            Ok(newly_packed) => packed += usize::from(newly_packed),
            Err(e) => failure = Some(e),
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(packed),
    }
}

impl LinearVisitor for Lfm2VlModel {
    fn visit_linears(&self, f: &mut dyn FnMut(&Linear)) {
        self.vision.visit_linears(f);
        self.projector.visit_linears(f);
        self.text.visit_linears(f);
    }

    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&mut Linear)) {
        self.vision.visit_linears_mut(f);
        self.projector.visit_linears_mut(f);
        self.text.visit_linears_mut(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Config;
    use crate::model::load::checkpoint::LoadOptions;
    use crate::model::load::random_checkpoint::random_model;
    use candle_core::{DType, Device, IndexOp};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Skipping the work after the last attention layer (`LogitsMode::Last`) must give the same
    /// logits and leave the same caches as the full forward, with left padding in the batch.
    #[test]
    fn last_only_prefill_matches_the_full_forward_and_its_cache() -> Result<()> {
        let cfg = Config::from_json(
            r#"{"projector_hidden_size": 32,
                "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2},
                "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 5,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
                                "block_multiple_of": 8,
                                "layer_types": ["conv", "full_attention", "conv", "conv", "conv"]}}"#,
        )
        .map_err(candle_core::Error::wrap)?;
        let model = random_model(&cfg, &LoadOptions::default(), 3)?;
        let dev = Device::Cpu;
        let ids = Tensor::new(
            &[
                [0u32, 0, 0, 5, 9, 17, 4, 88, 2],
                [11, 12, 13, 14, 15, 16, 17, 18, 19],
            ],
            &dev,
        )?;
        let mask = Tensor::new(
            &[[0u32, 0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]],
            &dev,
        )?;
        let mut full_cache = model.new_cache(2);
        let all = model.forward(&ids, None, Some(&mask), &mut full_cache, LogitsMode::All)?;
        let mut tail_cache = model.new_cache(2);
        let last = model.forward(&ids, None, Some(&mask), &mut tail_cache, LogitsMode::Last)?;
        assert_eq!(last.dims(), &[2, 300]);
        assert!(max_diff(&all.i((.., 8))?, &last)? < 1e-5);

        // The next step reads every cache: conv windows and attention keys alike.
        let next = Tensor::new(&[[7u32], [8]], &dev)?;
        let step_mask = Tensor::ones((2, 10), DType::U32, &dev)?;
        let step_mask = step_mask.narrow(1, 9, 1)?;
        let a = model.forward(
            &next,
            None,
            Some(&step_mask),
            &mut full_cache,
            LogitsMode::Last,
        )?;
        let b = model.forward(
            &next,
            None,
            Some(&step_mask),
            &mut tail_cache,
            LogitsMode::Last,
        )?;
        assert!(max_diff(&a, &b)? < 1e-5);
        Ok(())
    }
}
