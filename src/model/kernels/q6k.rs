//! Products by Q6_K weights (the LM head of `--quant q4_k`): activations quantized to Q8_K
//! ([`super::q4k::quantize_rows`]), weight rows held interleaved by 8 as [`super::q4k`] holds
//! Q4_K, for the same reason: candle's one-output-at-a-time block dot is compute-bound here,
//! and the head is a quarter of a Q4_K decode step's bytes.
//!
//! Layout ([`Grouped`]): per group of 8 rows, first a header run of every super-block's 8 f16
//! scales and 16 x 8 sub-block scales (`[sub-block][row]`), padded to a line; then the quants,
//! 1536 bytes a super-block: per half (128 values) and 4-position run, 32 bytes of 8 rows' low
//! bits of values `l`/`l + 64`, 32 of `l + 32`/`l + 96`, and 32 of their high bits. One load of
//! each gives 4 vectors of 8 rows x 4 six-bit values, multiplied by the broadcast activation
//! as in `q4k` (each row's products in its own 32-bit lane).
//!
//! The arithmetic, per row and super-block: `isum = Σ_s sc_s Σ_{i∈s} q_i a_i` with `q` in
//! 0..64 (two `maddubs` sums at most per `i16`: 2 x 2 x 63 x 128 < 2^15), less
//! `32 Σ_s sc_s Σ_{i∈s} a_i` (the bias of 32, from the activation's 16-value sums), exactly in
//! `i32`; then `acc += (d·d_a) · that` by FMA in f32. [`dot_reference`] does exactly this.

use rayon::prelude::*;

use super::q4k::{BlockQ8K, QK_K};

/// Bytes of one ggml `block_q6_K`: 128 of low 4 bits, 64 of high 2 bits, 16 `i8` scales, `d`.
pub(crate) const BLOCK_BYTES: usize = 210;
/// Weight rows a group interleaves.
pub(crate) const GROUP: usize = 8;
/// A super-block's header in a group: 8 `d`, then 16 x 8 scales.
const HEADER: usize = 2 * GROUP + 16 * GROUP;
/// A super-block's quants in a group: two halves of 8 runs of 3 x 32 bytes.
const QUANTS: usize = 2 * 8 * 96;
const _: () = assert!(HEADER + QUANTS == GROUP * BLOCK_BYTES && QUANTS.is_multiple_of(64));

use super::q4k::{Line, zeroed_lines};

/// Q6_K weight rows `[n, k]` regrouped by 8 (see the module docs).
pub(crate) struct Grouped {
    lines: Vec<Line>,
    n: usize,
    kb: usize,
}

impl std::fmt::Debug for Grouped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "q6k::Grouped([{}, {}])", self.n, self.kb * QK_K)
    }
}

impl Grouped {
    /// Bytes of a group's headers, padded to whole lines.
    fn header_bytes(kb: usize) -> usize {
        (kb * HEADER).next_multiple_of(64)
    }

    fn group_bytes(kb: usize) -> usize {
        Self::header_bytes(kb) + kb * QUANTS
    }

    /// Where byte `i` of row `j`'s (of 8) ggml block `b` goes inside its group.
    fn position(kb: usize, b: usize, j: usize, i: usize) -> usize {
        let quants = Self::header_bytes(kb) + b * QUANTS;
        match i {
            0..128 => {
                let (half, u) = (i / 64, i % 64);
                let (run, within) = ((u % 32) / 4, u % 4);
                quants + half * 768 + run * 96 + (u / 32) * 32 + 4 * j + within
            }
            128..192 => {
                let (half, l) = ((i - 128) / 32, (i - 128) % 32);
                quants + half * 768 + (l / 4) * 96 + 64 + 4 * j + l % 4
            }
            192..208 => b * HEADER + 2 * GROUP + (i - 192) * GROUP + j,
            _ => b * HEADER + 2 * j + (i - 208),
        }
    }

