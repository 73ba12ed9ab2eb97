//! CPU f32 kernels that know only slices: no candle tensor, nothing from the rest of the model.
//!
//! Like candle's `CustomOp` bodies (`candle-nn/src/ops.rs`), each kernel takes plain `&[f32]`
//! buffers with their shapes and strides; [`crate::model::ops`] is the bridge that decides when a
//! tensor is eligible (CPU, f32, not tracked by autograd), hands its storage over as a slice and
//! falls back to candle ops otherwise. A new kernel goes here, its tensor entry point in `ops`.
//!
//! - [`cpu`]: the `gemm` crate called in place with the bias fused, fused per-view attention, and
//!   AVX2-dispatched softmax, GELU-tanh and SiLU.
//! - [`packed`]: weights packed once into 64-row panels and the register-blocked AVX-512 product
//!   over them.
//! - [`packed_grad`]: `dY·W` read from packed panels (the gradient training passes through a
//!   frozen packed weight).
//! - [`q8`]: products by Q8_0 weights in integer arithmetic (ggml's block dot, register-tiled).
//! - [`q8_vnni`]: products by Q8_0 weights in 16-row tiles with AVX-512 VNNI `vpdpbusd` (every row
//!   count, where the CPU has it).
//! - [`q4k`]: products by Q4_K weights regrouped by 8 rows (Q8_K activations, rows in lanes).
//! - [`q4k_vnni`]: products by Q4_K weights in 16-row tiles with AVX-512 VNNI `vpdpbusd` (every
//!   row count, where the CPU has it).
//! - [`q6k_vnni`]: products by Q6_K weights in 16-row tiles with AVX-512 VNNI `vpdpbusd` (every
//!   row count, where the CPU has it; the `--quant q4_k` LM head).
//! - [`tasks`]: how the tiled quantized products split their work over the threads.
//! - [`attention_step`]: one query row per head over a key/value cache (a decode step).
//! - [`attention_train`]: the decoder's attention for training (RoPE, both products, mask and
//!   softmax) forward and backward, grouped-query aware.
//! - [`exp`]: the vectorisable `exp` the activations and softmax share.
//! - [`backward`]: RMSNorm and SwiGLU forward and backward for training through the frozen model.
//! - [`lora`]: training's LoRA linear layer (frozen product and low-rank branch) and its backward.
//! - [`low_rank`]: the LoRA branch's rank-`r` products, forward and backward, in one pass over the rows.
//!
//! **Architecture Invariant:** files here import nothing from the rest of the crate and name no
//! candle type (`tests/it/architecture.rs` checks it).

pub(crate) mod attention_step;
pub(crate) mod attention_train;
pub(crate) mod backward;
pub(crate) mod cpu;
pub(crate) mod exp;
pub(crate) mod lora;
pub(crate) mod low_rank;
pub mod packed;
pub(crate) mod packed_grad;
pub(crate) mod q4k;
pub(crate) mod q4k_vnni;
pub(crate) mod q6k_vnni;
pub(crate) mod q8;
pub(crate) mod q8_vnni;
pub(crate) mod tasks;

pub(crate) use cpu::ViewSpan;

/// Deterministic values in [-1, 1) for the kernels' tests (no RNG, so failures reproduce).
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
        })
        .collect()
}
