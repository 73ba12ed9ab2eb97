//! Antialiased bilinear resize of 8-bit RGB images, bit-identical to torchvision's
//! `F.resize(uint8_tensor, size, antialias=True)` on CPU.
//!
//! transformers' fast LFM2-VL processor resizes uint8 tensors with torchvision, which (on CPUs
//! with AVX2) runs ATen's `_upsample_bilinear2d_aa` uint8 kernel, itself a port of Pillow-SIMD's
//! resampler: a separable triangle filter whose support widens with the downscale factor, with
//! weights computed in f64, normalised, then turned into 16-bit fixed point with the largest
//! precision that fits, and pixel sums computed in i32. The horizontal pass runs first and is
//! rounded to u8 before the vertical pass; a pass whose size does not change is skipped.
//! See `aten/src/ATen/native/cpu/UpSampleKernel.cpp` (`_compute_index_ranges_int16_weights`)
//! and `UpSampleKernelAVXAntialias.h`. Pillow's own resize (PIL) rounds differently, so it is
//! not the reference here.

/// Fixed-point filter taps of one 1-D resampling pass.
struct Taps {
    /// First input index read by each output index.
    start: Vec<usize>,
    /// Weights of each output index; `len` per output, padded with zeros to `stride`.
    weights: Vec<i32>,
    /// Number of taps actually used by each output index.
    len: Vec<usize>,
    /// Weights allotted per output index.
    stride: usize,
    /// Fixed-point fraction bits of `weights`.
    precision: u32,
}

