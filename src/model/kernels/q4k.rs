//! Products by Q4_K weights: activations quantized to Q8_K once per product, weight rows held
//! interleaved by 8 so that one pass of AVX2 integer arithmetic yields eight outputs at once.
//!
//! Why our own kernel and not candle's (`candle-core` 0.11's `vec_dot_q4k_q8k`, one output at a
//! time): that block dot is compute-bound on 2 Zen 3 cores, reading about 8.3 GB/s on one core
//! from L2 (scalar unpacking of the 6-bit scales, `half`'s f16 conversions and a scaled `madd`
//! for every 32 bytes), so a Q4_K decode step ran at 35-41% of the weights' memory-bandwidth
//! floor. Here ([`Grouped`]) rows are regrouped by 8, as llama.cpp's `q4_K_8x8` repack does
//! (`ggml-cpu/arch/x86/repack.cpp`), but in our own order: per group and super-block, the 8
//! rows' f16 scales, then their 12 packed scale bytes transposed (byte `j` of the 8 rows
//! together, so the 6-bit scales and mins of all 8 rows unpack in a handful of vector
//! instructions), then the nibbles 4 bytes of each row at a time. One 32-byte load then holds
//! the same 4 positions of 8 rows; the activation's 4 bytes are broadcast to every row, so
//! `maddubs` leaves each row's products in its own 32-bit lane and no horizontal sums are
//! needed. A super-block of a group is 1152 bytes, 18 cache lines, streamed front to back: the
//! same bytes as ggml's (a permutation; no copy beside them).
//!
//! The arithmetic, per row and super-block `b`: `isum = Σ_g sc_g Σ_{i∈g} q_i a_i` and
//! `msum = Σ_g m_g Σ_{i∈g} a_i` exactly in `i32` (the `maddubs` pair sums and 16-term `i16`
//! sums cannot saturate: 16 x 15 x 128 < 2^15), then `acc += (d·d_a) · isum` and
//! `accm += (dmin·d_a) · msum` by FMA in f32, and the output is `acc − accm`. The scalar code
//! ([`dot_reference`]) does exactly this, so both paths give the same bits; candle's block dot
//! sums the same integers in another float order (a tolerance, not bits, in the tests).
//!
//! Measured (BENCHMARKS.md, "Q4_K decode over rows regrouped by 8", 2 Zen 4 cores): one
//! decode step's Q4_K products at the LFM2-VL-450M shapes took 6.0-6.9 ms (best of 12)
//! against 7.1-7.4 through candle's block dot, the 2-thread read of the same 154 MiB 5.0-5.3
//! ms; end to end a `--quant q4_k` decode step went from 9.0-11.1 to 8.0-8.5 ms. Many rows (a
//! prefill) can run the same kernel in tiles of 4 activation rows, a task's weights kept in L2,
//! but slower than candle's repacked Q4_K tiles (LM prefill 326-433 against 261-267 ms), so
//! `QuantWeight` sends them to candle's, with its blocks rebuilt once beside ours. On CPUs with
//! AVX-512 VNNI neither runs by default: [`super::q4k_vnni`]'s tiles take every row count (this
//! module's Q8_K quantizer feeds both). The same regrouping for Q6_K (the LM head) measured
//! slower than candle's `vec_dot_q6k_q8k` (2.5-3.2 ms against 1.9-2.0 for the head), so Q6_K
//! stays on candle's here; on AVX-512 VNNI CPUs [`super::q6k_vnni`]'s tiles take it.

use rayon::prelude::*;

use super::tasks::OutPtr;

/// Values per super-block (Q4_K and Q8_K).
pub(crate) const QK_K: usize = 256;
/// Bytes of one ggml `block_q4_K`: `d`, `dmin` (f16), 12 bytes of 6-bit scales and mins, 128
/// bytes of nibbles.
pub(crate) const BLOCK_BYTES: usize = 144;
/// Weight rows a group interleaves.
pub(crate) const GROUP: usize = 8;
/// Bytes of one group's super-block: 8 ggml blocks, 18 lines.
const GROUP_BLOCK: usize = GROUP * BLOCK_BYTES;
/// Offsets inside a group's super-block: 8 `d`, 8 `dmin`, the 12 x 8 transposed scale bytes,
/// the nibbles (4 chunks of 8 vectors of 8 rows x 4 bytes).
const OFF_DMIN: usize = 2 * GROUP;
const OFF_SCALES: usize = 4 * GROUP;
const OFF_QS: usize = OFF_SCALES + 12 * GROUP;
const _: () = assert!(OFF_QS == 128 && GROUP_BLOCK == 1152 && GROUP_BLOCK.is_multiple_of(64));

