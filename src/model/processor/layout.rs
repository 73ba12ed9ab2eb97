//! Geometry: how one image becomes views (a single resized view, or tiles plus a thumbnail).
//!
//! Mirrors transformers' `Lfm2VlImageProcessorFast.resize_and_split`: an image whose
//! 32-rounded area exceeds `max_image_tokens` x tolerance is resized to a grid of tiles
//! chosen by aspect ratio; otherwise it is "smart resized" to multiples of 32 whose token count
//! lies within `[min_image_tokens, max_image_tokens]`. Rounding follows Python exactly (`round`
//! is half to even, `math.floor`/`ceil` on f64), since one pixel of difference changes the
//! token count.

use super::config::ProcessorConfig;

/// How an image is cut into views, in processor order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageLayout {
    /// One view, the whole image resized to `height` x `width` pixels.
    Single { height: usize, width: usize },
    /// `rows` x `cols` square tiles of `tile` pixels (row-major), then optionally a thumbnail:
    /// the whole image resized to `thumbnail` = (height, width).
    Tiled {
        rows: usize,
        cols: usize,
        tile: usize,
        thumbnail: Option<(usize, usize)>,
    },
}

impl ImageLayout {
    /// Number of views the vision tower sees.
    pub(crate) fn num_views(&self) -> usize {
        match *self {
            ImageLayout::Single { .. } => 1,
            ImageLayout::Tiled {
                rows,
                cols,
                thumbnail,
                ..
            } => rows * cols + usize::from(thumbnail.is_some()),
        }
    }

    /// Pixel size (height, width) of each view, in order.
    pub fn view_sizes(&self) -> Vec<(usize, usize)> {
        match *self {
            ImageLayout::Single { height, width } => vec![(height, width)],
            ImageLayout::Tiled {
                rows,
                cols,
                tile,
                thumbnail,
            } => {
                let mut sizes = vec![(tile, tile); rows * cols];
                sizes.extend(thumbnail);
                sizes
            }
        }
    }
}

/// Python's `round(x)`: nearest integer, ties to even (12.5 -> 12).
fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// transformers' `round_by_factor`: the multiple of `factor` nearest to `number`.
fn round_by_factor(number: usize, factor: usize) -> usize {
    py_round(number as f64 / factor as f64) as usize * factor
}

/// Smart resize: the (height, width), multiples of `patch x downsample`, closest to the
/// image's aspect ratio with a token count in `[min_image_tokens, max_image_tokens]`.
pub fn smart_resize(cfg: &ProcessorConfig, height: usize, width: usize) -> (usize, usize) {
    let factor = cfg.total_factor();
    let per_token = (factor * factor) as f64;
    let min_pixels = cfg.min_image_tokens as f64 * per_token;
    let max_pixels = cfg.max_image_tokens as f64 * per_token;
    let (h, w, f) = (height as f64, width as f64, factor as f64);

    let mut h_bar = factor.max(round_by_factor(height, factor));
    let mut w_bar = factor.max(round_by_factor(width, factor));
    let area = (h_bar * w_bar) as f64;
    if area > max_pixels {
        let beta = ((h * w) / max_pixels).sqrt();
        h_bar = factor.max(((h / beta / f).floor() as usize) * factor);
        w_bar = factor.max(((w / beta / f).floor() as usize) * factor);
    } else if area < min_pixels {
        let beta = (min_pixels / (h * w)).sqrt();
        h_bar = ((h * beta / f).ceil() as usize) * factor;
        w_bar = ((w * beta / f).ceil() as usize) * factor;
    }
    cap_extreme_aspect(cfg, h_bar, w_bar)
}

/// Images thinner than about 1:256 still exceed `max_num_patches` after smart resize (the
/// short side cannot go below one token). transformers then fails when padding; we instead
/// shorten the long side to the largest multiple of the token size that fits.
fn cap_extreme_aspect(cfg: &ProcessorConfig, h_bar: usize, w_bar: usize) -> (usize, usize) {
    let factor = cfg.total_factor();
    let patch = cfg.encoder_patch_size;
    let max_patches = cfg.max_num_patches();
    if (h_bar / patch) * (w_bar / patch) <= max_patches {
        return (h_bar, w_bar);
    }
    let max_pixels = max_patches * patch * patch;
    let fit = |short: usize| factor.max(max_pixels / short / factor * factor);
    if h_bar <= w_bar {
        (h_bar, fit(h_bar))
    } else {
        (fit(w_bar), w_bar)
    }
}

