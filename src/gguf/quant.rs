//! The GGUF output types `vlmpipe export --gguf` writes, named as llama.cpp names them.
//!
//! F32, F16, BF16 and Q8_0 are the types llama.cpp's converter (`convert_hf_to_gguf.py
//! --outtype`) writes itself; Q4_K_M is the k-quant mixture `llama-quantize` makes of an F16
//! export, tensor by tensor as its `llama_tensor_get_type` chooses ([`super::mixture`]). A
//! mixture is a text-model type: llama.cpp quantizes no mmproj that way, so an mmproj takes one
//! of [`MMPROJ_QUANTS`] (F16 unless told, as LiquidAI ships its Q4 files).

use std::fmt;
use std::str::FromStr;

use candle_core::quantized::GgmlDType;

/// A whole-file output type: what the 2-D weights become (norms, biases, the short-conv kernels
/// and position embeddings stay F32 whatever the type, as llama.cpp's converter does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgufQuant {
    F32,
    F16,
    BF16,
    Q8_0,
    /// llama.cpp's Q4_K_M mixture: Q4_K, with Q6_K for the tied embeddings and for some layers'
    /// `attn_v` and `ffn_down`.
    Q4KM,
}

/// Every type [`GgufQuant::from_str`] accepts, for messages and `--help`.
pub const KNOWN_QUANTS: [GgufQuant; 5] = [
    GgufQuant::F32,
    GgufQuant::F16,
    GgufQuant::BF16,
    GgufQuant::Q8_0,
    GgufQuant::Q4KM,
];

/// The types an mmproj file takes: the converter's own (`--mmproj --outtype`).
pub const MMPROJ_QUANTS: [GgufQuant; 4] = [
    GgufQuant::F32,
    GgufQuant::F16,
    GgufQuant::BF16,
    GgufQuant::Q8_0,
];

impl GgufQuant {
    /// The name in file names and messages (`F16`, `Q8_0`), as the converter spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q4KM => "Q4_K_M",
        }
    }

    /// `general.file_type`: llama.cpp's `LLAMA_FTYPE_*` (ALL_F32, MOSTLY_F16, MOSTLY_BF16,
    /// MOSTLY_Q8_0, MOSTLY_Q4_K_M).
    pub(crate) fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 32,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
        }
    }

    /// The tensor type of a weight this file type quantizes (a mixture's default type, which
    /// [`super::mixture`] changes per tensor).
    pub(crate) fn ggml_dtype(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::BF16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4KM => GgmlDType::Q4K,
        }
    }

    /// A k-quant mixture (`llama-quantize`'s per-tensor choice), not one type for every weight.
    pub fn is_mixture(self) -> bool {
        !MMPROJ_QUANTS.contains(&self)
    }

    /// The mmproj's type when none is given: the text model's, or F16 beside a mixture.
    pub fn default_mmproj(self) -> GgufQuant {
        if self.is_mixture() { Self::F16 } else { self }
    }

    /// `self` as an mmproj's type, or why not (the error lists [`MMPROJ_QUANTS`]).
    pub fn for_mmproj(self) -> Result<GgufQuant, UnknownQuant> {
        if self.is_mixture() {
            return Err(UnknownQuant {
                given: self.name().to_owned(),
                known: list(&MMPROJ_QUANTS),
                hint: " (an mmproj takes no k-quant mixture: llama.cpp quantizes none that way; \
                       LiquidAI ships F16 mmproj files beside its Q4 text models)",
            });
        }
        Ok(self)
    }
}

fn list(quants: &[GgufQuant]) -> String {
    quants
        .iter()
        .map(|q| q.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for GgufQuant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A quant name that is not one of [`KNOWN_QUANTS`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown GGUF type `{given}`; the known ones are {known}{hint}")]
pub struct UnknownQuant {
    pub given: String,
    pub known: String,
    pub hint: &'static str,
}

impl FromStr for GgufQuant {
    type Err = UnknownQuant;

    /// Case-insensitive (`q8_0`, `Q8_0`, `f16`), as llama.cpp's tools accept them.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let upper = text.trim().to_ascii_uppercase();
        KNOWN_QUANTS
            .into_iter()
            .find(|q| q.name() == upper)
            .ok_or_else(|| UnknownQuant {
                given: text.to_owned(),
                known: list(&KNOWN_QUANTS),
                hint: if upper.contains("_K") || upper.starts_with("Q4") || upper.starts_with("Q5")
                {
                    " (other k-quant mixtures: export F16, then run llama.cpp's \
                     `llama-quantize FILE-F16.gguf FILE-Q5_K_M.gguf Q5_K_M`)"
                } else {
                    ""
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_case_insensitively() {
        assert_eq!("q8_0".parse::<GgufQuant>(), Ok(GgufQuant::Q8_0));
        assert_eq!("F16".parse::<GgufQuant>(), Ok(GgufQuant::F16));
        assert_eq!("bf16".parse::<GgufQuant>(), Ok(GgufQuant::BF16));
        for q in KNOWN_QUANTS {
            assert_eq!(q.name().parse::<GgufQuant>(), Ok(q));
        }
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = "q9".parse::<GgufQuant>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown GGUF type `q9`; the known ones are F32, F16, BF16, Q8_0, Q4_K_M"
        );
        assert_eq!("q4_k_m".parse::<GgufQuant>(), Ok(GgufQuant::Q4KM));
        let err = "Q5_K_M".parse::<GgufQuant>().unwrap_err().to_string();
        assert!(err.contains("llama-quantize"), "{err}");
    }

    #[test]
    fn mixtures_are_text_types_only() {
        assert_eq!(GgufQuant::Q4KM.default_mmproj(), GgufQuant::F16);
        assert_eq!(GgufQuant::Q8_0.default_mmproj(), GgufQuant::Q8_0);
        let err = GgufQuant::Q4KM.for_mmproj().unwrap_err().to_string();
        assert!(
            err.starts_with(
                "unknown GGUF type `Q4_K_M`; the known ones are F32, F16, BF16, Q8_0 (an mmproj"
            ),
            "{err}"
        );
        assert_eq!(GgufQuant::F16.for_mmproj(), Ok(GgufQuant::F16));
    }

    #[test]
    fn file_types_are_llama_cpp_ones() {
        // llama.h: LLAMA_FTYPE_ALL_F32 = 0, MOSTLY_F16 = 1, MOSTLY_Q8_0 = 7, MOSTLY_BF16 = 32,
        // MOSTLY_Q4_K_M = 15.
        let ids: Vec<u32> = KNOWN_QUANTS.iter().map(|q| q.file_type()).collect();
        assert_eq!(ids, [0, 1, 32, 7, 15]);
    }
}
