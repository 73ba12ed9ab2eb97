//! Quantized weights for inference: every projection and the LM head quantized at load, from the
//! f32 safetensors weights, into ggml blocks that candle multiplies natively.
//!
//! `--quant q8_0` puts every linear layer (decoder, LM head, vision tower, projector) in Q8_0;
//! `--quant q4_k` puts the decoder's projections in Q4_K, the LM head (tied to the token
//! embeddings in LFM2) in Q6_K as llama.cpp's Q4_K mixes do for `output`/`token_embd`, and the
//! vision tower and projector in Q8_0 (the precision of a Q8_0 mmproj). Norms, convolution
//! kernels, position embeddings and biases stay in the model dtype, as in a GGUF file.
//!
//! The blocks are ggml's reference quantizers' (`quantize_row_q8_0_ref`, `…_q4_K_ref`,
//! `…_q6_K_ref`), so they hold what llama.cpp's `llama-quantize` writes for the same f32 rows:
//! Q8_0 from candle's quantizer; Q4_K and Q6_K from [`ggml_q4k`], since candle's are older ggml
//! algorithms whose bytes differ on every tensor (`model_quant::q4_k_and_q6_k_blocks_equal_…`). A row width a block type cannot take falls back
//! per tensor as llama.cpp does ([`choose_type`]), and [`QuantReport`] lists every fallback.
//!
//! Products on the CPU by Q8_0 blocks: where the CPU has AVX-512 VNNI, every row count runs our
//! 16-row tile kernel (`kernels::q8_vnni`: `vpdpbusd`, Q8_0 activations quantized with AVX-512;
//! it measured faster than candle's VNNI tiles, BENCHMARKS.md "Q8_0 on our VNNI kernel");
//! elsewhere a few rows (decode) go through our AVX2 integer kernel (`kernels::q8`, `QMatMul`'s
//! values, weights streamed once) and many rows (prefill, the vision tower) dequantize 64-row
//! panels into the f32 GEMM ([`prefill`], where the measurements that chose this are), except
//! with AVX-VNNI but no AVX-512, where candle's repacked tiles take them. By k-quant blocks:
//! where the CPU has AVX-512 VNNI, Q4_K and Q6_K run every row count on our 16-row tile kernels
//! (`kernels::q4k_vnni`, `kernels::q6k_vnni`); elsewhere decode steps go through `kernels::q4k`
//! (Q4_K) or candle's block dot over the compact blocks ([`matvec`]), many rows through
//! candle's tiles. Every other product, and all of them on
//! CUDA/Metal, stay on `QMatMul`. The
//! benchmark (`vlmpipe bench model --quant …`) compares it with the f32 path step by step.
//! A tied embedding table reads its rows from the quantized head, as llama.cpp does.

pub(crate) mod ggml_q4k;
mod matvec;
mod prefill;
mod weight;

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Result};

use crate::model::lfm2_vl::Lfm2VlModel;
use crate::model::linear::{LinearVisitor, WeightMatrix};

pub use weight::QuantWeight;

/// A quantization a user can ask for (`--quant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quant {
    Q8_0,
    Q4K,
}

impl Quant {
    /// Every quant name `--quant` accepts, as written on the command line.
    pub(crate) const NAMES: &'static [&'static str] = &["q8_0", "q4_k"];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Quant::Q8_0 => "q8_0",
            Quant::Q4K => "q4_k",
        }
    }

    /// The block type of each part of the model under this quant.
    pub(crate) fn type_for(self, part: Part) -> GgmlDType {
        match (self, part) {
            (Quant::Q8_0, _) | (Quant::Q4K, Part::Vision) => GgmlDType::Q8_0,
            (Quant::Q4K, Part::Decoder) => GgmlDType::Q4K,
            // llama.cpp's `llama_tensor_get_type`: `output.weight` (or a tied `token_embd`)
            // goes to Q6_K under every Q4_K mix.
            (Quant::Q4K, Part::Head) => GgmlDType::Q6K,
        }
    }
}

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown `--quant` name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown quant `{name}`; known quants: {}", Quant::NAMES.join(", "))]
pub struct UnknownQuant {
    pub name: String,
}

impl FromStr for Quant {
    type Err = UnknownQuant;

    /// Case-insensitive, so llama.cpp's spelling (`Q8_0`, `Q4_K`) works too.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(Quant::Q8_0),
            "q4_k" => Ok(Quant::Q4K),
            _ => Err(UnknownQuant { name: s.into() }),
        }
    }
}

/// Where a weight sits, which decides its block type ([`Quant::type_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Vision tower and projector (the mmproj file of a GGUF pair).
    Vision,
    /// The decoder's projections.
    Decoder,
    /// The LM head (the token embeddings when tied).
    Head,
}

/// The storage a tensor ends up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    Ggml(GgmlDType),
    /// F16 values; held as f16-rounded values in the model dtype here (candle multiplies an F16
    /// `QTensor` by first dequantizing it, so this computes the same for the same memory).
    F16,
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorType::Ggml(t) => write!(f, "{}", ggml_name(*t)),
            TensorType::F16 => f.write_str("F16"),
        }
    }
}

