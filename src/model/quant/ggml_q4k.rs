//! ggml's Q4_K quantizer (`quantize_row_q4_K_ref`, `ggml-quants.c`), ported so `--quant q4_k`
//! writes the blocks `llama-quantize` writes for the same f32 rows.
//!
//! Written here rather than taken from candle because candle 0.11's `BlockQ4K::from_float` is an
//! older ggml algorithm (`make_qkx1_quants`: unweighted, 5 tries), not today's
//! `make_qkx2_quants` (weights `sqrt(mean x²) + |x|`, a 21-step search of the scale and min);
//! `model_quant::q4_k_blocks_equal_llama_quantize` measured the difference on the 450M shapes
//! (see BENCHMARKS.md for the numbers). Floating-point operations follow the C code in order;
//! `nearest_int` is ggml's round-half-to-even bit trick, not `f32::round`.

use half::f16;

/// Values per super-block.
pub(crate) const QK_K: usize = 256;
/// Bytes per block: `d`, `dmin` (f16 each), 12 bytes of 6-bit scales and mins, 128 of nibbles.
pub(crate) const BLOCK_BYTES: usize = 2 + 2 + 12 + QK_K / 2;

/// ggml's `nearest_int`: round half to even through the float's mantissa (|v| < 2^22).
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// `make_qkx2_quants(32, 15, x, weights, L, &min, Laux, -1, 0.1, 20, false)`: the scale and
/// (negated) min of one 32-value group; `l` gets the levels.
fn make_qkx2_quants(x: &[f32; 32], weights: &[f32; 32], l: &mut [u8; 32]) -> (f32, f32) {
    const NMAX: i32 = 15;
    const RMIN: f32 = -1.0;
    const RDELTA: f32 = 0.1;
    const NSTEP: i32 = 20;
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = NMAX as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=NSTEP {
        iscale = (RMIN + RDELTA * is as f32 + NMAX as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
            laux[i] = q as u8;
            let w = weights[i];
            let q = q as f32;
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                *l = laux;
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `get_scale_min_k4`: group `j`'s 6-bit scale and min from the packed 12 bytes.
fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `quantize_row_q4_K_ref` over `x` (a whole number of 256-value blocks): the blocks' bytes as
/// a GGUF file stores them.
pub(crate) fn quantize_q4_k(x: &[f32]) -> Vec<u8> {
    assert!(
        x.len().is_multiple_of(QK_K),
        "Q4_K rows are whole blocks of {QK_K}"
    );
    let mut out = Vec::with_capacity(x.len() / QK_K * BLOCK_BYTES);
    for x in x.chunks_exact(QK_K) {
        let mut levels = [0u8; QK_K];
        let mut scales = [0f32; QK_K / 32];
        let mut mins = [0f32; QK_K / 32];
        let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
        for j in 0..QK_K / 32 {
            let group: &[f32; 32] = x[32 * j..32 * j + 32].try_into().expect("32 values");
            let mut sum_x2 = 0.0f32;
            for &v in group {
                sum_x2 += v * v;
            }
            let av_x = (sum_x2 / 32.0).sqrt();
            let weights = group.map(|v| av_x + v.abs());
            let mut l = [0u8; 32];
            (scales[j], mins[j]) = make_qkx2_quants(group, &weights, &mut l);
            levels[32 * j..32 * j + 32].copy_from_slice(&l);
            if scales[j] > max_scale {
                max_scale = scales[j];
            }
            if mins[j] > max_min {
                max_min = mins[j];
            }
        }
        let inv_scale = if max_scale > 0.0 {
            63.0 / max_scale
        } else {
            0.0
        };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let mut packed = [0u8; 12];
        for j in 0..QK_K / 32 {
            // C stores `nearest_int` into a uint8_t before MIN: keep its truncation.
            let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
            let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
            if j < 4 {
                packed[j] = ls;
                packed[j + 4] = lm;
            } else {
                packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                packed[j - 4] |= (ls >> 4) << 6;
                packed[j] |= (lm >> 4) << 6;
            }
        }
        let d = f16::from_f32(max_scale / 63.0);
        let dmin = f16::from_f32(max_min / 63.0);
        for j in 0..QK_K / 32 {
            let (sc, m) = get_scale_min_k4(j, &packed);
            let d = d.to_f32() * sc as f32;
            if d == 0.0 {
                continue;
            }
            let dm = dmin.to_f32() * m as f32;
            for ii in 0..32 {
                levels[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / d).clamp(0, 15) as u8;
            }
        }
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&dmin.to_le_bytes());
        out.extend_from_slice(&packed);
        for j in (0..QK_K).step_by(64) {
            for i in 0..32 {
                out.push(levels[j + i] | (levels[j + i + 32] << 4));
            }
        }
    }
    out
}

/// Bytes per Q6_K block: 128 of low nibbles, 64 of high bits, 16 scales, `d` (f16).
pub(crate) const Q6K_BLOCK_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

/// ggml's `GROUP_MAX_EPS`.
const GROUP_MAX_EPS: f32 = 1e-15;

/// `make_qx_quants(16, 32, x, L, 1, NULL)`: the scale of one 16-value group (`rmse_type` 1:
/// weights `x²`); `l` gets the levels offset by 32.
fn make_qx_quants_32(x: &[f32], l: &mut [i8]) -> f32 {
    const NMAX: i32 = 32;
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let mut iscale = -(NMAX as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (i, &v) in x.iter().enumerate() {
        let q = nearest_int(iscale * v).clamp(-NMAX, NMAX - 1);
        l[i] = (q + NMAX) as i8;
        let w = v * v;
        sumlx += w * v * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(NMAX as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let q = nearest_int(iscale * v).clamp(-NMAX, NMAX - 1) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                l[i] = (NMAX + nearest_int(iscale * v).clamp(-NMAX, NMAX - 1)) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `quantize_row_q6_K_ref` over `x` (whole 256-value blocks): the blocks' bytes.
pub(crate) fn quantize_q6_k(x: &[f32]) -> Vec<u8> {
    assert!(
        x.len().is_multiple_of(QK_K),
        "Q6_K rows are whole blocks of {QK_K}"
    );
    let mut out = Vec::with_capacity(x.len() / QK_K * Q6K_BLOCK_BYTES);
    for x in x.chunks_exact(QK_K) {
        let mut levels = [0i8; QK_K];
        let mut scales = [0f32; QK_K / 16];
        let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
        for ib in 0..QK_K / 16 {
            let scale = make_qx_quants_32(
                &x[16 * ib..16 * ib + 16],
                &mut levels[16 * ib..16 * ib + 16],
            );
            scales[ib] = scale;
            if scale.abs() > max_abs_scale {
                max_abs_scale = scale.abs();
                max_scale = scale;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            out.extend(std::iter::repeat_n(0u8, Q6K_BLOCK_BYTES));
            continue;
        }
        let iscale = -128.0f32 / max_scale;
        let d = f16::from_f32(1.0 / iscale);
        let mut block_scales = [0i8; QK_K / 16];
        for ib in 0..QK_K / 16 {
            block_scales[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        }
        for j in 0..QK_K / 16 {
            let d = d.to_f32() * block_scales[j] as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
                levels[16 * j + ii] = (q + 32) as i8;
            }
        }
        let mut ql = [0u8; QK_K / 2];
        let mut qh = [0u8; QK_K / 4];
        let lv = |i: usize| levels[i] as u8;
        for (n, j) in (0..QK_K).step_by(128).enumerate() {
            for l in 0..32 {
                let (q1, q2, q3, q4) = (
                    lv(j + l) & 0xF,
                    lv(j + l + 32) & 0xF,
                    lv(j + l + 64) & 0xF,
                    lv(j + l + 96) & 0xF,
                );
                ql[64 * n + l] = q1 | (q3 << 4);
                ql[64 * n + l + 32] = q2 | (q4 << 4);
                qh[32 * n + l] = (lv(j + l) >> 4)
                    | ((lv(j + l + 32) >> 4) << 2)
                    | ((lv(j + l + 64) >> 4) << 4)
                    | ((lv(j + l + 96) >> 4) << 6);
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(block_scales.iter().map(|&s| s as u8));
        out.extend_from_slice(&d.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even_like_ggml() {
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(7.49), 7);
        assert_eq!(nearest_int(-0.6), -1);
    }

    /// The blocks dequantize (ggml's `dequantize_row_q4_K`, through candle) to within a group's
    /// step of the input, and a constant block is exact.
    #[test]
    fn blocks_dequantize_near_the_input() {
        use candle_core::quantized::{GgmlDType, ggml_file::qtensor_from_ggml};
        use candle_core::{Device, Tensor};
        let x: Vec<f32> = (0..2 * QK_K)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let bytes = quantize_q4_k(&x);
        assert_eq!(bytes.len(), 2 * BLOCK_BYTES);
        let q = qtensor_from_ggml(GgmlDType::Q4K, &bytes, vec![2, QK_K], &Device::Cpu).unwrap();
        let back = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        let back = back.to_vec1::<f32>().unwrap();
        let worst = x
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        // 16 levels over a range of 2: a step of 0.133, half of it at worst plus scale rounding.
        assert!(worst < 0.1, "worst error {worst}");
        let ones = quantize_q4_k(&[0.5; QK_K]);
        let q = qtensor_from_ggml(GgmlDType::Q4K, &ones, vec![QK_K], &Device::Cpu).unwrap();
        let back = q.dequantize(&Device::Cpu).unwrap();
        let want = Tensor::full(0.5f32, QK_K, &Device::Cpu).unwrap();
        let diff = (back - want).unwrap().abs().unwrap().max(0).unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-3);
    }
}
