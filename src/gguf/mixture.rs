//! The per-tensor types of a k-quant mixture, chosen as llama.cpp's `llama-quantize` chooses
//! them, so `export --gguf --quant Q4_K_M` writes the file `llama-quantize FILE-F16.gguf
//! FILE-Q4_K_M.gguf Q4_K_M` writes (`tests/it/gguf_export.rs` compares the two).
//!
//! A port of `llama_tensor_get_type` (`src/llama-quant.cpp` of the pinned llama.cpp) for the
//! mixtures vlmpipe writes and the tensors an `lfm2` text model has (no experts, no fused QKV,
//! not Falcon, not 70B, no imatrix, no `--pure`, no overrides):
//!
//! - `tensor_allows_quantization`: 2-D weights only, not `*_norm.weight`, not the short-conv
//!   kernels or position embeddings; everything else keeps the F16 export's type;
//! - `token_embd` (tied: LFM2 has no `output.weight`) and `output`: Q6_K, or Q8_0 when its rows
//!   are not whole 256-value blocks;
//! - `attn_v`: Q6_K where `use_more_bits(i, n)` holds, `i` counting the `attn_v` tensors and `n`
//!   their number; `ffn_down`: the same with `i` counting `ffn_down` tensors and `n` the layer
//!   count (`n_layer_all`); both counters advance in llama.cpp's tensor order (layer, then name:
//!   the model loader's `weight_name_comparer`);
//! - `tensor_type_fallback` for rows that are not whole blocks: Q4_K → Q5_0, Q6_K → Q8_0, and
//!   F16 when even that does not fit.

use std::collections::HashMap;

use candle_core::quantized::GgmlDType;

use super::quant::GgufQuant;

/// One tensor of the text file, before its type is chosen.
#[derive(Clone, Debug)]
pub(crate) struct TensorShape {
    pub name: String,
    /// ggml's `ne[0]`: the row width (the last dimension of the checkpoint tensor).
    pub row: usize,
    pub n_dims: usize,
    /// The type the tensor has in the F16 export (what `llama-quantize` reads and, for a tensor it
    /// does not quantize, keeps).
    pub f16_type: GgmlDType,
}

/// The type each tensor gets, and for those whose rows did not fit the type the mixture asked
/// for, that type (the export lists them as fallbacks).
pub(crate) struct MixtureTypes {
    pub types: HashMap<String, GgmlDType>,
    pub wanted: HashMap<String, GgmlDType>,
}

/// llama.cpp's `tensor_get_category`, for the categories an `lfm2` model has.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Category {
    TokenEmbd,
    Output,
    AttnV,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    if name == "output.weight" {
        Category::Output
    } else if name == "token_embd.weight" {
        Category::TokenEmbd
    } else if name.contains("attn_v.weight") {
        Category::AttnV
    } else if name.contains("ffn_down") {
        Category::FfnDown
    } else {
        Category::Other
    }
}