/// ggml's name of a block type (`Q8_0`, `Q4_K`, …).
pub(crate) fn ggml_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// The type a tensor with rows of `in_dim` values gets when `wanted` was asked for.
///
/// As llama.cpp's `llama_tensor_get_type` does for rows that are not whole blocks: Q4_K → Q5_0,
/// Q5_K → Q5_1, Q6_K → Q8_0, and F16 when even that does not fit; Q8_0 → F16, as
/// `convert_hf_to_gguf.py` falls back when gguf-py cannot quantize a tensor.
pub(crate) fn choose_type(wanted: GgmlDType, in_dim: usize) -> TensorType {
    let fits = |t: GgmlDType| in_dim > 0 && in_dim.is_multiple_of(t.block_size());
    if fits(wanted) {
        return TensorType::Ggml(wanted);
    }
    let fallback = match wanted {
        GgmlDType::Q4K => Some(GgmlDType::Q5_0),
        GgmlDType::Q5K => Some(GgmlDType::Q5_1),
        GgmlDType::Q6K => Some(GgmlDType::Q8_0),
        _ => None,
    };
    match fallback {
        Some(t) if fits(t) => TensorType::Ggml(t),
        _ => TensorType::F16,
    }
}

/// What quantizing did to one tensor.
#[derive(Debug, Clone)]
pub struct TensorQuant {
    /// Checkpoint path without `.weight` (`lm_head` for the head).
    pub name: String,
    /// `[out, in]`.
    pub shape: [usize; 2],
    pub part: Part,
    pub wanted: GgmlDType,
    pub chosen: TensorType,
    /// Bytes of the stored weight afterwards (F16 fallbacks count 2 bytes a value, as in a GGUF).
    pub bytes: usize,
}

impl TensorQuant {
    pub fn fell_back(&self) -> bool {
        self.chosen != TensorType::Ggml(self.wanted)
    }
}

/// Every quantized tensor, in checkpoint order, with the LM head last.
#[derive(Debug, Clone)]
pub struct QuantReport {
    pub quant: Quant,
    pub tensors: Vec<TensorQuant>,
}

impl QuantReport {
    /// The tensors that did not get the type their part asked for.
    pub fn fallbacks(&self) -> impl Iterator<Item = &TensorQuant> {
        self.tensors.iter().filter(|t| t.fell_back())
    }

    /// Bytes of every quantized matrix (and F16 fallback) together.
    pub fn bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.bytes).sum()
    }

    /// The same matrices' bytes in f32.
    pub fn f32_bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|t| t.shape[0] * t.shape[1] * 4)
            .sum()
    }

    /// One line per fallback, llama.cpp's wording: what the rows are and what was used instead.
    pub fn fallback_lines(&self) -> Vec<String> {
        self.fallbacks()
            .map(|t| {
                format!(
                    "`{}` [{}, {}]: rows of {} are not whole {} blocks of {}; using fallback \
                     quantization {}",
                    t.name,
                    t.shape[0],
                    t.shape[1],
                    t.shape[1],
                    ggml_name(t.wanted),
                    t.wanted.block_size(),
                    t.chosen
                )
            })
            .collect()
    }

    /// Bytes of the matrices a decode step reads (decoder projections and LM head), quantized.
    pub(crate) fn decode_bytes(&self) -> usize {
        self.decode_tensors().map(|t| t.bytes).sum()
    }

    /// The same matrices' values (for their size in another dtype).
    pub(crate) fn decode_values(&self) -> usize {
        self.decode_tensors().map(|t| t.shape[0] * t.shape[1]).sum()
    }

    fn decode_tensors(&self) -> impl Iterator<Item = &TensorQuant> {
        self.tensors.iter().filter(|t| t.part != Part::Vision)
    }

    /// A one-line summary: quant, tensors, size against f32, fallbacks.
    pub fn summary(&self) -> String {
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        format!(
            "quantized {} weight matrices to {} ({:.1} MiB, f32 {:.1} MiB); {} fell back",
            self.tensors.len(),
            self.quant,
            mib(self.bytes()),
            mib(self.f32_bytes()),
            self.fallbacks().count()
        )
    }
}

