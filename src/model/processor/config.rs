//! The image processor's settings, read from a model directory's JSON files.
//!
//! LFM2-VL checkpoints spread these over three files, in layouts that changed between
//! transformers releases: 4.55-era checkpoints (the Hub's LFM2-VL-450M) repeat the tiling keys
//! flat in `config.json` and `processor_config.json`; 5.x nests them under `image_processor` in
//! `processor_config.json`; `preprocessor_config.json` carries mean/std and rescaling. Keys that
//! are missing (or `null`) take transformers' `Lfm2VlImageProcessorFast` class defaults.

use std::path::{Path, PathBuf};

use crate::file_error::FileError;
use serde_json::{Map, Value};

/// Errors reading or validating processor settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A config file exists but could not be read.
    #[error(transparent)]
    File(#[from] FileError),
    /// A config file is not valid JSON (or not a JSON object).
    #[error("`{path}` is not a JSON object: {message}")]
    Json { path: PathBuf, message: String },
    /// A key holds a value of the wrong type.
    #[error("`{key}` in `{path}`: expected {expected}, found `{found}`")]
    InvalidKey {
        path: PathBuf,
        key: String,
        expected: &'static str,
        found: String,
    },
    /// The values are individually valid but cannot work together.
    #[error("invalid image processor settings: {0}")]
    Inconsistent(String),
}

/// Everything `Lfm2VlImageProcessorFast` and `Lfm2VlProcessor` need, with transformers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    /// Side of one square tile in pixels.
    pub tile_size: usize,
    /// Lower bound of image tokens for a single view (smart resize scales small images up).
    pub min_image_tokens: usize,
    /// Upper bound of image tokens for a single view or the thumbnail.
    pub max_image_tokens: usize,
    /// Fewest tiles a tiled image is split into.
    pub min_tiles: usize,
    /// Most tiles a tiled image is split into.
    pub max_tiles: usize,
    /// Side of one vision-encoder patch in pixels.
    pub encoder_patch_size: usize,
    /// Pixel-unshuffle factor of the projector: each image token covers factor x factor patches.
    pub downsample_factor: usize,
    /// How far above `max_image_tokens` an image may be before it is tiled.
    pub max_pixels_tolerance: f64,
    /// Whether large images are split into tiles at all.
    pub do_image_splitting: bool,
    /// Whether a tiled image also gets a downscaled whole-image view.
    pub use_thumbnail: bool,
    /// Whether the prompt wraps images in start/end, tile and thumbnail marker tokens.
    pub use_image_special_tokens: bool,
    /// Whether pixel values are multiplied by `rescale_factor`.
    pub do_rescale: bool,
    /// Factor mapping 0..=255 to 0..=1.
    pub rescale_factor: f64,
    /// Whether `(x - mean) / std` is applied.
    pub do_normalize: bool,
    /// Per-channel mean (RGB).
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation (RGB).
    pub image_std: [f64; 3],
}

