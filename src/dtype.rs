//! The dtype a model computes in: one type for the pipeline's `dtype:`, the CLI's `--dtype`,
//! model entries and exports, so the names (`f32`, `f16`, `bf16`), torch's names and candle's
//! [`DType`] are mapped in one place.

use candle_core::DType;
use serde::{Deserialize, Serialize};

/// A dtype vlmpipe computes in or saves weights as.
///
/// Serialised as its short name (`"bf16"`), which is also what a plan's canonical parameters
/// and a model entry hold: changing the spelling would change fingerprints.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    #[default]
    F32,
    // Variant order is the order `--help` lists them in.
    Bf16,
    F16,
}

/// A dtype name vlmpipe does not know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype `{name}` (expected f32, f16 or bf16)")]
pub struct UnknownDtype {
    pub name: String,
}

impl Dtype {
    /// Every dtype, in the order messages list them.
    pub(crate) const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    /// The short name (`f32`, `f16`, `bf16`): what pipelines, `--dtype` and model entries say.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// torch's name, as `config.json` files spell it (`float32`, `float16`, `bfloat16`).
    pub(crate) fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::Bf16 => "bfloat16",
        }
    }

    /// The dtype of a short name.
    pub(crate) fn parse(name: &str) -> Result<Self, UnknownDtype> {
        Self::ALL
            .into_iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| UnknownDtype {
                name: name.to_owned(),
            })
    }

    /// candle's dtype.
    pub(crate) fn to_candle(self) -> DType {
        match self {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::Bf16 => DType::BF16,
        }
    }

    /// The dtype of a candle dtype, if vlmpipe computes in it.
    pub(crate) fn of(dtype: DType) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.to_candle() == dtype)
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Dtype {
    type Err = UnknownDtype;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::parse(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for dtype in Dtype::ALL {
            assert_eq!(Dtype::parse(dtype.name()), Ok(dtype));
            assert_eq!(Dtype::of(dtype.to_candle()), Some(dtype));
            assert_eq!(
                serde_json::to_value(dtype).unwrap(),
                serde_json::Value::from(dtype.name())
            );
        }
        assert_eq!(Dtype::of(DType::U8), None);
        assert_eq!(
            Dtype::parse("f64").unwrap_err().to_string(),
            "unknown dtype `f64` (expected f32, f16 or bf16)"
        );
        assert_eq!(Dtype::Bf16.torch_name(), "bfloat16");
    }
}
