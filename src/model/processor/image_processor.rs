//! `Lfm2VlImageProcessorFast` in Rust: views, resize, normalise, patchify, pad.
//!
//! One RGB image becomes `views` rows of `max_num_patches` patches each, every patch flattened
//! in (row within patch, column within patch, channel) order, matching transformers'
//! `convert_image_to_patches`. Views are padded with zero patches to `max_num_patches`;
//! `pixel_attention_mask` marks the real ones and `spatial_shapes` gives each view's patch grid.

use candle_core::{Device, Tensor};
use image::RgbImage;

use super::config::{ConfigError, ProcessorConfig};
use super::layout::{ImageLayout, plan_layout};
use super::resize::resize_rgb8;

/// The model inputs for one image, plus how it was laid out.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// `[views, max_num_patches, patch_dim]`, row-major, normalised.
    pub pixel_values: Vec<f32>,
    /// `[views, max_num_patches]`: 1 for a real patch, 0 for padding.
    pub pixel_attention_mask: Vec<u8>,
    /// Patch grid (rows, cols) of each view.
    pub spatial_shapes: Vec<(usize, usize)>,
    /// Image tokens each view contributes after pixel unshuffle, in view order.
    pub tokens_per_view: Vec<usize>,
    /// Tiles and thumbnail, or single view.
    pub layout: ImageLayout,
    /// Rows per view in `pixel_values` and `pixel_attention_mask`.
    pub max_num_patches: usize,
    /// Values per patch: patch x patch x 3.
    pub patch_dim: usize,
}

/// [`ProcessedImage`] as candle tensors.
#[derive(Debug, Clone)]
pub struct ImageTensors {
    /// f32 `[views, max_num_patches, patch_dim]`.
    pub pixel_values: Tensor,
    /// u8 `[views, max_num_patches]`, 1 = real patch.
    pub pixel_attention_mask: Tensor,
    /// u32 `[views, 2]`: patch rows, patch cols.
    pub spatial_shapes: Tensor,
}

impl ProcessedImage {
    /// Number of views (tiles + thumbnail, or 1).
    pub fn num_views(&self) -> usize {
        self.spatial_shapes.len()
    }

    /// Image tokens this image contributes to the prompt.
    pub fn num_image_tokens(&self) -> usize {
        self.tokens_per_view.iter().sum()
    }

    /// Builds the tensors for this image alone.
    pub fn to_tensors(&self, device: &Device) -> candle_core::Result<ImageTensors> {
        stack_images(std::slice::from_ref(self), device)
    }
}

/// Concatenates the views of several images (processor order) into one set of tensors, as
/// transformers does for a batch. All images must share `max_num_patches` and `patch_dim`.
pub fn stack_images(
    images: &[ProcessedImage],
    device: &Device,
) -> candle_core::Result<ImageTensors> {
    let Some(first) = images.first() else {
        candle_core::bail!("stack_images: no images");
    };
    let (max_patches, patch_dim) = (first.max_num_patches, first.patch_dim);
    if images
        .iter()
        .any(|im| im.max_num_patches != max_patches || im.patch_dim != patch_dim)
    {
        candle_core::bail!("stack_images: images were processed with different settings");
    }
    let views: usize = images.iter().map(ProcessedImage::num_views).sum();
    let mut values = Vec::with_capacity(views * max_patches * patch_dim);
    let mut mask = Vec::with_capacity(views * max_patches);
    let mut shapes = Vec::with_capacity(views * 2);
    for im in images {
        values.extend_from_slice(&im.pixel_values);
        mask.extend_from_slice(&im.pixel_attention_mask);
        shapes.extend(
            im.spatial_shapes
                .iter()
                .flat_map(|&(r, c)| [r as u32, c as u32]),
        );
    }
    Ok(ImageTensors {
        pixel_values: Tensor::from_vec(values, (views, max_patches, patch_dim), device)?,
        pixel_attention_mask: Tensor::from_vec(mask, (views, max_patches), device)?,
        spatial_shapes: Tensor::from_vec(shapes, (views, 2), device)?,
    })
}

/// Why an image could not be processed (decoding errors are reported before this step).
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The image has no pixels.
    #[error("image has zero width or height ({width}x{height})")]
    ZeroSize { width: u32, height: u32 },
}

/// Turns RGB images into LFM2-VL vision inputs.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    config: ProcessorConfig,
    /// `value_lut[c][v]`: the normalised value of channel `c` at byte `v`.
    value_lut: [[f32; 256]; 3],
}

