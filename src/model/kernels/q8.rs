//! Products by Q8_0 weights in integer arithmetic: activations quantized to Q8_0 blocks, 32-wide
//! `i8` block dots, one f32 scale per block pair, as ggml multiplies `Q8_0 x Q8_0`.
//!
//! Why our own kernel and not candle's `QMatMul` (`candle-core` 0.11's `k_quants::matmul`):
//! that loop calls one non-inlined block dot per (row, output) pair, converting both f16 scales
//! through `half`'s runtime-dispatched calls on every block and reloading the activation for
//! each output; a decode step ran at about 40% of the weights' memory-bandwidth floor on 2 AVX2
//! cores, and many rows (prefill, the vision tower) ran 2-4x slower than the f32 GEMM
//! (BENCHMARKS.md, "Quantized models"). Here a register tile of activation rows x weight rows
//! shares every block load: a one-row product (decode) streams the weights once, four rows at
//! a time, and many rows reuse each weight block across four activation rows, as llamafile's
//! `tinyBLAS_Q0_AVX` does (`llamafile/sgemm.cpp`).
//!
//! The arithmetic is ggml's AVX2 `ggml_vec_dot_q8_0_q8_0` (and candle's `vec_dot_q8_0_q8_0`)
//! exactly: per block pair, `maddubs(|w|, sign(a, w))` then `madd` with ones gives eight `i32`
//! partial sums of four products each, converted to f32 and added into eight f32 lanes with
//! one FMA by `d_w * d_a`; the lanes are summed pairwise at the end as `hsum_float_8` does. So
//! every output is bitwise what `QMatMul` computes for the same blocks, whatever the tile.
//! The same arithmetic in scalar code is the fallback where AVX2, FMA or F16C are missing, and
//! the tests' reference. Activations are quantized as candle's
//! `BlockQ8_0::from_float` does ([`quantize_rows`]).

use rayon::prelude::*;

/// Values per Q8_0 block.
pub(crate) const QK8_0: usize = 32;

/// One ggml `block_q8_0`: an f16 scale (little-endian bytes) and 32 signed quants; value `i`
/// is `d * qs[i]`. The layout of candle's `BlockQ8_0` and of a GGUF file's Q8_0 tensor; bytes
/// only, so any byte buffer views as blocks whatever its alignment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockQ8_0 {
    pub(crate) d: [u8; 2],
    pub(crate) qs: [i8; QK8_0],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// Views ggml Q8_0 bytes (as candle stores them) as blocks; `None` when they are not whole
/// blocks.
pub(crate) fn view_blocks(bytes: &[u8]) -> Option<&[BlockQ8_0]> {
    let size = std::mem::size_of::<BlockQ8_0>();
    if !bytes.len().is_multiple_of(size) {
        return None;
    }
    // SAFETY: the length is whole blocks; a block is `repr(C)` bytes (alignment 1), valid for
    // any bits.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / size) })
}

/// `x [m, k]` (row-major, `k` a multiple of 32) quantized row by row into `m * k / 32` blocks,
/// bit for bit as candle's `BlockQ8_0::from_float` (ggml's `quantize_row_q8_0_ref`, rounding
/// half away from zero): `d = amax / 127` stored as f16, `q = round(x / d)` using `1 / d`.
pub(crate) fn quantize_rows(x: &[f32], k: usize) -> Vec<BlockQ8_0> {
    assert!(
        k.is_multiple_of(QK8_0) && x.len().is_multiple_of(k.max(1)),
        "quantize_rows: rows of {k} are not whole blocks"
    );
    let zero = BlockQ8_0 {
        d: [0; 2],
        qs: [0; QK8_0],
    };
    let mut out = vec![zero; x.len() / QK8_0];
    // Blocks are independent; 1024 a task keeps rayon's overhead small for one decode row.
    out.par_chunks_mut(1024)
        .zip(x.par_chunks(1024 * QK8_0))
        .for_each(|(o, x)| quantize_blocks(x, o));
    out
}

fn quantize_blocks(x: &[f32], out: &mut [BlockQ8_0]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { quantize_blocks_avx2(x, out) };
    }
    quantize_blocks_scalar(x, out);
}

/// The scalar loop compiled for AVX2, which LLVM vectorises (its `round` lowering is exact).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_blocks_avx2(x: &[f32], out: &mut [BlockQ8_0]) {
    quantize_blocks_scalar(x, out);
}