/// transformers' `_is_image_too_large`. Note the floor is one *patch* (16), not one token (32),
/// unlike smart resize; it matters for images under 16 pixels on a side.
pub fn is_too_large(cfg: &ProcessorConfig, height: usize, width: usize) -> bool {
    let factor = cfg.total_factor();
    let patch = cfg.encoder_patch_size;
    let h_bar = patch.max(round_by_factor(height, factor));
    let w_bar = patch.max(round_by_factor(width, factor));
    let limit =
        (cfg.max_image_tokens * patch * patch * cfg.downsample_factor * cfg.downsample_factor)
            as f64
            * cfg.max_pixels_tolerance;
    (h_bar * w_bar) as f64 > limit
}

/// Candidate grids (cols, rows) with `min_tiles <= cols*rows <= max_tiles`, by tile count.
///
/// transformers sorts a Python `set` by area, so grids of equal area come in hash order; they
/// could only matter on an exact floating-point tie between two of them, which (checked for the
/// default 2..=10) never survives a closer candidate. We order equal areas by (cols, rows).
fn target_grids(min_tiles: usize, max_tiles: usize) -> Vec<(usize, usize)> {
    let mut grids: Vec<(usize, usize)> = (1..=max_tiles)
        .flat_map(|c| (1..=max_tiles).map(move |r| (c, r)))
        .filter(|&(c, r)| (min_tiles..=max_tiles).contains(&(c * r)))
        .collect();
    grids.sort_by_key(|&(c, r)| (c * r, c, r));
    grids
}

/// transformers' `find_closest_aspect_ratio`: the grid (cols, rows) whose aspect ratio is
/// closest to the image's; on an exact tie a later (larger) grid wins when the image covers
/// more than half of that grid's pixels.
pub fn choose_grid(
    min_tiles: usize,
    max_tiles: usize,
    tile: usize,
    height: usize,
    width: usize,
) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let area = (width * height) as f64;
    let mut best = (1, 1);
    let mut best_diff = f64::INFINITY;
    for (c, r) in target_grids(min_tiles, max_tiles) {
        let diff = (aspect - c as f64 / r as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (c, r);
        } else if diff == best_diff && area > 0.5 * (tile * tile * c * r) as f64 {
            best = (c, r);
        }
    }
    best
}