impl ImageProcessor {
    /// Validates the settings and precomputes the byte -> value table.
    pub fn new(config: ProcessorConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let value_lut = value_table(&config);
        Ok(Self { config, value_lut })
    }

    /// The settings in use.
    pub fn config(&self) -> &ProcessorConfig {
        &self.config
    }

    /// How an image of this size will be split, without touching pixels.
    pub fn layout(&self, height: usize, width: usize) -> ImageLayout {
        plan_layout(&self.config, height, width)
    }

    /// Image tokens one view of `height` x `width` pixels yields: transformers'
    /// `ceil((side // patch) / downsample)` per side.
    pub(crate) fn view_tokens(&self, height: usize, width: usize) -> usize {
        let p = self.config.encoder_patch_size;
        let d = self.config.downsample_factor;
        (height / p).div_ceil(d) * (width / p).div_ceil(d)
    }

    /// Resizes, tiles, normalises and patchifies one image.
    pub fn process(&self, image: &RgbImage) -> Result<ProcessedImage, ProcessError> {
        let layout = self.layout_of(image)?;
        let mut out = self.empty_output(layout, &layout.view_sizes());
        self.for_each_view(image, layout, |view, src, stride, origin, size| {
            self.write_view(&mut out, view, src, stride, origin, size);
        });
        Ok(out)
    }

    /// The resized 8-bit views in processor order (tiles row-major, then the thumbnail): the
    /// pixels [`Self::process`] normalises and patchifies. transformers' output is fully
    /// determined by these bytes, so parity tests and debugging compare them directly.
    pub fn views(&self, image: &RgbImage) -> Result<Vec<RgbImage>, ProcessError> {
        let layout = self.layout_of(image)?;
        let mut views = Vec::with_capacity(layout.num_views());
        self.for_each_view(image, layout, |_, src, stride, (y0, x0), (h, w)| {
            let mut raw = Vec::with_capacity(h * w * 3);
            for y in y0..y0 + h {
                raw.extend_from_slice(&src[(y * stride + x0) * 3..(y * stride + x0 + w) * 3]);
            }
            // The window lies inside `src` by construction, so the length always matches.
            if let Some(view) = RgbImage::from_raw(w as u32, h as u32, raw) {
                views.push(view);
            }
        });
        Ok(views)
    }

    fn layout_of(&self, image: &RgbImage) -> Result<ImageLayout, ProcessError> {
        let (width, height) = (image.width() as usize, image.height() as usize);
        if width == 0 || height == 0 {
            return Err(ProcessError::ZeroSize {
                width: image.width(),
                height: image.height(),
            });
        }
        Ok(self.layout(height, width))
    }

    /// Resizes `image` per `layout` and calls `f(view, buffer, stride, origin, size)` for each
    /// view in processor order, where the view is the `size` = (h, w) window at `origin` =
    /// (y, x) of an RGB8 `buffer` with rows of `stride` pixels.
    fn for_each_view(
        &self,
        image: &RgbImage,
        layout: ImageLayout,
        mut f: impl FnMut(usize, &[u8], usize, (usize, usize), (usize, usize)),
    ) {
        let (width, height) = (image.width() as usize, image.height() as usize);
        let src = image.as_raw();
        match layout {
            ImageLayout::Single {
                height: h,
                width: w,
            } => {
                let resized = resize_rgb8(src, width, height, w, h);
                f(0, &resized, w, (0, 0), (h, w));
            }
            ImageLayout::Tiled {
                rows,
                cols,
                tile,
                thumbnail,
            } => {
                // Resize once to the whole grid, then read each tile in place (row-major, as
                // torch's `unfold` over height then width orders them).
                let (grid_w, grid_h) = (cols * tile, rows * tile);
                let grid = resize_rgb8(src, width, height, grid_w, grid_h);
                for r in 0..rows {
                    for c in 0..cols {
                        f(
                            r * cols + c,
                            &grid,
                            grid_w,
                            (r * tile, c * tile),
                            (tile, tile),
                        );
                    }
                }
                if let Some((th, tw)) = thumbnail {
                    let thumb = resize_rgb8(src, width, height, tw, th);
                    f(rows * cols, &thumb, tw, (0, 0), (th, tw));
                }
            }
        }
    }