impl Taps {
    /// ATen's `_compute_index_ranges_weights` (antialias=true, align_corners=false) followed
    /// by its int16 conversion, for an `input` -> `output` resize along one axis.
    fn new(input: usize, output: usize) -> Self {
        // torchvision passes a size, not a scale, so the scale is input / output in f64.
        let scale = input as f64 / output as f64;
        // Bilinear's triangle has radius 1; antialiasing stretches it by the downscale factor.
        let support = if scale >= 1.0 { scale } else { 1.0 };
        let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
        let stride = support.ceil() as usize * 2 + 1;

        let mut start = Vec::with_capacity(output);
        let mut len = Vec::with_capacity(output);
        let mut float_weights = vec![0.0f64; output * stride];
        let mut max_weight = 0.0f64;
        for i in 0..output {
            let center = scale * (i as f64 + 0.5);
            // C++ casts truncate toward zero; `as i64` does too.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xend = ((center + support + 0.5) as i64).min(input as i64);
            // Rounding can make the window one wider than `stride`; ATen clamps it.
            let xsize = (xend - xmin).clamp(0, stride as i64) as usize;
            let row = &mut float_weights[i * stride..i * stride + xsize];
            let mut total = 0.0f64;
            for (j, w) in row.iter_mut().enumerate() {
                let x = ((j as i64 + xmin) as f64 - center + 0.5) * invscale;
                *w = triangle(x);
                total += *w;
            }
            if total != 0.0 {
                for w in row.iter_mut() {
                    *w /= total;
                    max_weight = max_weight.max(*w);
                }
            }
            start.push(xmin as usize);
            len.push(xsize);
        }

        // The most fraction bits such that the largest weight still fits in an i16.
        let mut precision = 0u32;
        while precision < 22 {
            let next = (0.5 + max_weight * f64::from(1u32 << (precision + 1))) as i32;
            if next >= 1 << 15 {
                break;
            }
            precision += 1;
        }
        let unit = f64::from(1u32 << precision);
        let weights = float_weights
            .iter()
            .map(|&w| {
                let v = w * unit;
                // Round half away from zero, then narrow to i16 as ATen stores it.
                let rounded = if v < 0.0 {
                    (v - 0.5) as i32
                } else {
                    (v + 0.5) as i32
                };
                i32::from(rounded as i16)
            })
            .collect();
        Self {
            start,
            weights,
            len,
            stride,
            precision,
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let w = &self.weights[i * self.stride..i * self.stride + self.len[i]];
        (self.start[i], w)
    }

    /// Fixed-point sum back to a pixel: round (the bias was added up front), shift, saturate.
    #[inline]
    fn finish(&self, acc: i32) -> u8 {
        (acc >> self.precision).clamp(0, 255) as u8
    }

    fn bias(&self) -> i32 {
        1 << (self.precision.max(1) - 1)
    }
}

/// Pillow's bilinear (triangle) filter.
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// Resizes an interleaved RGB8 buffer of `width` x `height` to `new_width` x `new_height`,
/// exactly like torchvision's antialiased bilinear resize of a uint8 tensor.
///
/// Returns the input unchanged when the size already matches (torchvision does not touch it).
/// Zero-sized inputs or outputs give an empty buffer.
pub fn resize_rgb8(
    src: &[u8],
    width: usize,
    height: usize,
    new_width: usize,
    new_height: usize,
) -> Vec<u8> {
    debug_assert_eq!(src.len(), width * height * 3);
    if width == 0 || height == 0 || new_width == 0 || new_height == 0 {
        return Vec::new();
    }
    if (width, height) == (new_width, new_height) {
        return src.to_vec();
    }
    let horizontal = if new_width != width {
        Some(horizontal_pass(src, width, height, new_width))
    } else {
        None
    };
    let src = horizontal.as_deref().unwrap_or(src);
    if new_height != height {
        vertical_pass(src, new_width, height, new_height)
    } else {
        src.to_vec()
    }
}

/// Resamples every row from `width` to `new_width` pixels.
fn horizontal_pass(src: &[u8], width: usize, height: usize, new_width: usize) -> Vec<u8> {
    let taps = Taps::new(width, new_width);
    let bias = taps.bias();
    let mut out = vec![0u8; new_width * height * 3];
    // Flatten the taps once: (first byte offset, weights) per output pixel, so the per-row
    // loop does plain indexing (debug builds do not inline iterator adapters).
    let plan: Vec<(usize, &[i32])> = (0..new_width)
        .map(|x| {
            let (start, w) = taps.taps(x);
            (start * 3, w)
        })
        .collect();
    for y in 0..height {
        let row_in = &src[y * width * 3..(y + 1) * width * 3];
        let row_out = &mut out[y * new_width * 3..(y + 1) * new_width * 3];
        for (x, &(offset, weights)) in plan.iter().enumerate() {
            let window = &row_in[offset..offset + weights.len() * 3];
            let (mut r, mut g, mut b) = (bias, bias, bias);
            // Wrapping ops: sums of normalised weights times 255 cannot overflow an i32, and
            // this keeps debug builds' overflow checks out of the hottest loop.
            #[allow(clippy::needless_range_loop)] // indexes two arrays at different strides
            for k in 0..weights.len() {
                let w = weights[k];
                r = r.wrapping_add(i32::from(window[3 * k]).wrapping_mul(w));
                g = g.wrapping_add(i32::from(window[3 * k + 1]).wrapping_mul(w));
                b = b.wrapping_add(i32::from(window[3 * k + 2]).wrapping_mul(w));
            }
            row_out[3 * x] = taps.finish(r);
            row_out[3 * x + 1] = taps.finish(g);
            row_out[3 * x + 2] = taps.finish(b);
        }
    }
    out
}

/// Resamples every column from `height` to `new_height` pixels; rows are `width` pixels.
fn vertical_pass(src: &[u8], width: usize, height: usize, new_height: usize) -> Vec<u8> {
    let taps = Taps::new(height, new_height);
    let bias = taps.bias();
    let row_len = width * 3;
    let mut out = vec![0u8; row_len * new_height];
    // One accumulator row, so the inner loop runs over contiguous memory and vectorises.
    let mut acc = vec![0i32; row_len];
    for (y, row_out) in out.chunks_exact_mut(row_len).enumerate() {
        let (start, weights) = taps.taps(y);
        acc.fill(bias);
        for (k, &w) in weights.iter().enumerate() {
            let row_in = &src[(start + k) * row_len..(start + k + 1) * row_len];
            for (a, &p) in acc.iter_mut().zip(row_in) {
                *a = a.wrapping_add(i32::from(p).wrapping_mul(w));
            }
        }
        for (o, &a) in row_out.iter_mut().zip(&acc) {
            *o = taps.finish(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_untouched() {
        let src: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_rgb8(&src, 4, 3, 4, 3), src);
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![200u8; 37 * 23 * 3];
        for (w, h) in [(16, 16), (64, 50), (37, 5), (3, 23), (100, 1)] {
            let out = resize_rgb8(&src, 37, 23, w, h);
            assert_eq!(out.len(), w * h * 3);
            assert!(out.iter().all(|&v| v == 200), "{w}x{h}");
        }
    }

    #[test]
    fn weights_are_normalised_fixed_point() {
        for (input, output) in [(1024, 576), (768, 1024), (7, 3), (3, 7), (1000, 1)] {
            let taps = Taps::new(input, output);
            let unit = 1i32 << taps.precision;
            for i in 0..output {
                let (start, w) = taps.taps(i);
                assert!(start + w.len() <= input);
                let sum: i32 = w.iter().sum();
                // Rounding each tap can move the sum by at most half a unit per tap.
                assert!(
                    (sum - unit).abs() <= w.len() as i32,
                    "{input}->{output} at {i}"
                );
            }
            assert!(taps.weights.iter().all(|&w| w < 1 << 15));
        }
    }

    #[test]
    fn two_to_one_horizontal_averages_pairs() {
        // Downscaling by 2 widens the triangle to radius 2: interior outputs weigh four inputs
        // 1/8, 3/8, 3/8, 1/8; the edges lose a tap and renormalise (3/7, 3/7, 1/7).
        let src: Vec<u8> = (0..8u8).flat_map(|v| [v * 10, v * 10, v * 10]).collect();
        let out = resize_rgb8(&src, 8, 1, 4, 1);
        let reds: Vec<u8> = out.chunks(3).map(|p| p[0]).collect();
        // (0*3 + 10*3 + 20) / 7 = 7.1; (10 + 60 + 90 + 40) / 8 = 25; 45; (50 + 180 + 210) / 7 = 62.9.
        assert_eq!(reds, vec![7, 25, 45, 63]);
    }
}