impl Default for ProcessorConfig {
    /// transformers' `Lfm2VlImageProcessorFast` class attributes; `image_mean`/`image_std` there
    /// are IMAGENET_STANDARD_* which are both 0.5.
    fn default() -> Self {
        Self {
            tile_size: 512,
            min_image_tokens: 64,
            max_image_tokens: 256,
            min_tiles: 2,
            max_tiles: 10,
            encoder_patch_size: 16,
            downsample_factor: 2,
            max_pixels_tolerance: 2.0,
            do_image_splitting: true,
            use_thumbnail: true,
            use_image_special_tokens: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }
}

impl ProcessorConfig {
    /// Reads `config.json`, `preprocessor_config.json` and `processor_config.json` of a model
    /// directory (each optional), later files overriding earlier ones, then validates.
    pub fn from_model_dir(dir: &Path) -> Result<Self, ConfigError> {
        let mut cfg = Self::default();
        for name in [
            "config.json",
            "preprocessor_config.json",
            "processor_config.json",
        ] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(FileError::read(&path))?;
            let json: Value = serde_json::from_str(&text).map_err(|e| ConfigError::Json {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let Value::Object(map) = json else {
                return Err(ConfigError::Json {
                    path,
                    message: "top level is not an object".into(),
                });
            };
            cfg.apply_json(&map, &path)?;
            // 5.x nests the image processor's kwargs; they win over the flat keys beside them.
            if let Some(Value::Object(nested)) = map.get("image_processor") {
                cfg.apply_json(nested, &path)?;
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Overrides fields with the keys present in one JSON object; `path` only labels errors.
    pub fn apply_json(&mut self, map: &Map<String, Value>, path: &Path) -> Result<(), ConfigError> {
        let keys = Keys { map, path };
        keys.usize("tile_size", &mut self.tile_size)?;
        keys.usize("min_image_tokens", &mut self.min_image_tokens)?;
        keys.usize("max_image_tokens", &mut self.max_image_tokens)?;
        keys.usize("min_tiles", &mut self.min_tiles)?;
        keys.usize("max_tiles", &mut self.max_tiles)?;
        keys.usize("encoder_patch_size", &mut self.encoder_patch_size)?;
        keys.usize("downsample_factor", &mut self.downsample_factor)?;
        keys.f64("max_pixels_tolerance", &mut self.max_pixels_tolerance)?;
        keys.bool("do_image_splitting", &mut self.do_image_splitting)?;
        keys.bool("use_thumbnail", &mut self.use_thumbnail)?;
        keys.bool(
            "use_image_special_tokens",
            &mut self.use_image_special_tokens,
        )?;
        keys.bool("do_rescale", &mut self.do_rescale)?;
        keys.f64("rescale_factor", &mut self.rescale_factor)?;
        keys.bool("do_normalize", &mut self.do_normalize)?;
        keys.triple("image_mean", &mut self.image_mean)?;
        keys.triple("image_std", &mut self.image_std)?;
        // transformers resizes with the filter this names; ours is bilinear (PIL's 2, what every
        // LFM2-VL checkpoint says), so another one would silently change every view.
        let mut resample = BILINEAR;
        keys.usize("resample", &mut resample)?;
        if resample != BILINEAR {
            return Err(keys.invalid(
                "resample",
                "2 (bilinear, the only resize filter vlmpipe implements)",
                &Value::from(resample),
            ));
        }
        Ok(())
    }

    /// Rejects settings that would divide by zero or make tiling impossible.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Inconsistent(msg));
        if self.encoder_patch_size == 0 || self.downsample_factor == 0 || self.tile_size == 0 {
            return bad(
                "`encoder_patch_size`, `downsample_factor` and `tile_size` must be positive".into(),
            );
        }
        if !self
            .tile_size
            .is_multiple_of(self.encoder_patch_size * self.downsample_factor)
        {
            return bad(format!(
                "`tile_size` {} is not a multiple of `encoder_patch_size` x `downsample_factor` = {}",
                self.tile_size,
                self.encoder_patch_size * self.downsample_factor
            ));
        }
        if self.max_image_tokens == 0 || self.min_image_tokens > self.max_image_tokens {
            return bad(format!(
                "expected 0 < `min_image_tokens` <= `max_image_tokens`, found {} and {}",
                self.min_image_tokens, self.max_image_tokens
            ));
        }
        if self.do_image_splitting && (self.min_tiles == 0 || self.min_tiles > self.max_tiles) {
            return bad(format!(
                "expected 0 < `min_tiles` <= `max_tiles`, found {} and {}",
                self.min_tiles, self.max_tiles
            ));
        }
        if self.do_normalize && self.image_std.contains(&0.0) {
            return bad("`image_std` contains 0".into());
        }
        if !(self.max_pixels_tolerance.is_finite() && self.rescale_factor.is_finite()) {
            return bad("`max_pixels_tolerance` and `rescale_factor` must be finite".into());
        }
        Ok(())
    }

    /// Pixels per image-token side: one token covers `patch x downsample` pixels squared.
    pub(crate) fn total_factor(&self) -> usize {
        self.encoder_patch_size * self.downsample_factor
    }

    /// The tile grid bounds actually used: transformers forces (1, 1) when splitting is off.
    pub(crate) fn tile_bounds(&self) -> (usize, usize) {
        if self.do_image_splitting {
            (self.min_tiles, self.max_tiles)
        } else {
            (1, 1)
        }
    }

    /// Rows every view is padded to. transformers derives it (ignoring any `max_num_patches`
    /// key): enough for the largest single view or thumbnail, and for a full tile.
    pub fn max_num_patches(&self) -> usize {
        let thumbnail = self.max_image_tokens * self.downsample_factor * self.downsample_factor;
        let tile = if self.do_image_splitting {
            (self.tile_size / self.encoder_patch_size).pow(2)
        } else {
            0
        };
        thumbnail.max(tile)
    }

    /// Values per patch row of `pixel_values`: patch x patch x RGB.
    pub(crate) fn patch_dim(&self) -> usize {
        self.encoder_patch_size * self.encoder_patch_size * 3
    }
}

/// Typed lookups in one JSON object; `null` counts as absent, like transformers' `None`.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

/// PIL's `Image.Resampling.BILINEAR`, the `resample` value of LFM2-VL's processors.
const BILINEAR: usize = 2;

impl Keys<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn invalid(&self, key: &str, expected: &'static str, found: &Value) -> ConfigError {
        ConfigError::InvalidKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            expected,
            found: found.to_string(),
        }
    }

    fn usize(&self, key: &str, out: &mut usize) -> Result<(), ConfigError> {
        if let Some(v) = self.get(key) {
            *out = v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| self.invalid(key, "a non-negative integer", v))?;
        }
        Ok(())
    }