/// Quantizes every linear layer and the LM head of `model` per `quant` (inference only; an
/// adapter on a layer stays attached and runs on top of the quantized base).
pub fn quantize_model(model: &mut Lfm2VlModel, quant: Quant) -> Result<QuantReport> {
    let mut vision_names = HashSet::new();
    model
        .vision()
        .visit_linears(&mut |l| _ = vision_names.insert(l.name().to_string()));
    model
        .projector()
        .visit_linears(&mut |l| _ = vision_names.insert(l.name().to_string()));
    let mut tensors = Vec::new();
    let mut failure = None;
    model.visit_linears_mut(&mut |lin| {
        if failure.is_some() {
            return;
        }
        let part = if vision_names.contains(lin.name()) {
            Part::Vision
        } else {
            Part::Decoder
        };
        let name = lin.name().to_string();
        match quantize_matrix(lin.weight_matrix(), quant, part, name) {
            Ok((matrix, record)) => {
                lin.set_weight_matrix(matrix);
                tensors.push(record);
            }
            Err(e) => failure = Some(e),
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let text = model.text_mut();
    let (head, record) =
        quantize_matrix(text.lm_head_matrix(), quant, Part::Head, "lm_head".into())?;
    text.set_lm_head_matrix(head);
    tensors.push(record);
    Ok(QuantReport { quant, tensors })
}

/// One matrix → its quantized (or fallback) form and what happened.
fn quantize_matrix(
    matrix: &WeightMatrix,
    quant: Quant,
    part: Part,
    name: String,
) -> Result<(WeightMatrix, TensorQuant)> {
    let wanted = quant.type_for(part);
    let shape = [matrix.out_dim(), matrix.in_dim()];
    let chosen = choose_type(wanted, shape[1]);
    let dense = matrix.to_tensor()?;
    let (matrix, bytes) = match chosen {
        TensorType::Ggml(t) => {
            let q = QuantWeight::quantize(&dense, t)?;
            let bytes = q.storage_bytes();
            (WeightMatrix::Quantized(Arc::new(q)), bytes)
        }
        TensorType::F16 => {
            let rounded = dense.to_dtype(DType::F16)?.to_dtype(dense.dtype())?;
            (WeightMatrix::Dense(rounded), shape[0] * shape[1] * 2)
        }
    };
    Ok((
        matrix,
        TensorQuant {
            name,
            shape,
            part,
            wanted,
            chosen,
            bytes,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_case_insensitively_and_unknown_ones_list_the_known() {
        assert_eq!("q8_0".parse::<Quant>(), Ok(Quant::Q8_0));
        assert_eq!("Q4_K".parse::<Quant>(), Ok(Quant::Q4K));
        let err = "q3_k".parse::<Quant>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown quant `q3_k`; known quants: q8_0, q4_k"
        );
    }

    /// llama.cpp's fallbacks for rows that are not whole blocks.
    #[test]
    fn widths_fall_back_like_llama_cpp() {
        use GgmlDType::*;
        assert_eq!(choose_type(Q4K, 1024), TensorType::Ggml(Q4K));
        assert_eq!(choose_type(Q4K, 4608), TensorType::Ggml(Q4K));
        assert_eq!(choose_type(Q4K, 64), TensorType::Ggml(Q5_0));
        assert_eq!(choose_type(Q4K, 48), TensorType::F16);
        assert_eq!(choose_type(Q6K, 96), TensorType::Ggml(Q8_0));
        assert_eq!(choose_type(Q8_0, 64), TensorType::Ggml(Q8_0));
        assert_eq!(choose_type(Q8_0, 588), TensorType::F16);
    }
}

#[cfg(test)]
mod product_tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn relative_error(dtype: GgmlDType, rows: usize) -> f32 {
        let dev = Device::Cpu;
        // Seeded: the Q4_K error of one unseeded row ranged up to 0.078 against the 0.08 bound.
        let mut rng = crate::rng::SeededRng::new(rows as u64);
        let w = Tensor::from_vec(rng.normal_vec(512 * 1024, 1.0), (512, 1024), &dev).unwrap();
        let x = Tensor::from_vec(rng.normal_vec(rows * 1024, 1.0), (rows, 1024), &dev).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let got = QuantWeight::quantize(&w, dtype)
            .unwrap()
            .linear(&x, None)
            .unwrap();
        let rms = |t: &Tensor| t.sqr().unwrap().mean_all().unwrap().sqrt().unwrap();
        let rms = |t: &Tensor| rms(t).to_scalar::<f32>().unwrap();
        rms(&(&got - &want).unwrap()) / rms(&want)
    }

    /// One product's error is the blocks' rounding: Q8_0 (weights and activations in 8 bits)
    /// well under 1%, Q4_K a few percent, for one row (decode) and many (prefill) alike.
    #[test]
    fn one_product_errs_by_the_block_rounding() {
        for rows in [1, 7] {
            let q8 = relative_error(GgmlDType::Q8_0, rows);
            let q4 = relative_error(GgmlDType::Q4K, rows);
            let q6 = relative_error(GgmlDType::Q6K, rows);
            eprintln!("rows {rows}: Q8_0 {q8:.5}, Q6_K {q6:.5}, Q4_K {q4:.5}");
            assert!(q8 < 0.01, "Q8_0 {q8}");
            assert!(q6 < 0.03, "Q6_K {q6}");
            assert!(q4 < 0.08, "Q4_K {q4}");
            assert!(q8 < q6 && q6 < q4);
        }
    }
}

/// Candle's `QMatMul` product of `x` by `q`, flattened: what the CPU paths of this module are
/// checked against.
#[cfg(test)]
pub(crate) fn qmatmul_values(
    q: &std::sync::Arc<candle_core::quantized::QTensor>,
    x: &candle_core::Tensor,
) -> Vec<f32> {
    use candle_core::Module as _;
    candle_core::quantized::QMatMul::from_arc(q.clone())
        .unwrap()
        .forward(x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}