#[inline(always)]
fn quantize_blocks_scalar(x: &[f32], out: &mut [BlockQ8_0]) {
    for (block, x) in out.iter_mut().zip(x.chunks_exact(QK8_0)) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = half::f16::from_f32(d).to_le_bytes();
        for (q, &v) in block.qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
    }
}

/// `y [m, n] = a [m, k] . w [n, k]^T` for Q8_0 weight rows `w` (`n * k / 32` blocks) and
/// quantized activation rows `a` ([`quantize_rows`], `m * k / 32` blocks): `m * n` floats,
/// row-major. Parallel over output columns; AVX2 where the CPU has it, else
/// scalar code with the same arithmetic (the same values).
pub(crate) fn matmul(w: &[BlockQ8_0], a: &[BlockQ8_0], m: usize, n: usize, k: usize) -> Vec<f32> {
    let kb = check_shapes(w, a, m, n, k);
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_available() {
        let a_scales: Vec<f32> = a.iter().map(|b| scale(b.d)).collect();
        let dst = OutPtr(out.as_mut_ptr());
        let panels = n.div_ceil(COLUMN_PANEL);
        // Few rows (decode): split the columns finely so both cores stream weights; many rows:
        // one panel of columns a task, its weight blocks reused across every activation row.
        (0..panels).into_par_iter().for_each(|p| {
            let cols = p * COLUMN_PANEL..n.min((p + 1) * COLUMN_PANEL);
            // SAFETY: the CPU has AVX2, FMA and F16C; `w`, `a` and `a_scales` hold `n`, `m`
            // and `m` rows of `kb` blocks (checked above); tasks write disjoint columns of `dst`,
            // which holds `m * n` floats.
            unsafe { panel_avx2(w, a, &a_scales, m, n, kb, cols, &dst) };
        });
        return out;
    }
    matmul_reference_into(w, a, m, n, kb, &mut out);
    out
}

/// Output columns (weight rows) a task computes for every activation row.
const COLUMN_PANEL: usize = 32;
/// Activation rows of a register tile.
const TILE_M: usize = 4;
/// Weight rows of a register tile for many activation rows: 4 x 2 accumulators, the two
/// weight blocks and their absolute values leave room for the temporaries in 16 registers.
const TILE_N: usize = 2;
/// Weight rows of a register tile for one activation row (decode): four weight streams in
/// flight per activation block.
const TILE_N_ROW: usize = 4;

fn check_shapes(w: &[BlockQ8_0], a: &[BlockQ8_0], m: usize, n: usize, k: usize) -> usize {
    assert!(
        k.is_multiple_of(QK8_0),
        "q8 matmul: k = {k} is not whole blocks"
    );
    let kb = k / QK8_0;
    assert_eq!(w.len(), n * kb, "q8 matmul: weight is not [n, k]");
    assert_eq!(a.len(), m * kb, "q8 matmul: activation is not [m, k]");
    kb
}

/// Whether [`matmul`] runs its AVX2 kernel here.
pub(crate) fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The output buffer, shared by tasks that write disjoint columns.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements through the pointer (see `matmul`).
unsafe impl Sync for OutPtr {}

/// [`matmul`] in scalar code, lane for lane the AVX2 kernel's arithmetic (the tests' reference;
/// [`matmul`] falls back to the same code).
#[cfg(test)]
pub(crate) fn matmul_reference(
    w: &[BlockQ8_0],
    a: &[BlockQ8_0],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let kb = check_shapes(w, a, m, n, k);
    let mut out = vec![0f32; m * n];
    matmul_reference_into(w, a, m, n, kb, &mut out);
    out
}

fn matmul_reference_into(
    w: &[BlockQ8_0],
    a: &[BlockQ8_0],
    m: usize,
    n: usize,
    kb: usize,
    out: &mut [f32],
) {
    if kb == 0 {
        return;
    }
    out.par_chunks_mut(n.max(1))
        .zip(a.par_chunks(kb))
        .for_each(|(y, a)| {
            for (y, w) in y.iter_mut().zip(w.chunks_exact(kb)) {
                *y = dot_reference(w, a);
            }
        });
    debug_assert_eq!(out.len(), m * n);
}

/// A block's f16 scale in f32.
fn scale(d: [u8; 2]) -> f32 {
    half::f16::from_le_bytes(d).to_f32()
}