/// One ggml `block_q8_K` (candle's `BlockQ8K`, `repr(C)`): the scale, 256 quants and the sums
/// of each 16 of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BlockQ8K {
    pub(crate) d: f32,
    pub(crate) qs: [i8; QK_K],
    pub(crate) bsums: [i16; QK_K / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);

/// `x [m, k]` (`k` a multiple of 256) quantized row by row to Q8_K, bit for bit as candle's
/// `BlockQ8K::from_float` on x86 (`iscale = -127 / max` of the largest magnitude, rounding half
/// away from zero, `d = 1 / iscale`).
pub(crate) fn quantize_rows(x: &[f32], k: usize) -> Vec<BlockQ8K> {
    assert!(
        k.is_multiple_of(QK_K) && x.len().is_multiple_of(k.max(1)),
        "q4k::quantize_rows: rows of {k} are not whole super-blocks"
    );
    let zero = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    let mut out = vec![zero; x.len() / QK_K];
    out.par_chunks_mut(16)
        .zip(x.par_chunks(16 * QK_K))
        .for_each(|(o, x)| quantize_blocks(x, o));
    out
}

fn quantize_blocks(x: &[f32], out: &mut [BlockQ8K]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
        // SAFETY: the CPU has AVX-512F/BW (checked above).
        return unsafe { quantize_blocks_avx512(x, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { quantize_blocks_avx2(x, out) };
    }
    quantize_blocks_scalar(x, out);
}

/// [`quantize_rows`] through the scalar loop alone (compiled for AVX2 where the CPU has it):
/// the reference of the AVX-512 quantizer's tests and measurements.
#[cfg(test)]
pub(crate) fn quantize_rows_scalar(x: &[f32], k: usize) -> Vec<BlockQ8K> {
    let zero = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    let mut out = vec![zero; x.len() / k * (k / QK_K)];
    out.par_chunks_mut(16)
        .zip(x.par_chunks(16 * QK_K))
        .for_each(|(o, x)| {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked above).
                return unsafe { quantize_blocks_avx2(x, o) };
            }
            quantize_blocks_scalar(x, o)
        });
    out
}

/// The scalar loop compiled for AVX2, which LLVM vectorises.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_blocks_avx2(x: &[f32], out: &mut [BlockQ8K]) {
    quantize_blocks_scalar(x, out);
}

/// [`quantize_blocks_scalar`] in AVX-512 code, the same bits: the largest magnitude first (its
/// first occurrence gives `max`'s sign, as the scalar loop's strict `<` keeps the first), then
/// per value `iscale * v` rounded half away from zero (`trunc` plus one step toward the sign
/// where the exact fraction is at least one half, which is what `f32::round` does), clamped, a
/// NaN product giving 0 as Rust's `as i8` does; each 16 quants' sum is one `bsums` entry. The
/// scalar loop's search for `max` does not vectorise (it carries a select): it quantized 270
/// rows of 4608 in 1.09 ms against 0.45 here (`q4k_vnni::measure`).
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_blocks_avx512(x: &[f32], out: &mut [BlockQ8K]) {
    use std::arch::x86_64::*;
    for (y, x) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        // SAFETY: `x` is 256 floats, `y.qs` 256 bytes.
        unsafe {
            let p = x.as_ptr();
            let mut vmax = _mm512_setzero_ps();
            for v in 0..QK_K / 16 {
                // `max_ps` returns its second operand where either is NaN: a NaN is passed over,
                // as the scalar `amax < |v|` passes it over.
                vmax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(p.add(16 * v))), vmax);
            }
            let amax = _mm512_reduce_max_ps(vmax);
            if amax == 0.0 {
                y.d = 0.0;
                y.qs = [0; QK_K];
                y.bsums = [0; QK_K / 16];
                continue;
            }
            let target = _mm512_set1_ps(amax);
            let mut max = amax;
            for v in 0..QK_K / 16 {
                let abs = _mm512_abs_ps(_mm512_loadu_ps(p.add(16 * v)));
                let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(abs, target);
                if hit != 0 {
                    max = x[16 * v + hit.trailing_zeros() as usize];
                    break;
                }
            }
            let iscale = -127f32 / max;
            let scale = _mm512_set1_ps(iscale);
            let sign = _mm512_set1_ps(-0.0);
            let one = _mm512_set1_ps(1.0);
            let half = _mm512_set1_ps(0.5);
            let (lo, hi) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
            for v in 0..QK_K / 16 {
                let prod = _mm512_mul_ps(scale, _mm512_loadu_ps(p.add(16 * v)));
                const TRUNC: i32 = _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC;
                let whole = _mm512_roundscale_ps::<TRUNC>(prod);
                let frac = _mm512_abs_ps(_mm512_sub_ps(prod, whole));
                let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, half);
                let step = _mm512_or_ps(_mm512_and_ps(prod, sign), one);
                let r = _mm512_mask_add_ps(whole, up, whole, step);
                let r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
                let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(prod, prod);
                let q = _mm512_maskz_cvttps_epi32(ordered, r);
                _mm_storeu_si128(
                    y.qs.as_mut_ptr().add(16 * v).cast(),
                    _mm512_cvtsepi32_epi8(q),
                );
                y.bsums[v] = _mm512_reduce_add_epi32(q) as i16;
            }
            y.d = 1.0 / iscale;
        }
    }
}

