//! The GGUF output types `vlmpipe export --gguf` writes, named as llama.cpp names them.
//!
//! These are the types llama.cpp's converter (`convert_hf_to_gguf.py --outtype`) writes itself;
//! k-quant mixtures such as Q4_K_M come out of `llama-quantize` applied to an F16 export (its
//! per-tensor rules pick Q6_K for some tensors), so vlmpipe leaves them to that tool.

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
}

/// Every type [`GgufQuant::from_str`] accepts, for messages and `--help`.
pub const KNOWN_QUANTS: [GgufQuant; 4] = [
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
        }
    }

    /// `general.file_type`: llama.cpp's `LLAMA_FTYPE_*` (ALL_F32, MOSTLY_F16, MOSTLY_BF16,
    /// MOSTLY_Q8_0).
    pub(crate) fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 32,
            Self::Q8_0 => 7,
        }
    }

    /// The tensor type of a weight this file type quantizes.
    pub(crate) fn ggml_dtype(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::BF16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }

    fn known_list() -> String {
        KNOWN_QUANTS
            .iter()
            .map(|q| q.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
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
                known: Self::known_list(),
                hint: if upper.contains("_K") || upper.starts_with("Q4") || upper.starts_with("Q5")
                {
                    " (k-quant mixtures such as Q4_K_M: export F16, then run llama.cpp's \
                     `llama-quantize FILE-F16.gguf FILE-Q4_K_M.gguf Q4_K_M`)"
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
            "unknown GGUF type `q9`; the known ones are F32, F16, BF16, Q8_0"
        );
        let err = "Q4_K_M".parse::<GgufQuant>().unwrap_err().to_string();
        assert!(err.contains("llama-quantize"), "{err}");
    }

    #[test]
    fn file_types_are_llama_cpp_ones() {
        // llama.h: LLAMA_FTYPE_ALL_F32 = 0, MOSTLY_F16 = 1, MOSTLY_Q8_0 = 7, MOSTLY_BF16 = 32.
        let ids: Vec<u32> = KNOWN_QUANTS.iter().map(|q| q.file_type()).collect();
        assert_eq!(ids, [0, 1, 32, 7]);
    }
}
