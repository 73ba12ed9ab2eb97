//! The model side of exact label scoring: next-token logits after the prompt plus an answer
//! prefix, with the prompt run once and its cache reused for every prefix.

use candle_core::{DType, Tensor};

use super::{PreparedPrompt, RunnerError};
use crate::decode::PrefixScorer;
use crate::model::lfm2_vl::{Lfm2VlModel, LogitsMode};
use crate::model::text::TextCache;

/// Answers [`PrefixScorer`] queries from one prefilled prompt.
pub(crate) struct CachedPrefixScorer<'a> {
    model: &'a Lfm2VlModel,
    /// The cache after the prompt; every query starts from a clone of it.
    prompt_cache: TextCache,
    /// Logits after the prompt alone (the empty prefix).
    prompt_logits: Vec<f32>,
}

impl<'a> CachedPrefixScorer<'a> {
    /// Runs the prompt once.
    pub(crate) fn new(
        model: &'a Lfm2VlModel,
        prompt: &PreparedPrompt,
    ) -> Result<Self, RunnerError> {
        let ids = &prompt.inputs.input_ids;
        let input = Tensor::from_slice(ids, (1, ids.len()), model.device())?;
        let mut cache = model.new_cache(1);
        let logits = model.forward(
            &input,
            prompt.image_features.as_ref(),
            None,
            &mut cache,
            LogitsMode::Last,
        )?;
        Ok(Self {
            model,
            prompt_cache: cache,
            prompt_logits: to_vec(&logits)?,
        })
    }
}

impl PrefixScorer for CachedPrefixScorer<'_> {
    type Error = candle_core::Error;

    fn logits_after(&mut self, prefix: &[u32]) -> Result<Vec<f32>, Self::Error> {
        if prefix.is_empty() {
            return Ok(self.prompt_logits.clone());
        }
        // A clone shares the prompt's key/value storage and appends past its end. Queries run
        // one after another, so a later query's writes never overlap a live one's, and the
        // prompt's own positions are never written.
        let mut cache = self.prompt_cache.clone();
        let input = Tensor::from_slice(prefix, (1, prefix.len()), self.model.device())?;
        let logits = self
            .model
            .forward_generated(&input, &mut cache, LogitsMode::Last)?;
        to_vec(&logits)
    }
}

fn to_vec(logits: &Tensor) -> Result<Vec<f32>, candle_core::Error> {
    logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}
