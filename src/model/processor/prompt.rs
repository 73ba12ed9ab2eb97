//! [`Processor`]: conversation + images -> token ids and vision inputs, in one call.
//!
//! This is transformers' `processor.apply_chat_template(..., tokenize=True)` for LFM2-VL: render
//! the chat template (which emits BOS itself), expand each `<image>` placeholder, and tokenise
//! with `add_special_tokens=False` so BOS is not added twice. `vlmpipe infer`, the eval stage and
//! training all go through here so their prompts cannot drift apart.

use std::path::{Path, PathBuf};

use image::RgbImage;
use tokenizers::Tokenizer;

use super::config::{ConfigError, ProcessorConfig};
use super::expand::{ExpandError, ImageTokenStrings, expand_image_placeholders};
use super::image_processor::{ImageProcessor, ProcessError, ProcessedImage};
use super::layout::ImageLayout;
use crate::model::processor::chat::{ChatTemplate, Conversation, TemplateError};

/// Errors building model inputs.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Expand(#[from] ExpandError),
    /// `tokenizer.json` could not be loaded.
    #[error("cannot load tokenizer `{path}`: {message}")]
    TokenizerLoad { path: PathBuf, message: String },
    /// Encoding text failed.
    #[error("cannot tokenize prompt: {0}")]
    Tokenize(String),
    /// A marker the prompt needs is not a token of the tokenizer.
    #[error("token `{0}` is not in the tokenizer's vocabulary")]
    MissingToken(String),
    /// The conversation's image parts and the images given differ in number.
    #[error("the conversation has {expected} image parts but {found} images were given")]
    ImageCount { expected: usize, found: usize },
    /// One of the images could not be processed.
    #[error("image {index}: {source}")]
    Image {
        index: usize,
        #[source]
        source: ProcessError,
    },
    /// The tokenizer split `<image>` or did not produce one id per image token.
    #[error("the prompt should hold {expected} image tokens but tokenised to {found}")]
    ImageTokenCount { expected: usize, found: usize },
}

/// Everything the model needs for one prompt.
#[derive(Debug, Clone)]
pub struct PromptInputs {
    /// The rendered and expanded prompt text.
    pub text: String,
    /// Token ids of `text` (no special tokens added beyond what the template wrote).
    pub input_ids: Vec<u32>,
    /// The images, in placeholder order.
    pub images: Vec<ProcessedImage>,
    /// Id of the image placeholder token, where image features are spliced in.
    pub image_token_id: u32,
}

impl PromptInputs {
    /// All ones: a single unpadded prompt.
    pub fn attention_mask(&self) -> Vec<u32> {
        vec![1; self.input_ids.len()]
    }

    /// Image tokens over all images.
    pub fn num_image_tokens(&self) -> usize {
        self.images
            .iter()
            .map(ProcessedImage::num_image_tokens)
            .sum()
    }
}

/// A prompt with its answer appended, for training on the answer only.
#[derive(Debug, Clone)]
pub struct TrainingInputs {
    /// The whole conversation including the assistant's answer (and the template's end of turn).
    pub inputs: PromptInputs,
    /// Index in `inputs.input_ids` of the first answer token; everything before is prompt.
    pub answer_start: usize,
}

/// LFM2-VL's processor: image processor, tokenizer and chat template together.
#[derive(Debug)]
pub struct Processor {
    images: ImageProcessor,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    strings: ImageTokenStrings,
    image_token_id: u32,
}

