//! `generation_config.json`: the checkpoint's decoding defaults (EOS and pad ids, sampling).
//!
//! transformers' `generate` reads this file and lets explicit arguments override it; `vlmpipe
//! infer` does the same (flag > file > model config). Only the keys vlmpipe's generator uses are
//! read; the rest (e.g. `_from_model_config`, `transformers_version`) are ignored.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::file_error::FileError;
use crate::model::config::EosIds;

/// Why `generation_config.json` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GenerationConfigError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("invalid `{path}`")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The decoding defaults a checkpoint ships with; every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub eos_token_id: Option<EosIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// transformers only samples when `do_sample` is true, whatever `temperature` says.
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

/// The file name inside a model directory.
pub(crate) const GENERATION_CONFIG_FILE: &str = "generation_config.json";

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; a missing file gives the empty default (it is optional
    /// on the Hub).
    pub fn from_model_dir(dir: &Path) -> Result<Self, GenerationConfigError> {
        // A GGUF model given as its `.gguf` file has no folder of JSON files.
        if !dir.is_dir() {
            return Ok(Self::default());
        }
        let path = dir.join(GENERATION_CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(FileError::read(&path)(source).into()),
        };
        serde_json::from_str(&text).map_err(|source| GenerationConfigError::Json { path, source })
    }

    /// EOS ids from this file, else `fallback` (the model config's).
    pub fn eos_token_ids(&self, fallback: &[u32]) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map_or_else(|| fallback.to_vec(), EosIds::to_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_single_and_list_eos_and_tolerates_a_missing_file()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let absent = GenerationConfig::from_model_dir(dir.path())?;
        assert!(absent.eos_token_id.is_none() && absent.pad_token_id.is_none());
        let path = dir.path().join(GENERATION_CONFIG_FILE);
        std::fs::write(
            &path,
            r#"{"eos_token_id": 7, "pad_token_id": 0, "_from_model_config": true}"#,
        )?;
        let cfg = GenerationConfig::from_model_dir(dir.path())?;
        assert_eq!(cfg.eos_token_ids(&[2]), vec![7]);
        assert_eq!(cfg.pad_token_id, Some(0));
        std::fs::write(&path, r#"{"eos_token_id": [7, 2]}"#)?;
        let cfg = GenerationConfig::from_model_dir(dir.path())?;
        assert_eq!(cfg.eos_token_ids(&[]), vec![7, 2]);
        std::fs::write(&path, "{")?;
        assert!(matches!(
            GenerationConfig::from_model_dir(dir.path()),
            Err(GenerationConfigError::Json { .. })
        ));
        Ok(())
    }

    #[test]
    fn falls_back_to_the_model_config_eos() {
        assert_eq!(GenerationConfig::default().eos_token_ids(&[7]), vec![7]);
    }
}