    /// Zero-filled buffers sized for `views`, with shapes, masks and token counts filled in.
    fn empty_output(&self, layout: ImageLayout, views: &[(usize, usize)]) -> ProcessedImage {
        let max_patches = self.config.max_num_patches();
        let patch_dim = self.config.patch_dim();
        let p = self.config.encoder_patch_size;
        let mut mask = vec![0u8; views.len() * max_patches];
        let mut spatial_shapes = Vec::with_capacity(views.len());
        let mut tokens_per_view = Vec::with_capacity(views.len());
        for (v, &(h, w)) in views.iter().enumerate() {
            let (rows, cols) = (h / p, w / p);
            // Layout guarantees every view fits; `min` keeps a bad invariant from panicking.
            let real = (rows * cols).min(max_patches);
            mask[v * max_patches..v * max_patches + real].fill(1);
            spatial_shapes.push((rows, cols));
            tokens_per_view.push(self.view_tokens(h, w));
        }
        ProcessedImage {
            pixel_values: vec![0.0; views.len() * max_patches * patch_dim],
            pixel_attention_mask: mask,
            spatial_shapes,
            tokens_per_view,
            layout,
            max_num_patches: max_patches,
            patch_dim,
        }
    }

    /// Normalises and patchifies the `size` = (h, w) window at `origin` = (y, x) of an RGB8
    /// buffer with rows of `stride` pixels into view `view` of `out`.
    fn write_view(
        &self,
        out: &mut ProcessedImage,
        view: usize,
        src: &[u8],
        stride: usize,
        origin: (usize, usize),
        size: (usize, usize),
    ) {
        let p = self.config.encoder_patch_size;
        let (rows, cols) = (size.0 / p, size.1 / p);
        let max_patches = out.max_num_patches;
        let patch_dim = out.patch_dim;
        let base = view * max_patches * patch_dim;
        let [lut_r, lut_g, lut_b] = &self.value_lut;
        for pr in 0..rows {
            for pc in 0..cols {
                let patch_index = pr * cols + pc;
                if patch_index >= max_patches {
                    return;
                }
                let dst = &mut out.pixel_values
                    [base + patch_index * patch_dim..base + (patch_index + 1) * patch_dim];
                for y in 0..p {
                    let sy = origin.0 + pr * p + y;
                    let sx = origin.1 + pc * p;
                    let line = &src[(sy * stride + sx) * 3..(sy * stride + sx + p) * 3];
                    let dst_line = &mut dst[y * p * 3..(y + 1) * p * 3];
                    for (d, s) in dst_line.chunks_exact_mut(3).zip(line.chunks_exact(3)) {
                        d[0] = lut_r[usize::from(s[0])];
                        d[1] = lut_g[usize::from(s[1])];
                        d[2] = lut_b[usize::from(s[2])];
                    }
                }
            }
        }
    }
}