/// One row's dot product as the AVX2 kernel computes it: eight f32 lanes, each adding one
/// `i32` sum of four products per block by an FMA, summed as `hsum_float_8` does.
fn dot_reference(w: &[BlockQ8_0], a: &[BlockQ8_0]) -> f32 {
    let mut acc = [0f32; 8];
    for (w, a) in w.iter().zip(a) {
        let d = scale(w.d) * scale(a.d);
        // `_mm256_maddubs_epi16(|w|, sign(a, w))`: pairs of `u8 x i8` products summed with
        // saturation to i16; `_mm256_madd_epi16` by ones adds neighbouring pairs into i32.
        let mut pairs = [0i16; 16];
        let operands = w.qs.chunks_exact(2).zip(a.qs.chunks_exact(2));
        for (pair, (w, a)) in pairs.iter_mut().zip(operands) {
            let mut s = 0i32;
            for (&w, &a) in w.iter().zip(a) {
                let signed_a = match w.signum() {
                    0 => 0,
                    1 => a,
                    _ => a.wrapping_neg(),
                };
                s += i32::from(w.unsigned_abs()) * i32::from(signed_a);
            }
            *pair = s.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16;
        }
        for (lane, acc) in acc.iter_mut().enumerate() {
            let q = i32::from(pairs[2 * lane]) + i32::from(pairs[2 * lane + 1]);
            *acc = d.mul_add(q as f32, *acc);
        }
    }
    hsum8(acc)
}

/// `hsum_float_8`'s order: high half onto low, then lanes 2-3 onto 0-1, then lane 1 onto 0.
fn hsum8(v: [f32; 8]) -> f32 {
    let h = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (h[0] + h[2]) + (h[1] + h[3])
}

/// Columns `cols` of the product for every activation row.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` holds `n` rows and `a`, `a_scales` hold `m`
/// rows of `kb` blocks; `dst` points to `m * n` floats of which this call alone writes the
/// columns `cols`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_avx2(
    w: &[BlockQ8_0],
    a: &[BlockQ8_0],
    a_scales: &[f32],
    m: usize,
    n: usize,
    kb: usize,
    cols: std::ops::Range<usize>,
    dst: &OutPtr,
) {
    let tile_m = if m < TILE_M { 1 } else { TILE_M };
    let tile_n = if tile_m == 1 { TILE_N_ROW } else { TILE_N };
    let mut i = 0;
    while i < m {
        let rows = tile_m.min(m - i);
        let mut j = cols.start;
        while j < cols.end {
            let width = tile_n.min(cols.end - j);
            let t = TileArgs {
                w: w[j * kb..].as_ptr(),
                a: a[i * kb..].as_ptr(),
                a_scales: a_scales[i * kb..].as_ptr(),
                kb,
                // SAFETY: (the offset) output `(i, j)` lies inside the `[m, n]` buffer.
                c: unsafe { dst.0.add(i * n + j) },
                ldc: n,
            };
            // SAFETY: rows `i..i + rows` of `a` and `j..j + width` of `w` exist, and the tile's
            // outputs are in this task's columns.
            unsafe {
                match (rows, width) {
                    (4, 2) => tile::<4, 2>(&t),
                    (4, 1) => tile::<4, 1>(&t),
                    (3, 2) => tile::<3, 2>(&t),
                    (3, 1) => tile::<3, 1>(&t),
                    (2, 2) => tile::<2, 2>(&t),
                    (2, 1) => tile::<2, 1>(&t),
                    (1, 4) => tile::<1, 4>(&t),
                    (1, 3) => tile::<1, 3>(&t),
                    (1, 2) => tile::<1, 2>(&t),
                    (1, 1) => tile::<1, 1>(&t),
                    _ => unreachable!("tile {rows}x{width}"),
                }
            }
            j += width;
        }
        i += rows;
    }
}

/// One register tile's operands: `RM` activation rows from `a`, `RN` weight rows from `w`
/// (rows `kb` blocks apart), outputs at `c` with row stride `ldc`.
#[cfg(target_arch = "x86_64")]
struct TileArgs {
    w: *const BlockQ8_0,
    a: *const BlockQ8_0,
    a_scales: *const f32,
    kb: usize,
    c: *mut f32,
    ldc: usize,
}

