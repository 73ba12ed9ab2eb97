//! Prompt expansion: each `<image>` placeholder becomes the image's token sequence.
//!
//! Follows transformers 5.x `Lfm2VlProcessor._build_image_tokens`: `<|image_start|>`, then for a
//! tiled image each tile's `<|img_row_R_col_C|>` marker (1-based, rows outer, columns inner)
//! followed by its image tokens, then `<|img_thumbnail|>` and the thumbnail's tokens when there
//! is a thumbnail, then `<|image_end|>`. A single view has no row/col or thumbnail markers.
//! Without `use_image_special_tokens` only the image tokens remain. (4.57 swapped rows and
//! columns for non-square grids and emitted no tokens for a single view without thumbnail.)

use std::path::Path;

use super::image_processor::ProcessedImage;
use super::layout::ImageLayout;
use crate::model::processor::chat::{TemplateError, read_json, token_string};

/// The marker strings, as the tokenizer names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageTokenStrings {
    /// The placeholder repeated once per image token (and written once per image by templates).
    pub image: String,
    pub start: String,
    pub end: String,
    pub thumbnail: String,
}

impl Default for ImageTokenStrings {
    /// transformers' fallbacks when the tokenizer does not name them.
    fn default() -> Self {
        Self {
            image: "<image>".into(),
            start: "<|image_start|>".into(),
            end: "<|image_end|>".into(),
            thumbnail: "<|img_thumbnail|>".into(),
        }
    }
}

impl ImageTokenStrings {
    /// Reads `image_token`, `image_start_token`, `image_end_token` and `image_thumbnail_token`
    /// (or the Hub files' `image_thumbnail`) from `tokenizer_config.json` and
    /// `special_tokens_map.json`, keeping the defaults for absent keys.
    pub fn from_model_dir(dir: &Path) -> Result<Self, TemplateError> {
        let mut out = Self::default();
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let Some(json) = read_json(&dir.join(name))? else {
                continue;
            };
            let get = |key: &str| token_string(json.get(key));
            if let Some(v) = get("image_token") {
                out.image = v;
            }
            if let Some(v) = get("image_start_token") {
                out.start = v;
            }
            if let Some(v) = get("image_end_token") {
                out.end = v;
            }
            if let Some(v) = get("image_thumbnail_token").or_else(|| get("image_thumbnail")) {
                out.thumbnail = v;
            }
        }
        Ok(out)
    }

    /// The marker of tile (`row`, `col`), both 0-based here, 1-based in the string.
    pub(crate) fn tile_marker(row: usize, col: usize) -> String {
        format!("<|img_row_{}_col_{}|>", row + 1, col + 1)
    }
}

/// Why placeholders could not be expanded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExpandError {
    /// The text has a different number of `<image>` placeholders than images were given.
    #[error("the prompt has {placeholders} `{token}` placeholders but {images} images were given")]
    CountMismatch {
        token: String,
        placeholders: usize,
        images: usize,
    },
}

/// The token sequence standing for one processed image.
pub fn image_token_text(
    image: &ProcessedImage,
    strings: &ImageTokenStrings,
    use_special_tokens: bool,
) -> String {
    let mut out = String::new();
    let push_tokens = |out: &mut String, n: usize| {
        out.reserve(n * strings.image.len());
        for _ in 0..n {
            out.push_str(&strings.image);
        }
    };
    if use_special_tokens {
        out.push_str(&strings.start);
    }
    match image.layout {
        ImageLayout::Single { .. } => push_tokens(&mut out, image.num_image_tokens()),
        ImageLayout::Tiled {
            rows,
            cols,
            thumbnail,
            ..
        } => {
            for r in 0..rows {
                for c in 0..cols {
                    if use_special_tokens {
                        out.push_str(&ImageTokenStrings::tile_marker(r, c));
                    }
                    push_tokens(&mut out, image.tokens_per_view[r * cols + c]);
                }
            }
            if thumbnail.is_some() {
                if use_special_tokens {
                    out.push_str(&strings.thumbnail);
                }
                push_tokens(&mut out, image.tokens_per_view[rows * cols]);
            }
        }
    }
    if use_special_tokens {
        out.push_str(&strings.end);
    }
    out
}

/// Replaces the n-th `<image>` placeholder of `text` with the n-th image's token sequence.
pub fn expand_image_placeholders(
    text: &str,
    images: &[ProcessedImage],
    strings: &ImageTokenStrings,
    use_special_tokens: bool,
) -> Result<String, ExpandError> {
    let pieces: Vec<&str> = text.split(strings.image.as_str()).collect();
    let placeholders = pieces.len() - 1;
    if placeholders != images.len() {
        return Err(ExpandError::CountMismatch {
            token: strings.image.clone(),
            placeholders,
            images: images.len(),
        });
    }
    let mut out = String::with_capacity(text.len());
    for (i, piece) in pieces.iter().enumerate() {
        out.push_str(piece);
        if let Some(image) = images.get(i) {
            out.push_str(&image_token_text(image, strings, use_special_tokens));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(layout: ImageLayout, tokens_per_view: Vec<usize>) -> ProcessedImage {
        ProcessedImage {
            pixel_values: Vec::new(),
            pixel_attention_mask: Vec::new(),
            spatial_shapes: vec![(0, 0); tokens_per_view.len()],
            tokens_per_view,
            layout,
            max_num_patches: 0,
            patch_dim: 0,
        }
    }

    #[test]
    fn single_view_has_no_markers() -> Result<(), ExpandError> {
        let img = fake(
            ImageLayout::Single {
                height: 64,
                width: 96,
            },
            vec![6],
        );
        let s = ImageTokenStrings::default();
        let out = expand_image_placeholders("a<image>b", &[img], &s, true)?;
        assert_eq!(
            out,
            format!("a<|image_start|>{}<|image_end|>b", "<image>".repeat(6))
        );
        Ok(())
    }

    #[test]
    fn tile_markers_go_rows_then_cols() -> Result<(), ExpandError> {
        let layout = ImageLayout::Tiled {
            rows: 2,
            cols: 3,
            tile: 512,
            thumbnail: Some((416, 576)),
        };
        let img = fake(layout, vec![2, 2, 2, 2, 2, 2, 3]);
        let s = ImageTokenStrings::default();
        let out = expand_image_placeholders("<image>", std::slice::from_ref(&img), &s, true)?;
        let markers: Vec<&str> = out.split("<image>").filter(|p| !p.is_empty()).collect();
        assert_eq!(
            markers,
            vec![
                "<|image_start|><|img_row_1_col_1|>",
                "<|img_row_1_col_2|>",
                "<|img_row_1_col_3|>",
                "<|img_row_2_col_1|>",
                "<|img_row_2_col_2|>",
                "<|img_row_2_col_3|>",
                "<|img_thumbnail|>",
                "<|image_end|>"
            ]
        );
        assert_eq!(out.matches("<image>").count(), 15);
        // Without special tokens only the image tokens remain.
        let plain = expand_image_placeholders("<image>", &[img], &s, false)?;
        assert_eq!(plain, "<image>".repeat(15));
        Ok(())
    }

    #[test]
    fn placeholder_count_must_match() {
        let s = ImageTokenStrings::default();
        assert_eq!(
            expand_image_placeholders("<image><image>", &[], &s, true),
            Err(ExpandError::CountMismatch {
                token: "<image>".into(),
                placeholders: 2,
                images: 0
            })
        );
    }
}