/// The f32 value of every byte per channel, computed the way transformers' fast processor does:
/// rescale and normalise are fused into `(x - mean/rescale) / (std/rescale)` on f32 tensors,
/// where `mean/rescale` is an f32 tensor times the f64 scalar `1/rescale` (cast to f32).
fn value_table(cfg: &ProcessorConfig) -> [[f32; 256]; 3] {
    let mut lut = [[0.0f32; 256]; 3];
    let inv_rescale = (1.0 / cfg.rescale_factor) as f32;
    for (c, table) in lut.iter_mut().enumerate() {
        let (mean, std) = (cfg.image_mean[c] as f32, cfg.image_std[c] as f32);
        let (mean, std) = if cfg.do_rescale && cfg.do_normalize {
            (mean * inv_rescale, std * inv_rescale)
        } else {
            (mean, std)
        };
        for (v, slot) in table.iter_mut().enumerate() {
            let x = v as f32;
            *slot = match (cfg.do_rescale, cfg.do_normalize) {
                (_, true) => (x - mean) / std,
                (true, false) => x * cfg.rescale_factor as f32,
                (false, false) => x,
            };
        }
    }
    lut
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn processor(cfg: ProcessorConfig) -> ImageProcessor {
        ImageProcessor::new(cfg).unwrap_or_else(|e| panic!("valid config: {e}"))
    }

    #[test]
    fn normalisation_maps_bytes_to_minus_one_one() {
        let lut = value_table(&ProcessorConfig::default());
        assert_eq!(lut[0][0], -1.0);
        assert_eq!(lut[1][255], 1.0);
        assert_eq!(lut[2][128], (128.0f32 - 127.5) / 127.5);
    }

    #[test]
    fn no_resize_at_target_and_patch_order() -> Result<(), ProcessError> {
        // 512x384 is already a multiple of 32 within the token bounds: no resize happens, so
        // every pixel lands unchanged at its patch position.
        let img = RgbImage::from_fn(512, 384, |x, y| {
            Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 7) as u8])
        });
        let proc = processor(ProcessorConfig::default());
        let out = proc.process(&img)?;
        assert_eq!(
            out.layout,
            ImageLayout::Single {
                height: 384,
                width: 512
            }
        );
        assert_eq!(out.spatial_shapes, vec![(24, 32)]);
        assert_eq!(out.num_image_tokens(), 192);
        let real: usize = out
            .pixel_attention_mask
            .iter()
            .map(|&m| usize::from(m))
            .sum();
        assert_eq!(real, 24 * 32);
        let lut = value_table(proc.config());
        // Patch (row 2, col 5), pixel (y 3, x 7), channel 1 = source pixel (x 87, y 35).
        let idx = (2 * 32 + 5) * 768 + (3 * 16 + 7) * 3 + 1;
        assert_eq!(out.pixel_values[idx], lut[1][35]);
        // Padding rows are zero.
        assert!(out.pixel_values[24 * 32 * 768..].iter().all(|&v| v == 0.0));
        Ok(())
    }

    #[test]
    fn tiles_are_row_major_crops() -> Result<(), ProcessError> {
        // A 1024x1024 image is tiled 2x2 at 512 without resize (grid size equals image size).
        let img = RgbImage::from_fn(1024, 1024, |x, y| {
            Rgb([(x / 512) as u8 * 100, (y / 512) as u8 * 100, 0])
        });
        let proc = processor(ProcessorConfig::default());
        let out = proc.process(&img)?;
        assert_eq!(out.num_views(), 5);
        let lut = value_table(proc.config());
        let first = |view: usize| &out.pixel_values[view * 1024 * 768..view * 1024 * 768 + 3];
        assert_eq!(first(0), &[lut[0][0], lut[1][0], lut[2][0]]);
        assert_eq!(first(1), &[lut[0][100], lut[1][0], lut[2][0]]);
        assert_eq!(first(2), &[lut[0][0], lut[1][100], lut[2][0]]);
        assert_eq!(out.tokens_per_view, vec![256, 256, 256, 256, 256]);
        Ok(())
    }

    #[test]
    fn views_are_the_pixels_process_patchifies() -> Result<(), ProcessError> {
        // 1024x1024 tiles 2x2 at 512 without resize: view 1 is the top-right crop.
        let img = RgbImage::from_fn(1024, 1024, |x, y| {
            Rgb([(x % 251) as u8, (y % 241) as u8, ((x * y) % 7) as u8])
        });
        let proc = processor(ProcessorConfig::default());
        let views = proc.views(&img)?;
        assert_eq!(views.len(), 5);
        assert_eq!(views[1].dimensions(), (512, 512));
        assert_eq!(views[1].get_pixel(3, 5), img.get_pixel(512 + 3, 5));
        assert_eq!(views[4].dimensions(), (512, 512));
        let out = proc.process(&img)?;
        let lut = value_table(proc.config());
        // Thumbnail view, patch 0, pixel (0, 0).
        let thumb = &out.pixel_values[4 * 1024 * 768..4 * 1024 * 768 + 3];
        let p = views[4].get_pixel(0, 0).0;
        assert_eq!(
            thumb,
            &[
                lut[0][usize::from(p[0])],
                lut[1][usize::from(p[1])],
                lut[2][usize::from(p[2])]
            ]
        );
        Ok(())
    }

    #[test]
    fn tensors_have_reference_shapes() -> Result<(), Box<dyn std::error::Error>> {
        let img = RgbImage::from_pixel(100, 30, Rgb([1, 2, 3]));
        let out = processor(ProcessorConfig::default()).process(&img)?;
        let t = out.to_tensors(&Device::Cpu)?;
        assert_eq!(t.pixel_values.dims(), &[1, 1024, 768]);
        assert_eq!(t.pixel_attention_mask.dims(), &[1, 1024]);
        assert_eq!(
            t.spatial_shapes.to_vec2::<u32>()?,
            vec![vec![
                out.spatial_shapes[0].0 as u32,
                out.spatial_shapes[0].1 as u32
            ]]
        );
        Ok(())
    }
}