/// `RM x RN` outputs over all `kb` blocks (ggml's block dot, see the module docs).
///
/// # Safety
/// As [`panel_avx2`]: AVX2, FMA and F16C, and `RM` / `RN` rows of `kb` blocks behind
/// `t.a`, `t.a_scales` and `t.w`, outputs writable at `t.c`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
// Register arrays indexed by the tile's row and column, as the loops nest.
#[allow(clippy::needless_range_loop)]
unsafe fn tile<const RM: usize, const RN: usize>(t: &TileArgs) {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); RN]; RM];
    for l in 0..t.kb {
        let mut wq = [_mm256_setzero_si256(); RN];
        let mut wabs = [_mm256_setzero_si256(); RN];
        let mut wd = [0f32; RN];
        for j in 0..RN {
            // SAFETY: block `l` of weight row `j` exists (the caller's contract).
            let b = unsafe { &*t.w.add(j * t.kb + l) };
            // SAFETY: `qs` is 32 readable bytes.
            wq[j] = unsafe { _mm256_loadu_si256(b.qs.as_ptr().cast()) };
            wabs[j] = _mm256_sign_epi8(wq[j], wq[j]);
            let bits = i32::from(u16::from_le_bytes(b.d));
            wd[j] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
        }
        for i in 0..RM {
            // SAFETY: block `l` of activation row `i` and its scale exist.
            let (aq, ad) = unsafe {
                (
                    _mm256_loadu_si256((*t.a.add(i * t.kb + l)).qs.as_ptr().cast()),
                    *t.a_scales.add(i * t.kb + l),
                )
            };
            for j in 0..RN {
                let dot = _mm256_maddubs_epi16(wabs[j], _mm256_sign_epi8(aq, wq[j]));
                let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, dot));
                acc[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(wd[j] * ad), q, acc[i][j]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            // `hsum_float_8`.
            let h = _mm_add_ps(_mm256_extractf128_ps(*v, 1), _mm256_castps256_ps128(*v));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_add_ss(h, _mm_movehdup_ps(h));
            // SAFETY: output `(i, j)` of the tile is writable (the caller's contract).
            unsafe { *t.c.add(i * t.ldc + j) = _mm_cvtss_f32(h) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random stream (no dependency on the model's RNG).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// The kernel equals the scalar reference bit for bit on shapes that are not whole tiles
    /// or panels (one row as in decode, rows not a multiple of 4, columns not of 2 or 32).
    #[test]
    fn kernel_equals_the_scalar_reference_bitwise() {
        for (m, n, k) in [
            (1, 1, 32),
            (1, 7, 64),
            (1, 70, 96),
            (2, 5, 32),
            (3, 33, 128),
            (5, 3, 64),
            (9, 67, 160),
            (13, 65, 32),
        ] {
            let w = quantize_rows(&values(n * k, 1 + n as u64), k);
            let a = quantize_rows(&values(m * k, 2 + m as u64), k);
            let got = matmul(&w, &a, m, n, k);
            let want = matmul_reference(&w, &a, m, n, k);
            let same = got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(same, "[{m}, {k}] x [{n}, {k}]: {got:?} vs {want:?}");
        }
    }

    /// The block arithmetic holds at the extremes: the -128 a GGUF weight may hold (ggml's
    /// quantizer never writes it), zero blocks, and the largest products.
    #[test]
    fn extreme_quants_match_the_reference() {
        let block = |d: f32, q: i8| BlockQ8_0 {
            d: half::f16::from_f32(d).to_le_bytes(),
            qs: std::array::from_fn(|i| if i % 3 == 0 { q } else { q / 2 }),
        };
        let w = [block(0.5, -128), block(0.0, 0), block(2.0, 127)];
        let a = [block(1.0, 127), block(1.0, -127), block(0.25, -127)];
        assert_eq!(
            matmul(&w, &a, 1, 1, 96)[0].to_bits(),
            matmul_reference(&w, &a, 1, 1, 96)[0].to_bits()
        );
        // -128 x 127 x 11 + -64 x 63 x 21, in lanes, scaled by 0.5; then 127 x -127 ... x 0.5.
        let exact = 0.5 * (-128.0 * 127.0 * 11.0 - 64.0 * 63.0 * 21.0)
            + 0.5 * (127.0 * -127.0 * 11.0 + 63.0 * -63.0 * 21.0);
        assert_eq!(matmul_reference(&w, &a, 1, 1, 96)[0], exact);
    }

    /// Quantizing rounds half away from zero, with `1 / d`, as candle's `from_float`.
    #[test]
    fn quantizes_as_ggml_reference() {
        let mut x = vec![0f32; 64];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = 0.49;
        let b = quantize_rows(&x, 32);
        assert_eq!(scale(b[0].d), 1.0);
        assert_eq!(&b[0].qs[..4], &[127, 3, -3, 0]);
        assert_eq!(
            b[1],
            BlockQ8_0 {
                d: [0; 2],
                qs: [0; 32]
            }
        );
    }
}