/// `tensor_allows_quantization`, the clauses that can match an `lfm2` text model's names.
fn allows_quantization(t: &TensorShape) -> bool {
    t.n_dims >= 2
        && t.name.ends_with("weight")
        && !t.name.contains("_norm.weight")
        && !t.name.contains("shortconv.conv.weight")
        && !t.name.contains("ssm_conv1d")
        && t.name != "position_embd.weight"
        && !t.name.contains(".position_embd")
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third between.
fn use_more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The loader's `weight_name_comparer`: by `blk.N.` number (none sorts first), then by name.
fn loader_order(a: &str, b: &str) -> std::cmp::Ordering {
    let layer = |name: &str| -> i64 {
        name.strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(-1)
    };
    layer(a).cmp(&layer(b)).then_with(|| a.cmp(b))
}

/// `tensor_type_fallback`: a type whose blocks fit rows of `row` values.
fn fallback(wanted: GgmlDType, row: usize) -> GgmlDType {
    let fits = |t: GgmlDType| row.is_multiple_of(t.block_size());
    if fits(wanted) {
        return wanted;
    }
    let next = match wanted {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    };
    if fits(next) { next } else { GgmlDType::F16 }
}

/// The types of `tensors` (the text file's) under the mixture `quant`, for a model of `n_layer`
/// blocks.
pub(crate) fn mixture_types(
    quant: GgufQuant,
    tensors: &[TensorShape],
    n_layer: usize,
) -> MixtureTypes {
    debug_assert!(quant.is_mixture());
    let default = quant.ggml_dtype();
    let mut order: Vec<&TensorShape> = tensors.iter().collect();
    order.sort_by(|a, b| loader_order(&a.name, &b.name));
    let n_attention_wv = order
        .iter()
        .filter(|t| category(&t.name) == Category::AttnV)
        .count() as i64;
    let tied = !order.iter().any(|t| category(&t.name) == Category::Output);
    let n_ffn_down = n_layer as i64;
    let (mut i_attention_wv, mut i_ffn_down) = (0i64, 0i64);
    let mut types = HashMap::new();
    let mut wanted = HashMap::new();
    for t in order {
        if !allows_quantization(t) {
            types.insert(t.name.clone(), t.f16_type);
            continue;
        }
        let mut new_type = default;
        match category(&t.name) {
            c @ (Category::Output | Category::TokenEmbd) if c == Category::Output || tied => {
                new_type = if !t.row.is_multiple_of(default.block_size()) {
                    // Not `tensor_type_fallback`'s warning: the rule itself picks Q8_0.
                    wanted.insert(t.name.clone(), GgmlDType::Q6K);
                    GgmlDType::Q8_0
                } else {
                    GgmlDType::Q6K
                };
            }
            Category::AttnV => {
                if use_more_bits(i_attention_wv, n_attention_wv) {
                    new_type = GgmlDType::Q6K;
                }
                i_attention_wv += 1;
            }
            Category::FfnDown => {
                if use_more_bits(i_ffn_down, n_ffn_down) {
                    new_type = GgmlDType::Q6K;
                }
                i_ffn_down += 1;
            }
            _ => {}
        }
        let used = fallback(new_type, t.row);
        if used != new_type {
            wanted.insert(t.name.clone(), new_type);
        }
        types.insert(t.name.clone(), used);
    }
    MixtureTypes { types, wanted }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(name: &str, row: usize, n_dims: usize) -> TensorShape {
        TensorShape {
            name: name.into(),
            row,
            n_dims,
            f16_type: if n_dims == 1 || name.contains("conv.weight") {
                GgmlDType::F32
            } else {
                GgmlDType::F16
            },
        }
    }

    /// LFM2-350M's layout (16 layers, attention at 2, 5, 8, 10, 12, 14), worked by hand from
    /// the C rules (the integration test checks the same against `llama-quantize` itself).
    #[test]
    fn q4_k_m_follows_llama_quantize_on_lfm2_350m() {
        let attention = [2, 5, 8, 10, 12, 14];
        let mut tensors = vec![
            shape("token_embd.weight", 1024, 2),
            shape("token_embd_norm.weight", 1024, 1),
        ];
        for i in 0..16 {
            tensors.push(shape(&format!("blk.{i}.ffn_down.weight"), 4608, 2));
            tensors.push(shape(&format!("blk.{i}.ffn_up.weight"), 1024, 2));
            tensors.push(shape(&format!("blk.{i}.ffn_norm.weight"), 1024, 1));
            if attention.contains(&i) {
                tensors.push(shape(&format!("blk.{i}.attn_v.weight"), 1024, 2));
                tensors.push(shape(&format!("blk.{i}.attn_q.weight"), 1024, 2));
            } else {
                tensors.push(shape(&format!("blk.{i}.shortconv.conv.weight"), 3, 2));
                tensors.push(shape(&format!("blk.{i}.shortconv.in_proj.weight"), 1024, 2));
            }
        }
        let m = mixture_types(GgufQuant::Q4KM, &tensors, 16);
        let ty = |n: &str| m.types[n];
        assert_eq!(ty("token_embd.weight"), GgmlDType::Q6K);
        assert_eq!(ty("token_embd_norm.weight"), GgmlDType::F32);
        assert_eq!(ty("blk.0.shortconv.conv.weight"), GgmlDType::F32);
        assert_eq!(ty("blk.0.shortconv.in_proj.weight"), GgmlDType::Q4K);
        // ffn_down: use_more_bits(i, 16) holds for 0, 1, 4, 7, 10, 13, 14, 15.
        let q6: Vec<usize> = (0..16)
            .filter(|i| ty(&format!("blk.{i}.ffn_down.weight")) == GgmlDType::Q6K)
            .collect();
        assert_eq!(q6, [0, 1, 4, 7, 10, 13, 14, 15]);
        // attn_v: the 6 attention layers count 0..6; use_more_bits(i, 6) holds for 2 and 5.
        let q6: Vec<usize> = attention
            .into_iter()
            .filter(|i| ty(&format!("blk.{i}.attn_v.weight")) == GgmlDType::Q6K)
            .collect();
        assert_eq!(q6, [8, 14]);
        assert_eq!(ty("blk.2.attn_q.weight"), GgmlDType::Q4K);
        assert!(m.wanted.is_empty());
    }

    /// Narrow rows: Q4_K → Q5_0, Q6_K → Q8_0, the tied embeddings Q8_0 by rule, F16 at last.
    #[test]
    fn narrow_rows_fall_back_as_llama_cpp_does() {
        let tensors = [
            shape("token_embd.weight", 64, 2),
            shape("blk.0.ffn_down.weight", 192, 2),
            shape("blk.1.ffn_down.weight", 192, 2),
            shape("blk.1.ffn_up.weight", 64, 2),
            shape("blk.1.attn_q.weight", 48, 2),
        ];
        let m = mixture_types(GgufQuant::Q4KM, &tensors, 2);
        assert_eq!(m.types["token_embd.weight"], GgmlDType::Q8_0);
        // use_more_bits(0, 2): 0 >= 7 * 2 / 8 = 1 fails, 0 < 2 / 8 = 0 fails, (0 - 0) % 3 != 2.
        assert_eq!(m.types["blk.0.ffn_down.weight"], GgmlDType::Q5_0);
        assert_eq!(m.types["blk.1.ffn_down.weight"], GgmlDType::Q8_0);
        assert_eq!(m.types["blk.1.ffn_up.weight"], GgmlDType::Q5_0);
        assert_eq!(m.types["blk.1.attn_q.weight"], GgmlDType::F16);
        assert_eq!(m.wanted["blk.1.ffn_down.weight"], GgmlDType::Q6K);
        assert_eq!(m.wanted["blk.1.attn_q.weight"], GgmlDType::Q4K);
    }
}