impl Processor {
    /// Loads the processor settings, `tokenizer.json`, chat template and special tokens of a
    /// model directory in the Hub layout.
    pub fn from_model_dir(dir: &Path) -> Result<Self, ProcessorError> {
        let config = ProcessorConfig::from_model_dir(dir)?;
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| ProcessorError::TokenizerLoad {
            path,
            message: e.to_string(),
        })?;
        let template = ChatTemplate::from_model_dir(dir)?;
        let strings = ImageTokenStrings::from_model_dir(dir)?;
        Self::new(config, tokenizer, template, strings)
    }

    /// Assembles a processor from parsed parts.
    pub fn new(
        config: ProcessorConfig,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        strings: ImageTokenStrings,
    ) -> Result<Self, ProcessorError> {
        let image_token_id = tokenizer
            .token_to_id(&strings.image)
            .ok_or_else(|| ProcessorError::MissingToken(strings.image.clone()))?;
        if config.use_image_special_tokens {
            for token in [&strings.start, &strings.end] {
                if tokenizer.token_to_id(token).is_none() {
                    return Err(ProcessorError::MissingToken(token.clone()));
                }
            }
        }
        Ok(Self {
            images: ImageProcessor::new(config)?,
            tokenizer,
            template,
            strings,
            image_token_id,
        })
    }

    /// The image processor.
    pub fn image_processor(&self) -> &ImageProcessor {
        &self.images
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Id of the `<image>` token.
    pub fn image_token_id(&self) -> u32 {
        self.image_token_id
    }

    /// Processes images, tagging a failure with the image's index.
    pub(crate) fn process_images(
        &self,
        images: &[RgbImage],
    ) -> Result<Vec<ProcessedImage>, ProcessorError> {
        images
            .iter()
            .enumerate()
            .map(|(index, img)| {
                self.images
                    .process(img)
                    .map_err(|source| ProcessorError::Image { index, source })
            })
            .collect()
    }

    /// Renders `conversation`, processes `images` (one per image part, in order) and tokenises.
    pub fn prepare(
        &self,
        conversation: &Conversation,
        images: &[RgbImage],
        add_generation_prompt: bool,
    ) -> Result<PromptInputs, ProcessorError> {
        self.check_image_count(conversation, images.len())?;
        let processed = self.process_images(images)?;
        self.prepare_processed(conversation, processed, add_generation_prompt)
    }

    /// Like [`Processor::prepare`] for images already processed (e.g. cached).
    pub(crate) fn prepare_processed(
        &self,
        conversation: &Conversation,
        images: Vec<ProcessedImage>,
        add_generation_prompt: bool,
    ) -> Result<PromptInputs, ProcessorError> {
        self.check_image_count(conversation, images.len())?;
        let rendered = self.template.render(conversation, add_generation_prompt)?;
        let (text, input_ids) = self.expand_and_tokenize(&rendered, &images)?;
        Ok(PromptInputs {
            text,
            input_ids,
            images,
            image_token_id: self.image_token_id,
        })
    }

    /// The prompt followed by `answer` as the assistant's turn, and where the answer starts.
    ///
    /// The prompt is rendered with the generation prompt, the full text with the answer as a
    /// final assistant message (so the template's end-of-turn token is part of the target).
    /// Should the tokenizer merge across the boundary, the answer starts after the longest
    /// common prefix of the two token sequences.
    pub fn prepare_training(
        &self,
        conversation: &Conversation,
        images: &[RgbImage],
        answer: &str,
    ) -> Result<TrainingInputs, ProcessorError> {
        self.check_image_count(conversation, images.len())?;
        let processed = self.process_images(images)?;
        let prompt = self.template.render(conversation, true)?;
        let (_, prompt_ids) = self.expand_and_tokenize(&prompt, &processed)?;
        let full = conversation.clone().assistant(answer);
        let rendered = self.template.render(&full, false)?;
        let (text, input_ids) = self.expand_and_tokenize(&rendered, &processed)?;
        let answer_start = prompt_ids
            .iter()
            .zip(&input_ids)
            .take_while(|(a, b)| a == b)
            .count();
        Ok(TrainingInputs {
            inputs: PromptInputs {
                text,
                input_ids,
                images: processed,
                image_token_id: self.image_token_id,
            },
            answer_start,
        })
    }

    fn check_image_count(
        &self,
        conversation: &Conversation,
        found: usize,
    ) -> Result<(), ProcessorError> {
        let expected = conversation.num_images();
        if expected != found {
            return Err(ProcessorError::ImageCount { expected, found });
        }
        Ok(())
    }

    /// Expands the `<image>` placeholders of already rendered text for `images` (in order) and
    /// tokenises it without adding special tokens, checking every marker is a token and every
    /// image token survived tokenisation as one id. Returns the expanded text and its ids.
    pub fn expand_and_tokenize(
        &self,
        rendered: &str,
        images: &[ProcessedImage],
    ) -> Result<(String, Vec<u32>), ProcessorError> {
        let special = self.images.config().use_image_special_tokens;
        if special {
            self.check_markers(images)?;
        }
        let text = expand_image_placeholders(rendered, images, &self.strings, special)?;
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| ProcessorError::Tokenize(e.to_string()))?;
        let input_ids = encoding.get_ids().to_vec();
        let expected: usize = images.iter().map(ProcessedImage::num_image_tokens).sum();
        let found = input_ids
            .iter()
            .filter(|&&id| id == self.image_token_id)
            .count();
        if found != expected {
            return Err(ProcessorError::ImageTokenCount { expected, found });
        }
        Ok((text, input_ids))
    }

    fn check_markers(&self, images: &[ProcessedImage]) -> Result<(), ProcessorError> {
        for image in images {
            if let ImageLayout::Tiled {
                rows,
                cols,
                thumbnail,
                ..
            } = image.layout
            {
                let mut needed: Vec<String> = (0..rows)
                    .flat_map(|r| (0..cols).map(move |c| ImageTokenStrings::tile_marker(r, c)))
                    .collect();
                if thumbnail.is_some() {
                    needed.push(self.strings.thumbnail.clone());
                }
                if let Some(missing) = needed
                    .into_iter()
                    .find(|t| self.tokenizer.token_to_id(t).is_none())
                {
                    return Err(ProcessorError::MissingToken(missing));
                }
            }
        }
        Ok(())
    }
}
