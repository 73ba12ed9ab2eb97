//! LFM2-VL in candle: checkpoint loading, image processing, the network and generation.
//!
//! Model code does no IO except in `checkpoint` (files → config + weights) and `processor`
//! (which only sees decoded images and config values).
//!
//! Architecture ([LFM2-VL](https://www.liquid.ai/blog/lfm2-vl-efficient-vision-language-models),
//! reference: transformers `models/lfm2_vl`, `models/siglip2`, `models/lfm2`):
//!
//! ```text
//! pixel_values [views, P, 3*16*16] + pixel_attention_mask + spatial_shapes (rows, cols)
//!   └─ vision::pack_views        real patches only, views back to back   [N, 768]
//!   └─ vision::VisionTower       Linear patch embed + antialiased-resized 16x16 position grid,
//!                                pre-LN encoder (per-view attention, GELU-tanh), post_layernorm
//!   └─ projector::Projector      pixel unshuffle x2 per view, LayerNorm, linear_1, GELU-erf, linear_2
//!                                → image features [image tokens, D]
//! input_ids ─ lfm2_vl::Lfm2VlModel::embed   token embeddings with features at `<image>` ids
//!   └─ text::TextModel           LFM2: conv / attention layers + SwiGLU, embedding_norm, tied head
//!                                caches (text::TextCache) live outside the weights
//!   └─ generate::generate        greedy / sampling, left-padded batches, LogitsProcessor hook
//! ```
//!
//! Every projection is a [`linear::Linear`] named after its checkpoint path; LoRA attaches there
//! through [`linear::LinearAdapter`] and finds targets through [`linear::LinearVisitor`].
//!
//! [`device`] turns `--device` (`auto`, `cpu`, `cuda[:N]`, `metal[:N]`) into the candle device the
//! weights load onto; everything else follows the weights' device.

// The network and its loading (owner: model-net).
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod device;
pub mod generate;
pub mod lfm2_vl;
pub mod linear;
pub mod ops;
pub mod packed;
pub mod projector;
pub mod quant;
pub mod text;
pub mod vision;

pub use device::{DeviceChoice, DeviceError};

// Turning an image and a conversation into model inputs (owner: processor).
pub mod chat;
pub mod processor;

// Finding a checkpoint and its decoding defaults (owner: infer).
pub mod generation_config;
pub mod random_checkpoint;
pub mod resolve;