/// The layout of an image of `height` x `width` pixels (both non-zero).
pub fn plan_layout(cfg: &ProcessorConfig, height: usize, width: usize) -> ImageLayout {
    let (min_tiles, max_tiles) = cfg.tile_bounds();
    let splitting = !(min_tiles == 1 && max_tiles == 1);
    let (new_h, new_w) = smart_resize(cfg, height, width);
    if !(splitting && is_too_large(cfg, height, width)) {
        return ImageLayout::Single {
            height: new_h,
            width: new_w,
        };
    }
    let (cols, rows) = choose_grid(min_tiles, max_tiles, cfg.tile_size, height, width);
    // transformers adds no thumbnail to a 1x1 grid (only reachable with `min_tiles` = 1).
    let thumbnail = (cfg.use_thumbnail && cols * rows != 1).then_some((new_h, new_w));
    ImageLayout::Tiled {
        rows,
        cols,
        tile: cfg.tile_size,
        thumbnail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ProcessorConfig {
        ProcessorConfig::default()
    }

    #[test]
    fn smart_resize_rounds_half_to_even() {
        // 400 / 32 = 12.5 -> 12 -> 384 (half-up would give 416 and more tokens).
        assert_eq!(smart_resize(&cfg(), 400, 512), (384, 512));
        // 432 / 32 = 13.5 -> 14 -> 448.
        assert_eq!(smart_resize(&cfg(), 432, 448), (448, 448));
        assert_eq!(smart_resize(&cfg(), 384, 512), (384, 512));
    }

    #[test]
    fn smart_resize_respects_token_bounds() {
        // Too many tokens: scaled down with floor.
        let (h, w) = smart_resize(&cfg(), 768, 1024);
        assert_eq!((h, w), (416, 576));
        assert!(h * w <= 256 * 1024);
        // Too few: scaled up with ceil; a 1x1 image becomes 256x256 (64 tokens).
        assert_eq!(smart_resize(&cfg(), 1, 1), (256, 256));
        let (h, w) = smart_resize(&cfg(), 100, 60);
        assert!(h * w >= 64 * 1024 && h % 32 == 0 && w % 32 == 0);
    }

    #[test]
    fn extreme_aspect_fits_max_patches() {
        let c = cfg();
        for (h, w) in [(20, 5000), (20, 20000), (30000, 3), (1, 100_000)] {
            let (nh, nw) = smart_resize(&c, h, w);
            assert!(
                (nh / 16) * (nw / 16) <= c.max_num_patches(),
                "{h}x{w} -> {nh}x{nw}"
            );
            assert!(nh % 32 == 0 && nw % 32 == 0 && nh >= 32 && nw >= 32);
        }
        assert_eq!(smart_resize(&c, 20, 5000), (32, 4992));
    }

    #[test]
    fn tiling_threshold() {
        let c = cfg();
        // Limit: 256 tokens x 1024 px x tolerance 2 = 524288 pixels after rounding to 32.
        assert!(!is_too_large(&c, 512, 1024)); // exactly 524288: not above
        // 1040 / 32 = 32.5 rounds (half to even) to 32, so this is still 524288.
        assert!(!is_too_large(&c, 512, 1040));
        assert!(is_too_large(&c, 512, 1056));
        assert!(is_too_large(&c, 544, 1024));
        assert!(!is_too_large(&c, 512, 512));
        assert!(is_too_large(&c, 768, 1024));
    }

    #[test]
    fn grid_choice_for_non_square_images() {
        // 1024 wide x 768 high: 3 cols x 2 rows (1.5 is the closest ratio to 1.33).
        assert_eq!(choose_grid(2, 10, 512, 768, 1024), (3, 2));
        // Square: 2x2 beats 1x1 (excluded) and, on a tie with 3x3, only large images take 3x3.
        assert_eq!(choose_grid(2, 10, 512, 1024, 1024), (2, 2));
        assert_eq!(choose_grid(2, 10, 512, 2000, 2000), (3, 3));
        // Tall 1:2: 1 col x 2 rows, or the equal-ratio 2x4 once the image exceeds half of it.
        assert_eq!(choose_grid(2, 10, 512, 1024, 512), (1, 2));
        assert_eq!(choose_grid(2, 10, 512, 2048, 1024), (2, 4));
        // 1.25 ties 2x2, 3x2 and 3x3 exactly; each tie goes to the larger grid here.
        assert_eq!(choose_grid(2, 10, 512, 1024, 1280), (3, 3));
        assert_eq!(choose_grid(2, 10, 512, 600, 2000), (3, 1));
    }

    #[test]
    fn layouts() {
        let c = cfg();
        assert_eq!(
            plan_layout(&c, 512, 512),
            ImageLayout::Single {
                height: 512,
                width: 512
            }
        );
        let tiled = plan_layout(&c, 768, 1024);
        assert_eq!(
            tiled,
            ImageLayout::Tiled {
                rows: 2,
                cols: 3,
                tile: 512,
                thumbnail: Some((416, 576))
            }
        );
        assert_eq!(tiled.num_views(), 7);
        let no_thumb = ProcessorConfig {
            use_thumbnail: false,
            ..cfg()
        };
        assert_eq!(plan_layout(&no_thumb, 768, 1024).num_views(), 6);
        let no_split = ProcessorConfig {
            do_image_splitting: false,
            ..cfg()
        };
        assert_eq!(
            plan_layout(&no_split, 768, 1024),
            ImageLayout::Single {
                height: 416,
                width: 576
            }
        );
    }
}