    fn f64(&self, key: &str, out: &mut f64) -> Result<(), ConfigError> {
        if let Some(v) = self.get(key) {
            *out = v.as_f64().ok_or_else(|| self.invalid(key, "a number", v))?;
        }
        Ok(())
    }

    fn bool(&self, key: &str, out: &mut bool) -> Result<(), ConfigError> {
        if let Some(v) = self.get(key) {
            *out = v
                .as_bool()
                .ok_or_else(|| self.invalid(key, "true or false", v))?;
        }
        Ok(())
    }

    /// A per-channel value: a list of three numbers, or one number for all channels.
    fn triple(&self, key: &str, out: &mut [f64; 3]) -> Result<(), ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(());
        };
        const EXPECTED: &str = "a number or a list of 3 numbers";
        if let Some(x) = v.as_f64() {
            *out = [x; 3];
            return Ok(());
        }
        let items = v.as_array().ok_or_else(|| self.invalid(key, EXPECTED, v))?;
        if items.len() != 3 {
            return Err(self.invalid(key, EXPECTED, v));
        }
        for (slot, item) in out.iter_mut().zip(items) {
            *slot = item
                .as_f64()
                .ok_or_else(|| self.invalid(key, EXPECTED, v))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(json: &str) -> Result<ProcessorConfig, ConfigError> {
        let mut cfg = ProcessorConfig::default();
        let Value::Object(map) = serde_json::from_str(json).map_err(|e| ConfigError::Json {
            path: "t".into(),
            message: e.to_string(),
        })?
        else {
            return Err(ConfigError::Inconsistent("not an object".into()));
        };
        cfg.apply_json(&map, Path::new("t.json"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn null_keys_keep_defaults_and_scalars_broadcast() -> Result<(), ConfigError> {
        let cfg = apply(r#"{"use_thumbnail": null, "image_mean": 0.25, "max_tiles": 4}"#)?;
        assert!(cfg.use_thumbnail);
        assert_eq!(cfg.image_mean, [0.25; 3]);
        assert_eq!(cfg.max_tiles, 4);
        Ok(())
    }

    #[test]
    fn wrong_types_and_inconsistent_values_are_errors() {
        assert!(matches!(
            apply(r#"{"tile_size": "big"}"#),
            Err(ConfigError::InvalidKey { .. })
        ));
        assert!(matches!(
            apply(r#"{"image_std": [1, 2]}"#),
            Err(ConfigError::InvalidKey { .. })
        ));
        assert!(matches!(
            apply(r#"{"min_tiles": 5, "max_tiles": 3}"#),
            Err(ConfigError::Inconsistent(_))
        ));
        assert!(matches!(
            apply(r#"{"encoder_patch_size": 0}"#),
            Err(ConfigError::Inconsistent(_))
        ));
        // Bicubic (3): transformers would resize differently than we do.
        let err = apply(r#"{"resample": 3}"#).unwrap_err();
        assert!(err.to_string().contains("resample"), "{err}");
        assert!(apply(r#"{"resample": 2}"#).is_ok());
    }

    #[test]
    fn model_dir_layouts_merge_with_later_files_winning() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        // 4.55-style flat keys in config.json, 5.x-style nested kwargs in processor_config.json.
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"use_thumbnail": false, "max_tiles": 6}"#,
        )?;
        std::fs::write(
            dir.path().join("preprocessor_config.json"),
            r#"{"image_mean": [0.1, 0.2, 0.3], "do_convert_rgb": null}"#,
        )?;
        std::fs::write(
            dir.path().join("processor_config.json"),
            r#"{"use_image_special_tokens": false, "image_processor": {"max_tiles": 8, "min_image_tokens": 32}}"#,
        )?;
        let cfg = ProcessorConfig::from_model_dir(dir.path())?;
        assert!(!cfg.use_thumbnail && !cfg.use_image_special_tokens);
        assert_eq!((cfg.max_tiles, cfg.min_image_tokens), (8, 32));
        assert_eq!(cfg.image_mean, [0.1, 0.2, 0.3]);
        std::fs::write(dir.path().join("config.json"), "{not json")?;
        assert!(matches!(
            ProcessorConfig::from_model_dir(dir.path()),
            Err(ConfigError::Json { .. })
        ));
        Ok(())
    }

    #[test]
    fn max_num_patches_follows_transformers() -> Result<(), ConfigError> {
        assert_eq!(ProcessorConfig::default().max_num_patches(), 1024);
        let no_split = apply(r#"{"do_image_splitting": false, "max_image_tokens": 128}"#)?;
        assert_eq!(no_split.max_num_patches(), 512);
        assert_eq!(no_split.tile_bounds(), (1, 1));
        Ok(())
    }
}