#[inline(always)]
fn quantize_blocks_scalar(x: &[f32], out: &mut [BlockQ8K]) {
    for (y, x) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            y.d = 0.0;
            y.qs = [0; QK_K];
            y.bsums = [0; QK_K / 16];
            continue;
        }
        let iscale = -127f32 / max;
        for (q, &v) in y.qs.iter_mut().zip(x) {
            *q = (iscale * v).round().clamp(-128.0, 127.0) as i8;
        }
        for (s, q) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
            *s = q.iter().map(|&q| i32::from(q)).sum::<i32>() as i16;
        }
        y.d = 1.0 / iscale;
    }
}

/// One 64-byte line of [`Grouped`] storage (its alignment is the point).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Q4_K weight rows `[n, k]` regrouped by 8 (see the module docs): group `g` (rows
/// `8g..8g + 8`, zero rows past `n`) holds its `kb` super-blocks one after another, 1152 bytes
/// each.
pub(crate) struct Grouped {
    lines: Vec<Line>,
    n: usize,
    kb: usize,
}

impl std::fmt::Debug for Grouped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "q4k::Grouped([{}, {}])", self.n, self.kb * QK_K)
    }
}

/// Where byte `i` of a ggml block of row `j` (of 8) goes inside its group's super-block.
fn position(j: usize, i: usize) -> usize {
    match i {
        0..2 => 2 * j + i,
        2..4 => OFF_DMIN + 2 * j + (i - 2),
        4..16 => OFF_SCALES + (i - 4) * GROUP + j,
        _ => {
            // Nibble byte `t` (0..128): chunk `t / 32`, then 4-byte run `(t % 32) / 4`.
            let t = i - 16;
            OFF_QS + (t / 32) * 256 + ((t % 32) / 4) * 32 + 4 * j + t % 4
        }
    }
}