    /// Regroups `n` rows of `kb` ggml Q6_K blocks (`bytes`, as a GGUF file or candle stores
    /// them).
    pub(crate) fn from_ggml(bytes: &[u8], n: usize, kb: usize) -> Self {
        assert_eq!(
            bytes.len(),
            n * kb * BLOCK_BYTES,
            "q6k::Grouped: weight is not [n, kb] blocks"
        );
        let group_bytes = Self::group_bytes(kb);
        let mut lines = zeroed_lines(n.div_ceil(GROUP) * group_bytes / 64);
        lines
            .par_chunks_mut((group_bytes / 64).max(1))
            .enumerate()
            .for_each(|(g, group)| {
                // SAFETY: `Line` is 64 plain bytes; the group's lines are contiguous.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(group.as_mut_ptr().cast::<u8>(), group_bytes)
                };
                for r in g * GROUP..n.min((g + 1) * GROUP) {
                    let row = &bytes[r * kb * BLOCK_BYTES..(r + 1) * kb * BLOCK_BYTES];
                    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                        for (i, &v) in block.iter().enumerate() {
                            dst[Self::position(kb, b, r % GROUP, i)] = v;
                        }
                    }
                }
            });
        Self { lines, n, kb }
    }

    /// The regrouped bytes (padding included).
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes, so the lines are `64 * len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.lines.len() * 64) }
    }

    /// Row `r`'s ggml block `b`.
    fn block(&self, r: usize, b: usize) -> [u8; BLOCK_BYTES] {
        let group = &self.bytes()[r / GROUP * Self::group_bytes(self.kb)..];
        std::array::from_fn(|i| group[Self::position(self.kb, b, r % GROUP, i)])
    }

    /// The ggml blocks again, row by row (what a GGUF file or candle's `QTensor` holds).
    pub(crate) fn to_ggml(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.ggml_bytes());
        for r in 0..self.n {
            for b in 0..self.kb {
                out.extend_from_slice(&self.block(r, b));
            }
        }
        out
    }

    /// Bytes of the ggml blocks this holds (`n * kb * 210`; padding not counted).
    pub(crate) fn ggml_bytes(&self) -> usize {
        self.n * self.kb * BLOCK_BYTES
    }

    /// Rows `rows` dequantized into `out` (`rows.len() * k` floats), as ggml's
    /// `dequantize_row_q6_K` (and candle's `to_float`): `d·sc·(q − 32)`.
    pub(crate) fn dequantize_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let k = self.kb * QK_K;
        assert!(rows.end <= self.n && out.len() == rows.len() * k);
        for (r, out) in rows.zip(out.chunks_exact_mut(k.max(1))) {
            for (b, y) in out.chunks_exact_mut(QK_K).enumerate() {
                let block = self.block(r, b);
                let d = half::f16::from_le_bytes([block[208], block[209]]).to_f32();
                for (i, y) in y.iter_mut().enumerate() {
                    let sc = block[192 + i / 16] as i8;
                    *y = d * f32::from(sc) * f32::from(level(&block, i) - 32);
                }
            }
        }
    }
}

/// Value `i`'s 6-bit level (0..64) in a ggml Q6_K block.
fn level(block: &[u8; BLOCK_BYTES], i: usize) -> i8 {
    let (half, t, l) = (i / 128, (i % 128) / 32, i % 32);
    let ql = block[64 * half + l + 32 * (t % 2)];
    let low = if t < 2 { ql & 0xF } else { ql >> 4 };
    let high = (block[128 + 32 * half + l] >> (2 * t)) & 3;
    (low | (high << 4)) as i8
}

/// Weight row `r` by one activation row `a` (`kb` blocks) in scalar code, the AVX2 kernel's
/// arithmetic exactly (see the module docs): the fallback and the tests' reference.
pub(crate) fn dot_reference(w: &Grouped, r: usize, a: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    for (b, a) in a.iter().enumerate() {
        let block = w.block(r, b);
        let d = half::f16::from_le_bytes([block[208], block[209]]).to_f32();
        let mut total = 0i32;
        for s in 0..QK_K / 16 {
            let mut sum = 0i32;
            for i in 16 * s..16 * s + 16 {
                sum += i32::from(level(&block, i) - 32) * i32::from(a.qs[i]);
            }
            total += i32::from(block[192 + s] as i8) * sum;
        }
        acc = (d * a.d).mul_add(total as f32, acc);
    }
    acc
}

/// Activation rows a register tile shares each weight load across.
const TILE_M: usize = 4;
/// Bytes of weights a rayon task streams at least.
const TASK_BYTES: usize = 64 * 1024;

/// The output buffer, shared by tasks that write disjoint columns.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements through the pointer (see `matmul`).
unsafe impl Sync for OutPtr {}

/// `y [m, n] = a [m, k] . w [n, k]^T` for Q6_K weight rows `w` and Q8_K activation rows `a`
/// (`m * kb` blocks): `m * n` floats, row-major. Parallel over groups of output columns; AVX2
/// where the CPU has it, else scalar code with the same arithmetic (the same bits).
pub(crate) fn matmul(w: &Grouped, a: &[BlockQ8K], m: usize) -> Vec<f32> {
    let (n, kb) = (w.n, w.kb);
    assert_eq!(a.len(), m * kb, "q6k matmul: activation is not [m, k]");
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    #[cfg(target_arch = "x86_64")]
    if super::q4k::avx2_available() {
        let groups = n.div_ceil(GROUP);
        let per_task = (TASK_BYTES / Grouped::group_bytes(kb).max(1)).clamp(1, groups.div_ceil(2));
        let dst = OutPtr(out.as_mut_ptr());
        (0..groups.div_ceil(per_task))
            .into_par_iter()
            .for_each(|t| {
                for g in t * per_task..groups.min((t + 1) * per_task) {
                    // SAFETY: the CPU has AVX2, FMA and F16C; group `g` exists; `a` holds `m`
                    // rows of `kb` blocks; tasks write disjoint columns.
                    unsafe { group_rows_avx2(w, g, a, m, &dst) };
                }
            });
        return out;
    }
    out.par_chunks_mut(n)
        .zip(a.par_chunks(kb))
        .for_each(|(y, a)| {
            for (r, y) in y.iter_mut().enumerate() {
                *y = dot_reference(w, r, a);
            }
        });
    out
}

/// Group `g`'s outputs for every activation row, `TILE_M` rows at a time.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; group `g` exists in `w`; `a` holds `m` rows of
/// `w.kb` blocks; `dst` points to `m * w.n` floats of which this call alone writes group `g`'s
/// columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_rows_avx2(w: &Grouped, g: usize, a: &[BlockQ8K], m: usize, dst: &OutPtr) {
    let (n, kb) = (w.n, w.kb);
    let group = w.bytes()[g * Grouped::group_bytes(kb)..].as_ptr();
    let cols = g * GROUP..n.min((g + 1) * GROUP);
    let mut i = 0;
    while i < m {
        let rows = TILE_M.min(m - i);
        let mut out = [[0f32; GROUP]; TILE_M];
        let a = &a[i * kb..];
        // SAFETY: the group's headers and quants start at `group`; `rows` activation rows
        // follow `a`.
        unsafe {
            match rows {
                4 => group_tile::<4>(group, kb, a, &mut out),
                3 => group_tile::<3>(group, kb, a, &mut out),
                2 => group_tile::<2>(group, kb, a, &mut out),
                _ => group_tile::<1>(group, kb, a, &mut out),
            }
        }
        for (r, out) in out.iter().take(rows).enumerate() {
            // SAFETY: these outputs are in this call's columns of the `[m, n]` buffer.
            let y = unsafe {
                std::slice::from_raw_parts_mut(dst.0.add((i + r) * n + cols.start), cols.len())
            };
            y.copy_from_slice(&out[..cols.len()]);
        }
        i += rows;
    }
}

/// `M` activation rows against one group's 8 weight rows over all `kb` super-blocks.
///
/// # Safety
/// AVX2, FMA and F16C; `group` is a group's start (64-byte aligned); `a` holds `M` rows of
/// `kb` blocks.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
// Register arrays indexed by the tile's activation row.
#[allow(clippy::needless_range_loop)]
unsafe fn group_tile<const M: usize>(
    group: *const u8,
    kb: usize,
    a: &[BlockQ8K],
    out: &mut [[f32; GROUP]; TILE_M],
) {
    use std::arch::x86_64::*;
    let low4 = _mm256_set1_epi8(0x0F);
    let bits45 = _mm256_set1_epi8(0x30);
    let mut acc = [_mm256_setzero_ps(); M];
    for b in 0..kb {
        // SAFETY: super-block `b`'s header and quants lie inside the group's bytes; the quant
        // loads are 32-byte aligned (a line-aligned region, runs of 96); a prefetch may point
        // anywhere.
        unsafe {
            let header = group.add(b * HEADER);
            let quants = group.add(Grouped::header_bytes(kb) + b * QUANTS);
            let ahead = quants.wrapping_add(super::q4k::prefetch_bytes());
            for line in 0..QUANTS / 64 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line).cast());
            }
            let scales = header.add(2 * GROUP);
            // The bias of 32: `Σ_s sc_s · bsum_s` per row, sub-blocks taken in pairs.
            let mut bias = [_mm256_setzero_si256(); M];
            for p in 0..8 {
                let x = _mm_loadu_si128(scales.add(16 * p).cast());
                let pairs = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(x, _mm_srli_si128(x, 8)));
                for i in 0..M {
                    let s = &a[i * kb + b].bsums;
                    let sums = (s[2 * p] as u16 as i32) | ((s[2 * p + 1] as u16 as i32) << 16);
                    bias[i] = _mm256_add_epi32(
                        bias[i],
                        _mm256_madd_epi16(pairs, _mm256_set1_epi32(sums)),
                    );
                }
            }
            let mut isum = [_mm256_setzero_si256(); M];
            for half in 0..2 {
                for part in 0..2 {
                    // Runs `4 part..4 part + 4` of this half: values `32t + l` of sub-blocks
                    // `8 half + 2t + part`, taken as `t` and `t + 2` (the low and high nibbles
                    // of one low-bits vector) to keep the registers few.
                    for t in 0..2 {
                        let x = _mm_loadl_epi64(scales.add(8 * (8 * half + 2 * t + part)).cast());
                        let sc_a = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(x, x));
                        let x =
                            _mm_loadl_epi64(scales.add(8 * (8 * half + 2 * t + 4 + part)).cast());
                        let sc_b = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(x, x));
                        for runs in 0..2 {
                            let mut sum_a = [_mm256_setzero_si256(); M];
                            let mut sum_b = [_mm256_setzero_si256(); M];
                            for run in 4 * part + 2 * runs..4 * part + 2 * runs + 2 {
                                let q = quants.add(768 * half + 96 * run);
                                let l = _mm256_load_si256(q.add(32 * t).cast());
                                let h = _mm256_load_si256(q.add(64).cast());
                                // The high bits of `t` (bits 2t, 2t + 1) and `t + 2` (bits
                                // 2t + 4, 2t + 5) moved to bits 4-5.
                                let (h_a, h_b) = if t == 0 {
                                    (_mm256_slli_epi16(h, 4), h)
                                } else {
                                    (_mm256_slli_epi16(h, 2), _mm256_srli_epi16(h, 2))
                                };
                                let v_a = _mm256_or_si256(
                                    _mm256_and_si256(l, low4),
                                    _mm256_and_si256(h_a, bits45),
                                );
                                let v_b = _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16(l, 4), low4),
                                    _mm256_and_si256(h_b, bits45),
                                );
                                for i in 0..M {
                                    let aq = a[i * kb + b].qs.as_ptr().add(128 * half + 4 * run);
                                    let x_a = _mm256_set1_epi32(
                                        aq.add(32 * t).cast::<i32>().read_unaligned(),
                                    );
                                    let x_b = _mm256_set1_epi32(
                                        aq.add(32 * t + 64).cast::<i32>().read_unaligned(),
                                    );
                                    sum_a[i] =
                                        _mm256_add_epi16(sum_a[i], _mm256_maddubs_epi16(v_a, x_a));
                                    sum_b[i] =
                                        _mm256_add_epi16(sum_b[i], _mm256_maddubs_epi16(v_b, x_b));
                                }
                            }
                            for i in 0..M {
                                isum[i] =
                                    _mm256_add_epi32(isum[i], _mm256_madd_epi16(sum_a[i], sc_a));
                                isum[i] =
                                    _mm256_add_epi32(isum[i], _mm256_madd_epi16(sum_b[i], sc_b));
                            }
                        }
                    }
                }
            }
            let d = _mm256_cvtph_ps(_mm_loadu_si128(header.cast()));
            for i in 0..M {
                let total = _mm256_sub_epi32(isum[i], _mm256_slli_epi32(bias[i], 5));
                let da = _mm256_set1_ps(a[i * kb + b].d);
                acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(d, da), _mm256_cvtepi32_ps(total), acc[i]);
            }
        }
    }
    for i in 0..M {
        // SAFETY: `out[i]` is 8 floats.
        unsafe { _mm256_storeu_ps(out[i].as_mut_ptr(), acc[i]) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::q4k::quantize_rows;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(6364136223846793005) ^ 0x9e37_79b9_7f4a_7c15;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect()
    }

    /// Random Q6_K blocks with a finite, moderate `d`.
    fn blocks(n: usize, kb: usize, seed: u64) -> Vec<u8> {
        let mut w = bytes(n * kb * BLOCK_BYTES, seed);
        for (i, block) in w.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            let d = half::f16::from_f32(0.0003 + (i % 7) as f32 * 0.0001);
            block[208..].copy_from_slice(&d.to_le_bytes());
        }
        w
    }

    /// Regrouping is a permutation of ggml's bytes, for row counts that are not whole groups
    /// and widths of one and several super-blocks.
    #[test]
    fn regrouping_round_trips_to_ggml_bytes() {
        for (n, kb) in [(1, 1), (7, 1), (13, 3), (16, 2), (70, 4)] {
            let w = blocks(n, kb, 3 + n as u64);
            let g = Grouped::from_ggml(&w, n, kb);
            assert_eq!(g.to_ggml(), w, "[{n}, {kb} super-blocks]");
            assert_eq!(g.ggml_bytes(), w.len());
        }
        for kb in [1, 3] {
            let mut seen = vec![false; Grouped::group_bytes(kb)];
            for b in 0..kb {
                for j in 0..GROUP {
                    for i in 0..BLOCK_BYTES {
                        let at = Grouped::position(kb, b, j, i);
                        assert!(!std::mem::replace(&mut seen[at], true), "{kb} {b} {j} {i}");
                    }
                }
            }
        }
    }

    /// The kernel equals the scalar reference bit for bit (1 to 6 activation rows, outputs not
    /// whole groups), and the reference is within f32 rounding of an f64 dot product from the
    /// blocks' integers.
    #[test]
    fn kernel_equals_the_scalar_reference_and_f64() {
        for (m, n, kb) in [
            (1, 1, 1),
            (1, 13, 2),
            (3, 70, 4),
            (2, 8, 1),
            (4, 17, 3),
            (6, 9, 2),
        ] {
            let k = kb * QK_K;
            let w = Grouped::from_ggml(&blocks(n, kb, 11 + n as u64), n, kb);
            let x: Vec<f32> = bytes(m * k, 5 + m as u64)
                .iter()
                .map(|&b| (f32::from(b) - 127.5) / 64.0)
                .collect();
            let a = quantize_rows(&x, k);
            let got = matmul(&w, &a, m);
            for i in 0..m {
                for r in 0..n {
                    let a = &a[i * kb..(i + 1) * kb];
                    let want = dot_reference(&w, r, a);
                    let g = got[i * n + r];
                    assert_eq!(g.to_bits(), want.to_bits(), "[{m}, {n}, {kb}] ({i}, {r})");
                    let (mut exact, mut size) = (0f64, 0f64);
                    for (b, a) in a.iter().enumerate() {
                        let block = w.block(r, b);
                        let d = f64::from(half::f16::from_le_bytes([block[208], block[209]]));
                        for (l, &qa) in a.qs.iter().enumerate() {
                            let sc = f64::from(block[192 + l / 16] as i8);
                            let t = d
                                * sc
                                * f64::from(level(&block, l) - 32)
                                * f64::from(a.d)
                                * f64::from(qa);
                            exact += t;
                            size += t.abs();
                        }
                    }
                    let tol = 4.0 * f64::from(f32::EPSILON) * size * (kb as f64 + 1.0);
                    assert!(
                        (f64::from(g) - exact).abs() <= tol,
                        "[{m}, {n}, {kb}] ({i}, {r}): {g} vs {exact}"
                    );
                }
            }
        }
    }

    /// The integer extremes: every level 63 (and 0) with scales of 127 and -128 against
    /// activations of 127 and -128, the largest `i16` sums the kernel forms.
    #[test]
    fn extreme_levels_match_the_reference() {
        let (n, kb) = (8, 2);
        for (fill, scale) in [(0xFFu8, 127i8), (0x00, -128)] {
            let mut w = blocks(n, kb, 1);
            for block in w.chunks_exact_mut(BLOCK_BYTES) {
                block[..192].fill(fill);
                block[192..208].fill(scale as u8);
            }
            let g = Grouped::from_ggml(&w, n, kb);
            for act in [-128i8, 127] {
                let mut a = quantize_rows(&vec![1.0; kb * QK_K], kb * QK_K);
                for a in &mut a {
                    a.qs = [act; QK_K];
                    a.bsums = [i16::from(act) * 16; QK_K / 16];
                }
                let got = matmul(&g, &a, 1);
                let level = if fill == 0xFF { 31.0 } else { -32.0 };
                for (r, &v) in got.iter().enumerate() {
                    assert_eq!(v.to_bits(), dot_reference(&g, r, &a).to_bits());
                    // Per super-block d·scale·level·256·act·d_a (exact in f64 to a few ulps).
                    let mut exact = 0f64;
                    for b in 0..kb {
                        let block = g.block(r, b);
                        let d = f64::from(half::f16::from_le_bytes([block[208], block[209]]));
                        exact += d
                            * f64::from(scale)
                            * level
                            * 256.0
                            * f64::from(act)
                            * f64::from(a[b].d);
                    }
                    assert!(
                        (f64::from(v) - exact).abs() <= 1e-6 * exact.abs(),
                        "{v} vs {exact}"
                    );
                }
            }
        }
    }
}
