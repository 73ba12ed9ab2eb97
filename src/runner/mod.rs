//! The model runner: a loaded LFM2-VL with its processor, answering image questions by free or
//! grammar-constrained generation, or scoring every label exactly.
//!
//! This is where the model (`crate::model`) meets the grammars (`crate::decode`): the two never
//! see each other. `vlmpipe infer`, the eval stage and `vlmpipe render` all go through here, so a
//! prompt is built and answered the same way everywhere.

mod scorer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::decode::{
    CompiledGrammar, Constraint, DecodeError, LabelScorer, LabelScores, Vocab, VocabConfig,
};
use crate::gguf::read::GgufPair;
use crate::model::chat::Conversation;
use crate::model::checkpoint::{self, LoadOptions};
use crate::model::generate::{self, GenerateConfig, LogitsProcessor, Sampling, TokenSet};
use crate::model::lfm2_vl::Lfm2VlModel;
use crate::model::load::gguf;
use crate::model::packed::Kernel;
use crate::model::processor::{Processor, PromptInputs};
use crate::model::quant::{self, Quant, QuantReport};

pub(crate) use scorer::CachedPrefixScorer;

/// Errors of loading a model or answering with it.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("cannot load the model in `{dir}`: {message}")]
    Load { dir: PathBuf, message: String },
    #[error("cannot prepare the prompt: {0}")]
    Prompt(String),
    #[error("the model failed: {0}")]
    Model(#[from] candle_core::Error),
    #[error("generation failed: {0}")]
    Generate(String),
    #[error(transparent)]
    Grammar(#[from] DecodeError),
}

/// Loads the checkpoint `dir` and attaches the adapter in `adapter_dir` when given.
fn load_model(
    dir: &Path,
    adapter_dir: Option<&Path>,
    options: &LoadOptions,
) -> Result<Lfm2VlModel, RunnerError> {
    let mut model = checkpoint::load(dir, options).map_err(|e| RunnerError::Load {
        dir: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    if let Some(adapter_dir) = adapter_dir {
        let load_err = |message: String| RunnerError::Load {
            dir: adapter_dir.to_path_buf(),
            message,
        };
        let adapter = crate::train::PeftAdapter::load(adapter_dir, &options.device)
            .map_err(|e| load_err(e.to_string()))?;
        let trainable = adapter
            .attach(&mut model)
            .map_err(|e| load_err(e.to_string()))?;
        trainable.mode().set_training(false);
    }
    Ok(model)
}

/// How to decode.
#[derive(Clone, Debug)]
pub struct DecodeOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
}

/// A prompt ready for the model: token ids and its image features.
pub struct PreparedPrompt {
    pub inputs: PromptInputs,
    /// `[image tokens, D]`, `None` for a text-only prompt.
    pub image_features: Option<Tensor>,
    /// Time spent in preprocessing and the vision tower.
    pub encode_time: Duration,
    /// Of `encode_time`, the vision tower and projector alone.
    pub vision_time: Duration,
    /// The sampling seed of this prompt alone (see [`generate::Prompt::seed`]); `None`: the
    /// decode options' seed plus the prompt's place in the batch.
    pub sample_seed: Option<u64>,
}

/// One generated answer.
#[derive(Clone, Debug)]
pub struct Generated {
    /// Generated token ids (EOS excluded).
    pub tokens: Vec<u32>,
    /// Decoded text, special tokens skipped.
    pub text: String,
    /// `true` when EOS ended it, `false` when `max_new_tokens` did.
    pub stopped_at_eos: bool,
    /// The EOS id that ended it (`Some` exactly when `stopped_at_eos`).
    pub eos_token: Option<u32>,
}

/// [`ModelRunner::generate_with_details`]: the answers and what the decoding loop measured.
pub struct GenerateRun {
    pub answers: Vec<Generated>,
    /// `[B, vocab]` logits of each prompt's last position, before any mask or sampling setting.
    pub prompt_logits: Tensor,
    /// The prompt forward (embedding splice, decoder, first logits).
    pub prefill: Duration,
    /// Each later decoder step.
    pub step_times: Vec<Duration>,
}

/// A loaded model and everything needed to talk to it.
pub struct ModelRunner {
    model: Lfm2VlModel,
    processor: Processor,
    vocab: Arc<Vocab>,
    eos_token_ids: Vec<u32>,
    pad_token_id: u32,
    packed_linears: usize,
}

impl ModelRunner {
    /// Loads the model at `dir` in `options`' dtype onto its device: a checkpoint folder (Hub
    /// layout), or a GGUF pair ([`crate::model::load::gguf::detect`]: a folder holding one
    /// `<name>-<QUANT>.gguf` + `mmproj-….gguf` pair, or the text `.gguf` file itself).
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self, RunnerError> {
        let load_err = |message: String| RunnerError::Load {
            dir: dir.to_path_buf(),
            message,
        };
        if let Some(pair) = gguf::detect(dir).map_err(|e| load_err(e.to_string()))? {
            return Self::load_gguf(&pair, options);
        }
        let model = checkpoint::load(dir, options).map_err(|e| load_err(e.to_string()))?;
        let processor = Processor::from_model_dir(dir).map_err(|e| load_err(e.to_string()))?;
        Self::new(model, processor, dir)
    }

    /// Loads a GGUF pair (see [`crate::gguf::read::find_pair`] to pick one in a folder of
    /// several): the text model, its tokenizer, chat template and the mmproj's vision tower,
    /// block-quantized matrices kept as blocks.
    pub fn load_gguf(pair: &GgufPair, options: &LoadOptions) -> Result<Self, RunnerError> {
        let loaded = gguf::load_pair(pair, options).map_err(|e| RunnerError::Load {
            dir: pair.text.clone(),
            message: e.to_string(),
        })?;
        let mut eos = Vec::new();
        eos.extend(loaded.processor.tokenizer().token_to_id("<|im_end|>"));
        eos.extend(loaded.tokenizer.eos_id);
        eos.dedup();
        Self::assemble(
            loaded.model,
            loaded.processor,
            &pair.text,
            eos,
            Some(loaded.tokenizer.json.as_bytes()),
        )
    }

    /// Refuses a GGUF model where only a checkpoint folder works (an adapter, `--quant`).
    fn refuse_gguf(dir: &Path, what: &str) -> Result<(), RunnerError> {
        let pair = gguf::detect(dir).map_err(|e| RunnerError::Load {
            dir: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        match pair {
            Some(pair) => Err(RunnerError::Load {
                dir: dir.to_path_buf(),
                message: format!("`{}` is a GGUF model, {what}", pair.text.display()),
            }),
            None => Ok(()),
        }
    }

    /// Loads `dir` and, when given, attaches the PEFT LoRA adapter in `adapter_dir` (a fine-tune);
    /// the adapter's tensors go to the model's device.
    pub(crate) fn load_with_adapter(
        dir: &Path,
        adapter_dir: Option<&Path>,
        options: &LoadOptions,
    ) -> Result<Self, RunnerError> {
        let Some(adapter_dir) = adapter_dir else {
            return Self::load(dir, options);
        };
        Self::refuse_gguf(
            dir,
            "which takes no adapter: merge the adapter into the checkpoint and export that \
             (`vlmpipe export … --gguf`)",
        )?;
        let load_err = |message: String| RunnerError::Load {
            dir: adapter_dir.to_path_buf(),
            message,
        };
        let mut model = checkpoint::load(dir, options).map_err(|e| load_err(e.to_string()))?;
        let adapter = crate::train::PeftAdapter::load(adapter_dir, &options.device)
            .map_err(|e| load_err(e.to_string()))?;
        let trainable = adapter
            .attach(&mut model)
            .map_err(|e| load_err(e.to_string()))?;
        trainable.mode().set_training(false);
        let processor = Processor::from_model_dir(dir).map_err(|e| load_err(e.to_string()))?;
        Self::new(model, processor, dir)
    }

    /// [`Self::load_with_adapter`] with every projection and the LM head quantized at load
    /// ([`crate::model::quant`]); an adapter stays in full precision on the quantized base.
    /// Returns what quantizing did to each tensor (the fallbacks of widths a quant cannot take).
    pub fn load_quantized(
        dir: &Path,
        adapter_dir: Option<&Path>,
        options: &LoadOptions,
        quant: Quant,
    ) -> Result<(Self, QuantReport), RunnerError> {
        let load_err = |message: String| RunnerError::Load {
            dir: dir.to_path_buf(),
            message,
        };
        Self::refuse_gguf(
            dir,
            "already stored in its own types: load it without `--quant` (its file name says \
             its quant)",
        )?;
        let mut model = load_model(dir, adapter_dir, options)?;
        let report = quant::quantize_model(&mut model, quant)
            .map_err(|e| load_err(format!("cannot quantize the weights to {quant}: {e}")))?;
        let processor = Processor::from_model_dir(dir).map_err(|e| load_err(e.to_string()))?;
        Ok((Self::new(model, processor, dir)?, report))
    }

    /// Wraps an already loaded model (e.g. one with LoRA adapters attached).
    ///
    /// Inference never needs the dense CPU weights, so they are packed for the fastest CPU
    /// kernel here ([`Kernel::for_this_cpu`]).
    pub(crate) fn new(
        model: Lfm2VlModel,
        processor: Processor,
        dir: &Path,
    ) -> Result<Self, RunnerError> {
        let eos_token_ids = eos_ids(dir, &processor);
        Self::assemble(model, processor, dir, eos_token_ids, None)
    }

    /// [`Self::new`] with the end-of-turn ids given, and the tokenizer's JSON when it is not
    /// `dir/tokenizer.json` (a GGUF's, rebuilt from its metadata).
    fn assemble(
        mut model: Lfm2VlModel,
        processor: Processor,
        dir: &Path,
        eos_token_ids: Vec<u32>,
        tokenizer_json: Option<&[u8]>,
    ) -> Result<Self, RunnerError> {
        let load_err = |message: String| RunnerError::Load {
            dir: dir.to_path_buf(),
            message,
        };
        let packed_linears = match Kernel::for_this_cpu() {
            Some(kernel) => model
                .pack_linears_for_cpu(kernel)
                .map_err(|e| load_err(format!("cannot pack the weights: {e}")))?,
            None => 0,
        };
        let Some(&eos) = eos_token_ids.first() else {
            return Err(load_err(
                "no end-of-turn token (`<|im_end|>` or generation_config.json eos_token_id)".into(),
            ));
        };
        let eos_text = processor
            .tokenizer()
            .id_to_token(eos)
            .ok_or_else(|| load_err(format!("the end-of-turn id {eos} is not in the tokenizer")))?;
        let vocab_cfg = VocabConfig {
            eos_token: eos_text,
            model_vocab_size: Some(model.text().embedding_rows()),
        };
        let vocab = match tokenizer_json {
            Some(json) => Vocab::from_tokenizer_json(json, &vocab_cfg),
            None => Vocab::from_tokenizer_file(&dir.join("tokenizer.json"), &vocab_cfg),
        }
        .map_err(|e| load_err(e.to_string()))?;
        let pad_token_id = processor.tokenizer().token_to_id("<|pad|>").unwrap_or(0);
        Ok(Self {
            model,
            processor,
            vocab: Arc::new(vocab),
            eos_token_ids,
            pad_token_id,
            packed_linears,
        })
    }

    /// How many projections run on pre-packed CPU weights (0 on a GPU, in half precision, or
    /// where the CPU lacks AVX-512F).
    pub(crate) fn packed_linears(&self) -> usize {
        self.packed_linears
    }

    pub fn model(&self) -> &Lfm2VlModel {
        &self.model
    }

    /// The device the weights live on (every forward runs there).
    pub(crate) fn device(&self) -> &Device {
        self.model.device()
    }

    pub fn processor(&self) -> &Processor {
        &self.processor
    }

    /// The tokenizer as the grammar compiler needs it.
    pub fn vocab(&self) -> &Arc<Vocab> {
        &self.vocab
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The id that left-pads shorter prompts of a batch.
    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id
    }

    /// Renders `conversation` with the chat template (generation prompt on), expands the image
    /// placeholders, tokenises, and runs the vision tower on `images`.
    pub fn prepare(
        &self,
        conversation: &Conversation,
        images: &[RgbImage],
    ) -> Result<PreparedPrompt, RunnerError> {
        let started = Instant::now();
        let inputs = self
            .processor
            .prepare(conversation, images, true)
            .map_err(|e| RunnerError::Prompt(e.to_string()))?;
        let vision_started = Instant::now();
        let image_features = self.image_features(&inputs)?;
        // GPU kernels run asynchronously: wait for them so the time is the tower's, not the launch's.
        self.model.device().synchronize()?;
        let vision_time = vision_started.elapsed();
        Ok(PreparedPrompt {
            inputs,
            image_features,
            encode_time: started.elapsed(),
            vision_time,
            sample_seed: None,
        })
    }

    /// Vision tower + projector over every image of `inputs`: `[image tokens, D]`, or `None`
    /// for a text-only prompt.
    pub fn image_features(&self, inputs: &PromptInputs) -> Result<Option<Tensor>, RunnerError> {
        if inputs.images.is_empty() {
            return Ok(None);
        }
        let tensors = crate::model::processor::stack_images(&inputs.images, self.model.device())?;
        let shapes: Vec<(usize, usize)> = inputs
            .images
            .iter()
            .flat_map(|image| image.spatial_shapes.iter().copied())
            .collect();
        Ok(Some(self.model.image_features(
            &tensors.pixel_values,
            &tensors.pixel_attention_mask,
            &shapes,
        )?))
    }

    /// Generates an answer for each prompt (one batch; left padding does not change answers).
    /// With `grammar`, every step is masked to the tokens that keep the answer valid.
    pub fn generate(
        &self,
        prompts: &[&PreparedPrompt],
        options: &DecodeOptions,
        grammar: Option<&Arc<CompiledGrammar>>,
    ) -> Result<Vec<Generated>, RunnerError> {
        Ok(self
            .generate_with_details(prompts, options, grammar)?
            .answers)
    }

    /// [`ModelRunner::generate`], also returning the prompts' logits and the loop's timings
    /// (what `vlmpipe infer --json`/`--dump-logits` report).
    pub fn generate_with_details(
        &self,
        prompts: &[&PreparedPrompt],
        options: &DecodeOptions,
        grammar: Option<&Arc<CompiledGrammar>>,
    ) -> Result<GenerateRun, RunnerError> {
        let batch: Vec<generate::Prompt<'_>> = prompts
            .iter()
            .map(|p| generate::Prompt {
                input_ids: &p.inputs.input_ids,
                image_features: p.image_features.as_ref(),
                seed: p.sample_seed,
            })
            .collect();
        let cfg = GenerateConfig {
            max_new_tokens: options.max_new_tokens,
            eos_token_ids: self.eos_token_ids.clone(),
            pad_token_id: self.pad_token_id,
            sampling: options.sampling.clone(),
        };
        // Every answer keeps a way to close within the budget, so a cut answer still parses.
        let mut constraints = match grammar {
            Some(g) => {
                let mut constraints = Vec::with_capacity(prompts.len());
                for _ in prompts {
                    let mut c = g.constraint();
                    c.limit_tokens(options.max_new_tokens)?;
                    constraints.push(c);
                }
                Some(GrammarMask { constraints })
            }
            None => None,
        };
        let hook = constraints.as_mut().map(|c| c as &mut dyn LogitsProcessor);
        let output = generate::generate(&self.model, &batch, &cfg, hook)
            .map_err(|e| RunnerError::Generate(e.to_string()))?;
        let answers = output
            .sequences
            .into_iter()
            .map(|seq| {
                let eos_token = seq
                    .tokens
                    .last()
                    .copied()
                    .filter(|t| self.eos_token_ids.contains(t));
                let tokens: Vec<u32> = seq
                    .tokens
                    .into_iter()
                    .filter(|t| !self.eos_token_ids.contains(t))
                    .collect();
                let text = self.decode_text(&tokens);
                Generated {
                    tokens,
                    text,
                    stopped_at_eos: eos_token.is_some(),
                    eos_token,
                }
            })
            .collect();
        Ok(GenerateRun {
            answers,
            prompt_logits: output.prompt_logits,
            prefill: output.prefill,
            step_times: output.step_times,
        })
    }

    /// Every label's exact probability for `prompt` under `scorer`'s grammar, reusing the
    /// prompt's KV cache for every answer prefix.
    pub fn score_labels(
        &self,
        prompt: &PreparedPrompt,
        scorer: &LabelScorer,
    ) -> Result<LabelScores, RunnerError> {
        let mut prefix_scorer = CachedPrefixScorer::new(&self.model, prompt)?;
        Ok(scorer.score(&mut prefix_scorer)?)
    }

    /// Text of `tokens`, skipping special tokens; ids past the tokenizer (random models emit
    /// them) are dropped rather than failing.
    pub fn decode_text(&self, tokens: &[u32]) -> String {
        let tokenizer = self.processor.tokenizer();
        let size = tokenizer.get_vocab_size(true) as u32;
        let known: Vec<u32> = tokens.iter().copied().filter(|&t| t < size).collect();
        tokenizer.decode(&known, true).unwrap_or_default()
    }
}

/// Per-sequence grammar constraints as the generation loop's mask hook.
struct GrammarMask {
    constraints: Vec<Constraint>,
}

impl LogitsProcessor for GrammarMask {
    fn allowed(
        &mut self,
        seq: usize,
    ) -> Result<Option<TokenSet>, Box<dyn std::error::Error + Send + Sync>> {
        let constraint = self
            .constraints
            .get_mut(seq)
            .ok_or_else(|| format!("no grammar state for sequence {seq}"))?;
        let mask = constraint.allowed_tokens()?;
        Ok(Some(TokenSet::from_words(mask.into_words())))
    }

    fn replace(
        &mut self,
        seq: usize,
        token: u32,
    ) -> Result<Option<u32>, Box<dyn std::error::Error + Send + Sync>> {
        let constraint = self
            .constraints
            .get_mut(seq)
            .ok_or_else(|| format!("no grammar state for sequence {seq}"))?;
        Ok(constraint.budget_override(token)?)
    }

    fn advance(
        &mut self,
        seq: usize,
        token: u32,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let constraint = self
            .constraints
            .get_mut(seq)
            .ok_or_else(|| format!("no grammar state for sequence {seq}"))?;
        constraint.commit(token)?;
        Ok(())
    }
}

/// End-of-turn ids: `<|im_end|>` when the tokenizer has it, then `generation_config.json`'s
/// `eos_token_id` (a number or a list).
fn eos_ids(dir: &Path, processor: &Processor) -> Vec<u32> {
    let mut ids = Vec::new();
    if let Some(id) = processor.tokenizer().token_to_id("<|im_end|>") {
        ids.push(id);
    }
    let from_config = std::fs::read(dir.join("generation_config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|v| v.get("eos_token_id").cloned());
    match from_config {
        Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|n| n as u32)),
        Some(serde_json::Value::Array(items)) => {
            ids.extend(items.iter().filter_map(|v| v.as_u64()).map(|n| n as u32))
        }
        _ => {}
    }
    ids.dedup();
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    ids
}
