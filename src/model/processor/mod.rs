//! LFM2-VL's processor: images and a conversation in, token ids and vision tensors out,
//! identical to transformers' `Lfm2VlProcessor` + `Lfm2VlImageProcessorFast` (5.x).
//!
//! ```text
//! bytes ─decode_image─▶ RgbImage ─ImageProcessor::process─▶ ProcessedImage (views, patches, mask)
//!                                     │ layout: smart resize | tiles (+ thumbnail)
//!                                     │ resize: torchvision antialiased bilinear on u8
//! Conversation ─ChatTemplate::render─▶ text ─expand <image>─▶ expanded text ─tokenize─▶ input_ids
//! ```
//!
//! [`chat`] holds the conversation types and renders the model's chat template.
//! [`Processor`] ties the steps together; the pieces are public for callers that cache images.
//! No file IO happens here except loading the model directory's JSON, tokenizer and template.

pub mod chat;
mod config;
mod expand;
mod image_decode;
mod image_processor;
mod layout;
mod prompt;
mod resize;

pub use config::{ConfigError, ProcessorConfig};
pub use expand::{ExpandError, ImageTokenStrings, expand_image_placeholders, image_token_text};
pub use image_decode::{DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_image, decode_image_capped};
pub use image_processor::{
    ImageProcessor, ImageTensors, ProcessError, ProcessedImage, stack_images,
};
pub use layout::{ImageLayout, choose_grid, is_too_large, plan_layout, smart_resize};
pub use prompt::{Processor, ProcessorError, PromptInputs, TrainingInputs};
pub use resize::resize_rgb8;

/// The RGB8 image type the processor consumes.
pub use image::RgbImage;
