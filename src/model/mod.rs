//! LFM2-VL in candle: checkpoint loading, image processing, the network and generation.
//!
//! Model code does no IO except in `checkpoint` (files → config + weights) and `processor`
//! (which only sees decoded images and config values).

// The network and its loading (owner: model-net).
pub mod checkpoint;
pub mod config;
pub mod generate;
pub mod lfm2_vl;
pub mod linear;
pub mod ops;
pub mod projector;
pub mod text;
pub mod vision;

// Turning an image and a conversation into model inputs (owner: processor).
pub mod chat;
pub mod processor;