impl Grouped {
    /// Regroups `n` rows of `kb` ggml Q4_K blocks (`bytes`, as a GGUF file or candle stores
    /// them).
    pub(crate) fn from_ggml(bytes: &[u8], n: usize, kb: usize) -> Self {
        assert_eq!(
            bytes.len(),
            n * kb * BLOCK_BYTES,
            "q4k::Grouped: weight is not [n, kb] blocks"
        );
        let group_bytes = kb * GROUP_BLOCK;
        let mut lines = vec![Line([0; 64]); n.div_ceil(GROUP) * group_bytes / 64];
        lines
            .par_chunks_mut((group_bytes / 64).max(1))
            .enumerate()
            .for_each(|(g, group)| {
                // SAFETY: `Line` is 64 plain bytes; the group's lines are contiguous.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(group.as_mut_ptr().cast::<u8>(), group_bytes)
                };
                for r in g * GROUP..n.min((g + 1) * GROUP) {
                    let j = r % GROUP;
                    let row = &bytes[r * kb * BLOCK_BYTES..(r + 1) * kb * BLOCK_BYTES];
                    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                        let dst = &mut dst[b * GROUP_BLOCK..(b + 1) * GROUP_BLOCK];
                        for (i, &v) in block.iter().enumerate() {
                            dst[position(j, i)] = v;
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
        let at = (r / GROUP * self.kb + b) * GROUP_BLOCK;
        let src = &self.bytes()[at..at + GROUP_BLOCK];
        std::array::from_fn(|i| src[position(r % GROUP, i)])
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

    /// Bytes of the ggml blocks this holds (`n * kb * 144`, padding rows not counted).
    pub(crate) fn ggml_bytes(&self) -> usize {
        self.n * self.kb * BLOCK_BYTES
    }

    /// Rows `rows` dequantized into `out` (`rows.len() * k` floats), as ggml's
    /// `dequantize_row_q4_K` (and candle's `to_float`): `d·sc·q − dmin·m`.
    pub(crate) fn dequantize_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let k = self.kb * QK_K;
        assert!(rows.end <= self.n && out.len() == rows.len() * k);
        for (r, out) in rows.zip(out.chunks_exact_mut(k.max(1))) {
            for (b, y) in out.chunks_exact_mut(QK_K).enumerate() {
                dequantize_block(&self.block(r, b), y);
            }
        }
    }
}

/// One ggml Q4_K block into 256 floats, as ggml's `dequantize_row_q4_K`: `d·sc·q − dmin·m`.
pub(crate) fn dequantize_block(block: &[u8; BLOCK_BYTES], y: &mut [f32]) {
    let d = f16_bits(u16::from_le_bytes([block[0], block[1]]));
    let min = f16_bits(u16::from_le_bytes([block[2], block[3]]));
    let scales: &[u8; 12] = block[4..16].try_into().expect("12 bytes");
    for c in 0..QK_K / 64 {
        let q = &block[16 + 32 * c..16 + 32 * c + 32];
        let (sc, m) = scale_min(2 * c, scales);
        let (d1, m1) = (d * f32::from(sc), min * f32::from(m));
        let (sc, m) = scale_min(2 * c + 1, scales);
        let (d2, m2) = (d * f32::from(sc), min * f32::from(m));
        for (l, &q) in q.iter().enumerate() {
            y[64 * c + l] = d1 * f32::from(q & 0xF) - m1;
            y[64 * c + 32 + l] = d2 * f32::from(q >> 4) - m2;
        }
    }
}

/// An f16 (its bits) in f32.
pub(crate) fn f16_bits(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// ggml's `get_scale_min_k4`: sub-block `j`'s 6-bit scale and min from the packed 12 bytes.
pub(crate) fn scale_min(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Weight row `r` by one activation row `a` (`kb` blocks) in scalar code, the AVX2 kernel's
/// arithmetic exactly (see the module docs): the fallback and the tests' reference.
pub(crate) fn dot_reference(w: &Grouped, r: usize, a: &[BlockQ8K]) -> f32 {
    let (mut acc, mut accm) = (0f32, 0f32);
    for (b, a) in a.iter().enumerate() {
        let block = w.block(r, b);
        let d = f16_bits(u16::from_le_bytes([block[0], block[1]]));
        let dmin = f16_bits(u16::from_le_bytes([block[2], block[3]]));
        let scales: &[u8; 12] = block[4..16].try_into().expect("12 bytes");
        let (mut isum, mut msum) = (0i32, 0i32);
        for g in 0..QK_K / 32 {
            let (sc, m) = scale_min(g, scales);
            let (c, high) = (g / 2, g % 2 == 1);
            let mut s = 0i32;
            for l in 0..32 {
                let byte = block[16 + 32 * c + l];
                let q = if high { byte >> 4 } else { byte & 0xF };
                s += i32::from(q) * i32::from(a.qs[32 * g + l]);
            }
            isum += i32::from(sc) * s;
            let bsum = i32::from(a.bsums[2 * g]) + i32::from(a.bsums[2 * g + 1]);
            msum += i32::from(m) * bsum;
        }
        acc = (d * a.d).mul_add(isum as f32, acc);
        accm = (dmin * a.d).mul_add(msum as f32, accm);
    }
    acc - accm
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

/// Activation rows a register tile shares each weight load across.
const TILE_M: usize = 4;
/// Bytes of weights a task holds in L2 (of 512 KiB) for many activation rows.
const MANY_ROWS_TASK_BYTES: usize = 256 * 1024;
/// Bytes of weights a rayon task streams at least (one task per group would cost more in
/// scheduling than a 1024-wide group's 4.6 KB take to read).
const TASK_BYTES: usize = 64 * 1024;

/// Bytes ahead the kernel prefetches (about two super-blocks of a group): 0, 1 KiB and 4 KiB
/// measured no better at the 450M decode shapes (BENCHMARKS.md).
const PREFETCH_BYTES: usize = 2048;

/// `y [m, n] = a [m, k] . w [n, k]^T` for Q4_K weight rows `w` and Q8_K activation rows `a`
/// ([`quantize_rows`], `m * kb` blocks): `m * n` floats, row-major. Parallel over groups of
/// output columns; AVX2 where the CPU has it, else scalar code with the same arithmetic (the
/// same bits).
pub(crate) fn matmul(w: &Grouped, a: &[BlockQ8K], m: usize) -> Vec<f32> {
    let (n, kb) = (w.n, w.kb);
    assert_eq!(a.len(), m * kb, "q4k matmul: activation is not [m, k]");
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_available() {
        // Per activation block, the sums of its 8 sub-blocks paired as two `i16` in an `i32`
        // (`madd` partners of the mins): |sum| <= 32 x 128 fits.
        let pairs: Vec<[i32; 4]> = a
            .iter()
            .map(|a| {
                std::array::from_fn(|p| {
                    let s = |g: usize| i32::from(a.bsums[2 * g]) + i32::from(a.bsums[2 * g + 1]);
                    (s(2 * p) as u16 as i32) | ((s(2 * p + 1) as u16 as i32) << 16)
                })
            })
            .collect();
        let groups = n.div_ceil(GROUP);
        // Many rows: each task's weights stay in L2 while every activation tile passes over
        // them, so the activations are read once a task rather than once a group.
        // At least 8 tasks then, so that the two cores finish together.
        let (task_bytes, min_tasks) = if m > TILE_M {
            (MANY_ROWS_TASK_BYTES, 8)
        } else {
            (TASK_BYTES, 2)
        };
        let per_task =
            (task_bytes / (kb * GROUP_BLOCK).max(1)).clamp(1, groups.div_ceil(min_tasks));
        let dst = OutPtr(out.as_mut_ptr());
        (0..groups.div_ceil(per_task))
            .into_par_iter()
            .for_each(|t| {
                let groups = t * per_task..groups.min((t + 1) * per_task);
                // SAFETY: the CPU has AVX2, FMA and F16C; the groups exist; `a` and `pairs`
                // hold `m` rows of `kb` blocks; tasks write disjoint columns.
                unsafe { groups_rows_avx2(w, groups, a, &pairs, m, &dst) };
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

/// The outputs of groups `groups` for every activation row: `TILE_M` activation rows at a
/// time against each group in turn.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; the groups exist in `w`; `a`, `pairs` hold `m` rows
/// of `w.kb` blocks; `dst` points to `m * w.n` floats of which this call alone writes these
/// groups' columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn groups_rows_avx2(
    w: &Grouped,
    groups: std::ops::Range<usize>,
    a: &[BlockQ8K],
    pairs: &[[i32; 4]],
    m: usize,
    dst: &OutPtr,
) {
    let (n, kb) = (w.n, w.kb);
    let mut i = 0;
    while i < m {
        let rows = TILE_M.min(m - i);
        let (a, p) = (&a[i * kb..], &pairs[i * kb..]);
        for g in groups.clone() {
            let base = w.bytes()[g * kb * GROUP_BLOCK..].as_ptr();
            let cols = g * GROUP..n.min((g + 1) * GROUP);
            let mut out = [[0f32; GROUP]; TILE_M];
            // SAFETY: the group's `kb` super-blocks start at `base`; `rows` activation rows
            // follow `a` and `p`.
            unsafe {
                match rows {
                    4 => group_tile::<4>(base, kb, a, p, &mut out),
                    3 => group_tile::<3>(base, kb, a, p, &mut out),
                    2 => group_tile::<2>(base, kb, a, p, &mut out),
                    _ => group_tile::<1>(base, kb, a, p, &mut out),
                }
            }
            for (r, out) in out.iter().take(rows).enumerate() {
                // SAFETY: these outputs are in this call's columns of the `[m, n]` buffer.
                let y = unsafe {
                    std::slice::from_raw_parts_mut(dst.0.add((i + r) * n + cols.start), cols.len())
                };
                y.copy_from_slice(&out[..cols.len()]);
            }
        }
        i += rows;
    }
}

/// `M` activation rows against one group's 8 weight rows over all `kb` super-blocks.
///
/// # Safety
/// AVX2, FMA and F16C; `base` is a group's first super-block (64-byte aligned, `kb` of them);
/// `a` and `p` hold `M` rows of `kb` blocks.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
// Register arrays indexed by the tile's activation row.
#[allow(clippy::needless_range_loop)]
unsafe fn group_tile<const M: usize>(
    base: *const u8,
    kb: usize,
    a: &[BlockQ8K],
    p: &[[i32; 4]],
    out: &mut [[f32; GROUP]; TILE_M],
) {
    use std::arch::x86_64::*;
    let low4 = _mm256_set1_epi8(0x0F);
    let low6 = _mm256_set1_epi8(0x3F);
    let bits45 = _mm256_set1_epi8(0x30);
    let mut acc = [_mm256_setzero_ps(); M];
    let mut accm = [_mm256_setzero_ps(); M];
    for b in 0..kb {
        // SAFETY: super-block `b` of the group lies inside its bytes; the loads below are
        // aligned (the group starts on a line, a super-block is 18 lines, every load is at a
        // multiple of 32 inside it); a prefetch may point anywhere.
        unsafe {
            let blk = base.add(b * GROUP_BLOCK);
            let ahead = blk.wrapping_add(PREFETCH_BYTES);
            for line in 0..GROUP_BLOCK / 64 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line).cast());
            }
            // The 8 rows' scales and mins, `[sub-block][row]` bytes: sub-blocks 0-3 from the
            // low 6 bits of bytes 0-3 (scales) and 4-7 (mins), 4-7 from bytes 8-11's nibbles
            // and the top 2 bits of bytes 0-7.
            let x0 = _mm256_load_si256(blk.add(OFF_SCALES).cast());
            let x1 = _mm256_load_si256(blk.add(OFF_SCALES + 32).cast());
            let x2 = _mm256_load_si256(blk.add(OFF_SCALES + 64).cast());
            let sc_lo = _mm256_and_si256(x0, low6);
            let m_lo = _mm256_and_si256(x1, low6);
            let sc_hi = _mm256_or_si256(
                _mm256_and_si256(x2, low4),
                _mm256_and_si256(_mm256_srli_epi16(x0, 2), bits45),
            );
            let m_hi = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(x2, 4), low4),
                _mm256_and_si256(_mm256_srli_epi16(x1, 2), bits45),
            );
            // Each sub-block's scale as an `i16` pair per row (lane `r` = row `r`), the
            // `madd` partner of a row's two `i16` sums: the low 128 bits of `u_lo` are
            // sub-block 0, its high 128 bits 2, and so on.
            let u_lo = _mm256_unpacklo_epi8(sc_lo, sc_lo);
            let u_hi = _mm256_unpackhi_epi8(sc_lo, sc_lo);
            let v_lo = _mm256_unpacklo_epi8(sc_hi, sc_hi);
            let v_hi = _mm256_unpackhi_epi8(sc_hi, sc_hi);
            let scale_pairs = [
                (
                    _mm256_cvtepu8_epi16(_mm256_castsi256_si128(u_lo)),
                    _mm256_cvtepu8_epi16(_mm256_castsi256_si128(u_hi)),
                ),
                (
                    _mm256_cvtepu8_epi16(_mm256_extracti128_si256(u_lo, 1)),
                    _mm256_cvtepu8_epi16(_mm256_extracti128_si256(u_hi, 1)),
                ),
                (
                    _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v_lo)),
                    _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v_hi)),
                ),
                (
                    _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v_lo, 1)),
                    _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v_hi, 1)),
                ),
            ];
            // The mins of sub-blocks 2p and 2p + 1 as an `i16` pair per row.
            let w_lo = _mm256_unpacklo_epi8(m_lo, _mm256_srli_si256(m_lo, 8));
            let w_hi = _mm256_unpacklo_epi8(m_hi, _mm256_srli_si256(m_hi, 8));
            let min_pairs = [
                _mm256_cvtepu8_epi16(_mm256_castsi256_si128(w_lo)),
                _mm256_cvtepu8_epi16(_mm256_extracti128_si256(w_lo, 1)),
                _mm256_cvtepu8_epi16(_mm256_castsi256_si128(w_hi)),
                _mm256_cvtepu8_epi16(_mm256_extracti128_si256(w_hi, 1)),
            ];
            let mut isum = [_mm256_setzero_si256(); M];
            let mut msum = [_mm256_setzero_si256(); M];
            for i in 0..M {
                for (q, &pair) in min_pairs.iter().zip(&p[i * kb + b]) {
                    msum[i] =
                        _mm256_add_epi32(msum[i], _mm256_madd_epi16(*q, _mm256_set1_epi32(pair)));
                }
            }
            let qs = blk.add(OFF_QS);
            for (c, &(sc_l, sc_h)) in scale_pairs.iter().enumerate() {
                let mut sum_l = [_mm256_setzero_si256(); M];
                let mut sum_h = [_mm256_setzero_si256(); M];
                for v in 0..8 {
                    let bits = _mm256_load_si256(qs.add(256 * c + 32 * v).cast());
                    let lo = _mm256_and_si256(bits, low4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low4);
                    for i in 0..M {
                        let aq = a[i * kb + b].qs.as_ptr().add(64 * c + 4 * v);
                        let al = _mm256_set1_epi32(aq.cast::<i32>().read_unaligned());
                        let ah = _mm256_set1_epi32(aq.add(32).cast::<i32>().read_unaligned());
                        sum_l[i] = _mm256_add_epi16(sum_l[i], _mm256_maddubs_epi16(lo, al));
                        sum_h[i] = _mm256_add_epi16(sum_h[i], _mm256_maddubs_epi16(hi, ah));
                    }
                }
                for i in 0..M {
                    isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(sum_l[i], sc_l));
                    isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(sum_h[i], sc_h));
                }
            }
            let d = _mm256_cvtph_ps(_mm_load_si128(blk.cast()));
            let dmin = _mm256_cvtph_ps(_mm_load_si128(blk.add(OFF_DMIN).cast()));
            for i in 0..M {
                let da = _mm256_set1_ps(a[i * kb + b].d);
                acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(d, da), _mm256_cvtepi32_ps(isum[i]), acc[i]);
                accm[i] = _mm256_fmadd_ps(
                    _mm256_mul_ps(dmin, da),
                    _mm256_cvtepi32_ps(msum[i]),
                    accm[i],
                );
            }
        }
    }
    for i in 0..M {
        // SAFETY: `out[i]` is 8 floats.
        unsafe { _mm256_storeu_ps(out[i].as_mut_ptr(), _mm256_sub_ps(acc[i], accm[i])) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random byte stream.
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

    /// Random Q4_K blocks whose `d` and `dmin` are finite f16 values of moderate size.
    fn blocks(n: usize, kb: usize, seed: u64) -> Vec<u8> {
        let mut w = bytes(n * kb * BLOCK_BYTES, seed);
        for (i, block) in w.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            let d = half::f16::from_f32(0.001 + (i % 7) as f32 * 0.0013);
            let dmin = half::f16::from_f32(0.0005 + (i % 5) as f32 * 0.0007);
            block[0..2].copy_from_slice(&d.to_le_bytes());
            block[2..4].copy_from_slice(&dmin.to_le_bytes());
        }
        w
    }

    fn activations(m: usize, k: usize, seed: u64) -> Vec<f32> {
        bytes(m * k, seed)
            .iter()
            .enumerate()
            .map(|(i, &b)| (f32::from(b) - 127.5) / 64.0 * if i % 97 == 0 { 8.0 } else { 1.0 })
            .collect()
    }

    /// The Q8_K quantizer (AVX-512 where the CPU has it) gives the scalar loop's bits, which
    /// are candle's `from_float` (`quant::weight`'s test): halves of a step round away from
    /// zero, the first of two largest magnitudes of opposite signs sets `max`'s sign, a zero
    /// block, a NaN and infinities, and random rows.
    #[test]
    fn q8_k_quantizer_equals_the_scalar_loop() {
        let mut x = activations(6, QK_K, 3);
        // Block 0: `max` = -2 found before +2, so `iscale` = 63.5 and 0.5 / 63.5 steps land on
        // halves.
        x[..QK_K].fill(0.0);
        x[7] = -2.0;
        x[100] = 2.0;
        for (i, h) in [0.5f32, 1.5, 2.5, -0.5, -3.5, 126.5].iter().enumerate() {
            x[10 + i] = -h / 63.5;
        }
        // Block 1 is zero, block 2 holds a NaN, block 3 an infinity.
        x[QK_K..2 * QK_K].fill(0.0);
        x[2 * QK_K + 9] = f32::NAN;
        x[3 * QK_K + 200] = f32::NEG_INFINITY;
        let got = quantize_rows(&x, QK_K);
        let want = quantize_rows_scalar(&x, QK_K);
        for (b, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                (g.d.to_bits(), g.qs, g.bsums),
                (w.d.to_bits(), w.qs, w.bsums),
                "block {b}"
            );
        }
        assert_eq!(&got[0].qs[10..16], &[-1, -2, -3, 1, 4, -127]);
        assert_eq!(got[0].qs[7], -127);
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
            assert_eq!(g.bytes().len(), n.div_ceil(8) * kb * 1152);
        }
        // Every byte of a group's super-block is some row's byte, exactly once.
        let mut seen = [false; GROUP_BLOCK];
        for j in 0..GROUP {
            for i in 0..BLOCK_BYTES {
                assert!(!std::mem::replace(&mut seen[position(j, i)], true));
            }
        }
    }

    /// The kernel (AVX2 here where the CPU has it) equals the scalar reference bit for bit
    /// for 1 to 9 activation rows (tiles of 4 and their remainders, several groups a task) and
    /// output counts that are not whole groups; the reference is within f32 rounding of an f64
    /// dot product from the blocks' integers and scales and the Q8_K activations.
    #[test]
    fn kernel_equals_the_scalar_reference_and_f64() {
        for (m, n, kb) in [
            (1, 1, 1),
            (1, 13, 2),
            (3, 70, 4),
            (2, 8, 1),
            (4, 17, 3),
            (6, 9, 2),
            (9, 40, 2),
        ] {
            let k = kb * QK_K;
            let w = Grouped::from_ggml(&blocks(n, kb, 11 + n as u64), n, kb);
            let a = quantize_rows(&activations(m, k, 5 + m as u64), k);
            let got = matmul(&w, &a, m);
            for i in 0..m {
                for r in 0..n {
                    let a = &a[i * kb..(i + 1) * kb];
                    let want = dot_reference(&w, r, a);
                    let g = got[i * n + r];
                    assert_eq!(g.to_bits(), want.to_bits(), "[{m}, {n}, {kb}] ({i}, {r})");
                    let (exact, size) = exact_dot(&w, r, a);
                    // f32 rounding of the per-block scale products, conversions and FMAs: a
                    // few ulps of the terms' magnitude.
                    let tol = 4.0 * f64::from(f32::EPSILON) * size * (kb as f64 + 1.0);
                    assert!(
                        (f64::from(g) - exact).abs() <= tol,
                        "[{m}, {n}, {kb}] ({i}, {r}): {g} vs {exact} (tolerance {tol})"
                    );
                }
            }
        }
    }

    /// Row `r` by `a` in f64 from the blocks' integers and scales (`d·sc·q − dmin·m` times
    /// `d_a·q_a`), and the sum of the magnitudes of both parts of every term.
    fn exact_dot(w: &Grouped, r: usize, a: &[BlockQ8K]) -> (f64, f64) {
        let (mut exact, mut size) = (0f64, 0f64);
        for (b, a) in a.iter().enumerate() {
            let block = w.block(r, b);
            let d = f64::from(f16_bits(u16::from_le_bytes([block[0], block[1]])));
            let dmin = f64::from(f16_bits(u16::from_le_bytes([block[2], block[3]])));
            let scales: &[u8; 12] = block[4..16].try_into().unwrap();
            for (l, &qa) in a.qs.iter().enumerate() {
                let (sc, m) = scale_min(l / 32, scales);
                let byte = block[16 + 32 * (l / 64) + l % 32];
                let q = if (l / 32) % 2 == 1 {
                    byte >> 4
                } else {
                    byte & 0xF
                };
                let (wq, wm) = (d * f64::from(sc) * f64::from(q), dmin * f64::from(m));
                let x = f64::from(a.d) * f64::from(qa);
                exact += (wq - wm) * x;
                size += (wq.abs() + wm.abs()) * x.abs();
            }
        }
        (exact, size)
    }

    /// The extremes of the integer arithmetic: every nibble 15 against activations of -128 and
    /// 127 (the largest `i16` sums), scales and mins of 63.
    #[test]
    fn saturating_extremes_match_the_reference() {
        let (n, kb) = (8, 2);
        let mut w = blocks(n, kb, 1);
        for block in w.chunks_exact_mut(BLOCK_BYTES) {
            block[4..16].fill(0xFF);
            block[16..].fill(0xFF);
        }
        let g = Grouped::from_ggml(&w, n, kb);
        for fill in [-128i8, 127] {
            let mut a = quantize_rows(&vec![1.0; kb * QK_K], kb * QK_K);
            for a in &mut a {
                a.qs = [fill; QK_K];
                a.bsums = [i16::from(fill) * 16; QK_K / 16];
            }
            let got = matmul(&g, &a, 1);
            for (r, &v) in got.iter().enumerate() {
                let want = dot_reference(&g, r, &a);
                assert_eq!(v.to_bits(), want.to_bits(), "{fill}: row {r}");
                // Per super-block `(d·63·15 − dmin·63)·256·fill·d_a`, summed in f64.
                let (exact, size) = exact_dot(&g, r, &a);
                let tol = 4.0 * f64::from(f32::EPSILON) * size * 3.0;
                assert!(
                    (f64::from(v) - exact).abs() <= tol,
                    "{fill}: {v} vs {exact}"
                );
            }
        }
    }
}
