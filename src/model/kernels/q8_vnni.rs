//! Products by Q8_0 weights on CPUs with AVX-512 VNNI (`avx512f`, `avx512bw`, `avx512vnni`):
//! weight tiles of 16 output rows multiplied by Q8_0 activation blocks with `vpdpbusd`, for
//! every row count (decode steps, prefill, the vision tower).
//!
//! Why not candle's repacked tiles (`candle_core::quantized::repack_x86`, which `QMatMul` runs
//! there): candle quantizes the activations with its scalar `BlockQ8K::from_float` (a vision
//! tower profile spent ~10% of its time there, about 40% of its product time), and its tile is
//! 4 activation rows x 16 outputs. Here activations are quantized by AVX-512 code once per
//! product, and a register tile holds up to 4 rows x 3 tiles of 16 outputs (12 integer and 12
//! f32 accumulators); BENCHMARKS.md ("Q8_0 on our VNNI kernel") has the measurements.
//!
//! Layout ([`Tiled`]): for tile `t` (rows `16t..16t + 16`, zero rows past `n`) and block `b`
//! (32 values), 512 bytes `[8 groups of 4 k][16 rows][4 bytes]` holding `q + 128` as `u8`,
//! so `vpdpbusd` takes a 64-byte line of weights as its unsigned operand and one broadcast
//! 4-byte group of activation quants as its signed one; and the 16 rows' f16 scales apart.
//! The bytes are ggml's blocks permuted (and offset): [`Tiled::to_blocks`] gives them back.
//!
//! Arithmetic: `sum((q_w + 128) * q_a) = sum(q_w * q_a) + 128 * sum(q_a)`, so each block's
//! `i32` accumulator starts from `-128 * sum(q_a)` (computed once per activation block when
//! quantizing, [`ActBlock::bias`]) and ends as the exact integer block dot. Then per block
//! `acc = fma(f32(dot) * d_w, d_a, acc)`, one f32 accumulator per output, blocks in order: every
//! output is the same bits whatever the tiling or threads ([`reference_dot`] is that
//! arithmetic in scalar code; it is also the fallback where the CPU lacks the instructions).
//! Activations are quantized as ggml's x86 `quantize_row_q8_0` does ([`quantize_rows`]), so this
//! computes ggml's `Q8_0 x Q8_0` block dots, summed in another order.

use rayon::prelude::*;

use super::q8::{BlockQ8_0, QK8_0};
use super::tasks::{OutPtr, for_each_block};

/// Output rows of a weight tile (one `zmm` of `i32`/`f32` lanes).
pub(crate) const TILE: usize = 16;
/// 4-value groups per block (`vpdpbusd` multiplies 4 bytes per lane).
const GROUPS: usize = QK8_0 / 4;
/// Bytes of one tile's quants for one block.
const TILE_BLOCK: usize = QK8_0 * TILE;

/// Whether this CPU runs [`matmul`]'s AVX-512 VNNI kernel (else the scalar reference runs).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One 64-byte line (its alignment is the point: one aligned `zmm` load per group).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Q8_0 weight rows `[n, k]` in tiles of 16 rows (see the module docs): `quants` holds tile
/// `t`'s block `b` at lines `(t * kb + b) * 8 ..`, `scales` its 16 f16 scales (bits) at
/// `(t * kb + b) * 16 ..`.
pub(crate) struct Tiled {
    quants: Vec<Line>,
    scales: Vec<u16>,
    n: usize,
    kb: usize,
}

impl std::fmt::Debug for Tiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tiled([{}, {}])", self.n, self.kb * QK8_0)
    }
}

impl Tiled {
    /// Tiles `n` rows of `kb` ggml blocks.
    pub(crate) fn from_blocks(w: &[BlockQ8_0], n: usize, kb: usize) -> Self {
        assert_eq!(w.len(), n * kb, "Tiled: weight is not [n, kb] blocks");
        let tiles = n.div_ceil(TILE);
        let lines_per_tile = kb * TILE_BLOCK / 64;
        let mut quants = vec![Line([128; 64]); tiles * lines_per_tile];
        let mut scales = vec![0u16; tiles * kb * TILE];
        // Tiles are independent; each fills its own lines and scales.
        quants
            .par_chunks_mut(lines_per_tile.max(1))
            .zip(scales.par_chunks_mut((kb * TILE).max(1)))
            .enumerate()
            .for_each(|(t, (lines, scales))| {
                for r in t * TILE..n.min((t + 1) * TILE) {
                    let row = r % TILE;
                    for (b, block) in w[r * kb..(r + 1) * kb].iter().enumerate() {
                        scales[b * TILE + row] = u16::from_le_bytes(block.d);
                        for g in 0..GROUPS {
                            let line = &mut lines[b * GROUPS + g].0;
                            for i in 0..4 {
                                line[row * 4 + i] = (block.qs[g * 4 + i] as u8) ^ 0x80;
                            }
                        }
                    }
                }
            });
        Self {
            quants,
            scales,
            n,
            kb,
        }
    }

    /// Bytes of the ggml blocks this holds (`n * kb * 34`, padding rows not counted).
    pub(crate) fn ggml_bytes(&self) -> usize {
        self.n * self.kb * std::mem::size_of::<BlockQ8_0>()
    }

    fn quant_bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes, so the lines are `64 * len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.quants.as_ptr().cast(), self.quants.len() * 64) }
    }

    /// Row `r`'s block `b` as ggml holds it.
    fn block(&self, r: usize, b: usize) -> BlockQ8_0 {
        let (t, row) = (r / TILE, r % TILE);
        let base = (t * self.kb + b) * TILE_BLOCK;
        let bytes = &self.quant_bytes()[base..base + TILE_BLOCK];
        BlockQ8_0 {
            d: self.scales[(t * self.kb + b) * TILE + row].to_le_bytes(),
            qs: std::array::from_fn(|i| (bytes[(i / 4) * 64 + row * 4 + i % 4] ^ 0x80) as i8),
        }
    }

    /// The ggml blocks again, row by row (what a GGUF file or candle's `QTensor` holds).
    pub(crate) fn to_blocks(&self) -> Vec<BlockQ8_0> {
        (0..self.n)
            .flat_map(|r| (0..self.kb).map(move |b| (r, b)))
            .map(|(r, b)| self.block(r, b))
            .collect()
    }

    /// Rows `rows` dequantized into `out` (`rows.len() * k` floats), as candle's
    /// `BlockQ8_0::to_float` (`d * q`, exact in f32).
    pub(crate) fn dequantize_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let k = self.kb * QK8_0;
        assert!(rows.end <= self.n && out.len() == rows.len() * k);
        for (r, out) in rows.zip(out.chunks_exact_mut(k.max(1))) {
            for (b, out) in out.chunks_exact_mut(QK8_0).enumerate() {
                let block = self.block(r, b);
                let d = half::f16::from_le_bytes(block.d).to_f32();
                for (o, &q) in out.iter_mut().zip(&block.qs) {
                    *o = f32::from(q) * d;
                }
            }
        }
    }
}

/// One quantized activation block: ggml's Q8_0 quants, the scale widened from its f16 value,
/// and `-128 * sum(qs)`, where each weight block's integer accumulator starts (module docs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ActBlock {
    qs: [i8; QK8_0],
    d: f32,
    bias: i32,
}

const ZERO_BLOCK: ActBlock = ActBlock {
    qs: [0; QK8_0],
    d: 0.0,
    bias: 0,
};

/// `x [m, k]` (row-major, `k` a multiple of 32) quantized into `m * k / 32` blocks as ggml's
/// x86 `quantize_row_q8_0` does: `amax = max |x|`, `d = f16(amax / 127)`, `q = x * (127 / amax)`
/// rounded to nearest, ties to even (`_mm256_round_ps(_MM_ROUND_NEAREST)` there, the
/// `cvtps2dq` default here); the kernel then uses `d` as the f16 scale widened to f32, as ggml
/// does. AVX-512 where [`available`], else scalar code computing the same bits.
pub(crate) fn quantize_rows(x: &[f32], k: usize) -> Vec<ActBlock> {
    assert!(
        k.is_multiple_of(QK8_0) && x.len().is_multiple_of(k.max(1)),
        "quantize_rows: rows of {k} are not whole blocks"
    );
    let blocks = x.len() / QK8_0;
    // Every block is written below: no zeroing pass first.
    let mut out = Vec::with_capacity(blocks);
    let vector = available();
    // Blocks are independent; 512 a task keeps rayon's overhead small for one decode row.
    out.spare_capacity_mut()[..blocks]
        .par_chunks_mut(512)
        .zip(x.par_chunks(512 * QK8_0))
        .for_each(|(o, x)| {
            #[cfg(target_arch = "x86_64")]
            if vector {
                // SAFETY: the CPU has AVX-512F/BW (checked by `available`).
                return unsafe { quantize_blocks_avx512(x, o) };
            }
            let _ = vector;
            for (o, x) in o.iter_mut().zip(x.chunks_exact(QK8_0)) {
                o.write(quantize_block_scalar(x));
            }
        });
    // SAFETY: the chunks cover the first `blocks` slots and each wrote all of its blocks.
    unsafe { out.set_len(blocks) };
    out
}

/// One block quantized in scalar code (the reference of [`quantize_blocks_avx512`]).
fn quantize_block_scalar(x: &[f32]) -> ActBlock {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = half::f16::from_f32(amax / 127.0).to_f32();
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let qs: [i8; QK8_0] =
        std::array::from_fn(|i| (x[i] * id).round_ties_even().clamp(-128.0, 127.0) as i8);
    let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
    ActBlock {
        qs,
        d,
        bias: -128 * sum,
    }
}

/// [`quantize_block_scalar`] over whole blocks with AVX-512: the same operations per value
/// (`|x|` max, one multiply by `127 / amax`, round to nearest even), so the same bits.
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn quantize_blocks_avx512(x: &[f32], out: &mut [std::mem::MaybeUninit<ActBlock>]) {
    use std::arch::x86_64::*;
    for (o, x) in out.iter_mut().zip(x.chunks_exact(QK8_0)) {
        let mut block = ZERO_BLOCK;
        // SAFETY: `x` is 32 floats; `block.qs` 32 bytes.
        unsafe {
            let x0 = _mm512_loadu_ps(x.as_ptr());
            let x1 = _mm512_loadu_ps(x.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
                _mm_set_ss(amax / 127.0),
            )));
            let id = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            const ROUND: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
            let q0 = _mm512_cvt_roundps_epi32::<ROUND>(_mm512_mul_ps(x0, id));
            let q1 = _mm512_cvt_roundps_epi32::<ROUND>(_mm512_mul_ps(x1, id));
            _mm_storeu_si128(block.qs.as_mut_ptr().cast(), _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128(
                block.qs.as_mut_ptr().add(16).cast(),
                _mm512_cvtsepi32_epi8(q1),
            );
            block.d = d;
            block.bias = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        }
        o.write(block);
    }
}

/// Output `(i, o)`'s value as the kernel computes it, in scalar code: per block the exact
/// integer dot (started from the activation's bias, over the `+128` weights, as `vpdpbusd`
/// adds), then `acc = fma(f32(dot) * d_w, d_a, acc)`, blocks in order.
fn reference_dot(w: &Tiled, o: usize, a: &[ActBlock]) -> f32 {
    let (t, row) = (o / TILE, o % TILE);
    let bytes = w.quant_bytes();
    let mut acc = 0f32;
    for (b, a) in a.iter().enumerate() {
        let base = (t * w.kb + b) * TILE_BLOCK;
        let mut dot = a.bias;
        for (i, &q) in a.qs.iter().enumerate() {
            dot += i32::from(bytes[base + (i / 4) * 64 + row * 4 + i % 4]) * i32::from(q);
        }
        let dw = half::f16::from_bits(w.scales[(t * w.kb + b) * TILE + row]).to_f32();
        acc = (dot as f32 * dw).mul_add(a.d, acc);
    }
    acc
}

/// Activation rows of a register tile for many rows.
const TILE_M: usize = 4;
/// Weight tiles of a register tile for more than 3 rows: 4 x 3 integer and 4 x 3 f32
/// accumulators and 3 weight lines are 27 of the 32 `zmm` registers.
const TILES_N: usize = 3;
/// Weight tiles of a register tile for 1-3 rows (decode): 4 weight streams a task. No software
/// prefetch: the hardware's kept a decode step's products at the speed of a 2-thread read of
/// the same bytes, and prefetching 2 or 4 KiB ahead measured no better (`measure` below).
const TILES_N_FEW: usize = 4;
/// Activation rows of one parallel task for many rows: the task's weight tiles (`3 * kb * 512`
/// bytes, 147 KiB at k = 3072) stay in L2 while its rows stream past.
const ROWS_PER_TASK: usize = 64;

/// `y [m, n] = a [m, k] . w [n, k]^T` for tiled Q8_0 weights `w` and quantized activation rows
/// `a` ([`quantize_rows`], `m * k / 32` blocks): `m * n` floats, row-major. Parallel over tiles
/// (and rows for many rows); the AVX-512 VNNI kernel where [`available`], else the scalar
/// reference (the same bits either way).
pub(crate) fn matmul(w: &Tiled, a: &[ActBlock], m: usize) -> Vec<f32> {
    let (n, kb) = (w.n, w.kb);
    assert_eq!(a.len(), m * kb, "q8_vnni matmul: activation is not [m, k]");
    if m == 0 || n == 0 {
        return vec![0f32; m * n];
    }
    #[cfg(target_arch = "x86_64")]
    if available() {
        // Every output is stored by one task below: no zeroing pass first.
        let mut out = Vec::with_capacity(m * n);
        let tiles = n.div_ceil(TILE);
        let (rows_per_task, tiles_per_task) = if m < TILE_M {
            (m, TILES_N_FEW)
        } else {
            (ROWS_PER_TASK, TILES_N)
        };
        let dst = OutPtr(out.as_mut_ptr());
        for_each_block(tiles, m, tiles_per_task, rows_per_task, |tiles, rows| {
            // SAFETY: the CPU has AVX-512F/BW/VNNI; the tiles and rows exist; tasks write
            // disjoint outputs of the `m * n` buffer.
            unsafe { block_avx512(w, a, tiles, rows, &dst) };
        });
        // SAFETY: the tasks cover every (row, tile) once and store each of the `m * n` outputs.
        unsafe { out.set_len(m * n) };
        return out;
    }
    let mut out = vec![0f32; m * n];
    out.par_chunks_mut(n)
        .zip(a.par_chunks(kb))
        .for_each(|(y, a)| {
            for (o, y) in y.iter_mut().enumerate() {
                *y = reference_dot(w, o, a);
            }
        });
    out
}

/// Outputs of rows `rows` by tiles `tiles`, one register tile after another.
///
/// # Safety
/// As [`tile`]: the CPU has AVX-512F/BW/VNNI; `a` holds the rows, `w` the tiles; `dst` points
/// to `m * w.n` floats of which this call alone writes these outputs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block_avx512(
    w: &Tiled,
    a: &[ActBlock],
    tiles: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    dst: &OutPtr,
) {
    let (n, kb) = (w.n, w.kb);
    // 4 rows x 4 tiles would need 32 accumulators: 4 rows take 3 tiles.
    let tiles_step = if rows.len() < TILE_M {
        TILES_N_FEW
    } else {
        TILES_N
    };
    let mut i = rows.start;
    while i < rows.end {
        let rm = TILE_M.min(rows.end - i);
        let mut t = tiles.start;
        while t < tiles.end {
            let rn = tiles_step.min(tiles.end - t);
            let last = t + rn == n.div_ceil(TILE);
            let args = TileArgs {
                wq: w.quant_bytes()[t * kb * TILE_BLOCK..].as_ptr(),
                ws: w.scales[t * kb * TILE..].as_ptr(),
                a: a[i * kb..].as_ptr(),
                kb,
                // SAFETY: (the offset) output `(i, 16t)` lies inside the `[m, n]` buffer.
                c: unsafe { dst.0.add(i * n + t * TILE) },
                ldc: n,
                last_lanes: if last { n - (t + rn - 1) * TILE } else { TILE },
            };
            // SAFETY: rows `i..i + rm` of `a` and tiles `t..t + rn` of `w` exist; the outputs
            // are this task's.
            unsafe {
                match (rm, rn) {
                    (4, 3) => tile::<4, 3>(&args),
                    (4, 2) => tile::<4, 2>(&args),
                    (4, 1) => tile::<4, 1>(&args),
                    (3, 4) => tile::<3, 4>(&args),
                    (3, 3) => tile::<3, 3>(&args),
                    (3, 2) => tile::<3, 2>(&args),
                    (3, 1) => tile::<3, 1>(&args),
                    (2, 4) => tile::<2, 4>(&args),
                    (2, 3) => tile::<2, 3>(&args),
                    (2, 2) => tile::<2, 2>(&args),
                    (2, 1) => tile::<2, 1>(&args),
                    (1, 4) => tile::<1, 4>(&args),
                    (1, 3) => tile::<1, 3>(&args),
                    (1, 2) => tile::<1, 2>(&args),
                    (1, 1) => tile::<1, 1>(&args),
                    _ => unreachable!("tile {rm}x{rn}"),
                }
            }
            t += rn;
        }
        i += rm;
    }
}

/// One register tile's operands: `RN` weight tiles from `wq`/`ws` (tile `j` at `j * kb` blocks
/// on), `RM` activation rows from `a` (row stride `kb`), outputs at `c` with row stride `ldc`;
/// the last tile writes its first `last_lanes` outputs only (a weight whose `n` is not whole
/// tiles).
#[cfg(target_arch = "x86_64")]
struct TileArgs {
    wq: *const u8,
    ws: *const u16,
    a: *const ActBlock,
    kb: usize,
    c: *mut f32,
    ldc: usize,
    last_lanes: usize,
}

/// `RM x 16 RN` outputs over all `kb` blocks (the arithmetic of [`reference_dot`]).
///
/// # Safety
/// The CPU has AVX-512F/BW/VNNI; `RM` activation rows of `kb` blocks behind `t.a`, `RN` tiles
/// of `kb` blocks behind `t.wq`/`t.ws`, the outputs writable at `t.c`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
// Register arrays indexed by the tile's row and column, as the loops nest.
#[allow(clippy::needless_range_loop)]
unsafe fn tile<const RM: usize, const RN: usize>(t: &TileArgs) {
    use std::arch::x86_64::*;
    let kb = t.kb;
    let mut acc = [[_mm512_setzero_ps(); RN]; RM];
    for b in 0..kb {
        // SAFETY: block `b` of every row and tile exists (the caller's contract); the weight
        // lines are 64-byte aligned (`Line`).
        unsafe {
            let mut dot = [[_mm512_setzero_si512(); RN]; RM];
            for i in 0..RM {
                let bias = _mm512_set1_epi32((*t.a.add(i * kb + b)).bias);
                for j in 0..RN {
                    dot[i][j] = bias;
                }
            }
            let wb = t.wq.add(b * TILE_BLOCK);
            for g in 0..GROUPS {
                let mut wv = [_mm512_setzero_si512(); RN];
                for j in 0..RN {
                    wv[j] = _mm512_load_si512(wb.add(j * kb * TILE_BLOCK + g * 64).cast());
                }
                for i in 0..RM {
                    let qs = (*t.a.add(i * kb + b)).qs.as_ptr().add(g * 4);
                    let av = _mm512_set1_epi32(qs.cast::<i32>().read_unaligned());
                    for j in 0..RN {
                        dot[i][j] = _mm512_dpbusd_epi32(dot[i][j], wv[j], av);
                    }
                }
            }
            let mut dw = [_mm512_setzero_ps(); RN];
            for j in 0..RN {
                let s = t.ws.add(j * kb * TILE + b * TILE);
                dw[j] = _mm512_cvtph_ps(_mm256_loadu_si256(s.cast()));
            }
            for i in 0..RM {
                let da = _mm512_set1_ps((*t.a.add(i * kb + b)).d);
                for j in 0..RN {
                    let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[i][j]), dw[j]);
                    acc[i][j] = _mm512_fmadd_ps(scaled, da, acc[i][j]);
                }
            }
        }
    }
    let last_mask: __mmask16 = if t.last_lanes == TILE {
        !0
    } else {
        (1u16 << t.last_lanes) - 1
    };
    for i in 0..RM {
        for j in 0..RN {
            let mask = if j == RN - 1 { last_mask } else { !0 };
            // SAFETY: the tile's outputs (the first `last_lanes` of the last one) are writable.
            unsafe { _mm512_mask_storeu_ps(t.c.add(i * t.ldc + j * TILE), mask, acc[i][j]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::q8;
    use crate::model::kernels::test_values;

    fn weight(n: usize, k: usize, seed: u32) -> Vec<BlockQ8_0> {
        q8::quantize_rows(&test_values(n * k, seed), k)
    }

    /// Activations of varied magnitude per block (so scales differ), with a zero block.
    fn activations(m: usize, k: usize, seed: u32) -> Vec<f32> {
        let mut x = test_values(m * k, seed);
        for (i, v) in x.iter_mut().enumerate() {
            *v *= 1.0 + (i / QK8_0 % 7) as f32;
        }
        if m * k >= 64 {
            x[32..64].fill(0.0);
        }
        x
    }

    /// Tiling is a permutation with an offset: the ggml blocks come back unchanged (including
    /// the -128 a GGUF file may hold), for `n` not whole tiles; rows dequantize as candle's
    /// `to_float`.
    #[test]
    fn tiles_round_trip_to_ggml_blocks() {
        for (n, kb) in [(1, 1), (13, 3), (16, 4), (70, 36)] {
            let mut w = weight(n, kb * QK8_0, 5 + n as u32);
            w[0].qs[0] = -128;
            w[n * kb - 1].qs[31] = 127;
            let t = Tiled::from_blocks(&w, n, kb);
            assert_eq!(t.to_blocks(), w, "[{n}, {kb} blocks]");
            assert_eq!(t.ggml_bytes(), n * kb * 34);
            let mut got = vec![0f32; n * kb * QK8_0];
            t.dequantize_rows(0..n, &mut got);
            let want: Vec<f32> = w
                .iter()
                .flat_map(|b| {
                    let d = half::f16::from_le_bytes(b.d).to_f32();
                    b.qs.map(|q| f32::from(q) * d)
                })
                .collect();
            assert_eq!(got, want);
        }
    }

    /// The bias algebra: over `+128` weights, starting from `-128 * sum(q_a)` gives the signed
    /// integer dot, at the extremes too (-128 and 127 weights, -127 and 127 activations).
    #[test]
    fn offset_weights_with_the_bias_give_the_signed_dot() {
        let patterns: [fn(usize) -> (i8, i8); 4] = [
            |i| (if i % 2 == 0 { -128 } else { 127 }, 127),
            |i| (-128, if i % 3 == 0 { -127 } else { 127 }),
            |i| ((i as i8).wrapping_mul(37), (i as i8).wrapping_mul(-11)),
            |_| (127, -127),
        ];
        for pattern in patterns {
            let (w, a): (Vec<i8>, Vec<i8>) = (0..QK8_0).map(pattern).unzip();
            let signed: i32 = w
                .iter()
                .zip(&a)
                .map(|(&w, &a)| i32::from(w) * i32::from(a))
                .sum();
            let bias = -128 * a.iter().map(|&a| i32::from(a)).sum::<i32>();
            let offset: i32 = w
                .iter()
                .zip(&a)
                .map(|(&w, &a)| i32::from((w as u8) ^ 0x80) * i32::from(a))
                .sum();
            assert_eq!(bias + offset, signed);
        }
        // Through the kernel: one block of weights -128/127 by activations at their extremes.
        let w = [BlockQ8_0 {
            d: half::f16::from_f32(1.0).to_le_bytes(),
            qs: std::array::from_fn(|i| if i % 2 == 0 { -128 } else { 127 }),
        }];
        let mut x = [127f32; 32];
        x[1] = -127.0;
        let a = quantize_rows(&x, 32);
        let want = (-128.0 * 127.0) * 16.0 + (127.0 * -127.0) + (127.0 * 127.0) * 15.0;
        assert_eq!(matmul(&Tiled::from_blocks(&w, 1, 1), &a, 1), vec![want]);
    }

    /// The AVX-512 quantizer gives the scalar code's bits (ggml's x86 rounding: ties to even,
    /// `x * (127 / amax)`, the scale rounded to f16), zero blocks included.
    #[test]
    fn quantizer_equals_the_scalar_reference() {
        let mut x = activations(3, 320, 9);
        x[0] = 2.5 / 127.0 * 127.0;
        x[100] = -7.0;
        let got = quantize_rows(&x, 320);
        let want: Vec<ActBlock> = x.chunks_exact(QK8_0).map(quantize_block_scalar).collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((g.qs, g.d.to_bits(), g.bias), (w.qs, w.d.to_bits(), w.bias));
        }
        assert_eq!(got[1], ZERO_BLOCK);
        // Ties go to even: 0.5 and 1.5 (of the step) round to 0 and 2, -2.5 to -2.
        let mut t = [0f32; 32];
        t[..4].copy_from_slice(&[127.0, 0.5, 1.5, -2.5]);
        assert_eq!(&quantize_rows(&t, 32)[0].qs[..4], &[127, 0, 2, -2]);
    }

    /// The kernel equals the scalar reference bit for bit: one to a few rows (decode), odd row
    /// counts, `n` not whole tiles or tile groups, several widths.
    #[test]
    fn kernel_equals_the_scalar_reference_bitwise() {
        for (m, n, k) in [
            (1, 1, 32),
            (1, 70, 96),
            (2, 16, 64),
            (3, 100, 128),
            (4, 48, 32),
            (5, 33, 160),
            (9, 130, 256),
            (67, 200, 96),
            (130, 64, 64),
        ] {
            let w = Tiled::from_blocks(&weight(n, k, 1 + n as u32), n, k / QK8_0);
            let a = quantize_rows(&activations(m, k, 2 + m as u32), k);
            let got = matmul(&w, &a, m);
            let want: Vec<f32> = a
                .chunks_exact(k / QK8_0)
                .flat_map(|a| (0..n).map(|o| reference_dot(&w, o, a)).collect::<Vec<_>>())
                .collect();
            let same = got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(same, "[{m}, {k}] x [{n}, {k}]");
        }
    }

    /// Within the quantization error of the activations of the f32 product by the dequantized
    /// weights: per value `|x - d q| <= amax (1/254 + 2^-11)` (rounding to the step, then `d`
    /// rounded to f16), so per output `sum_b amax_b sum_i |w_i| (1/254 + 2^-11)`, plus f32
    /// rounding.
    #[test]
    fn close_to_the_f32_product_with_the_dequantized_weight() {
        let (m, n, k) = (5, 40, 256);
        let blocks = weight(n, k, 3);
        let w = Tiled::from_blocks(&blocks, n, k / QK8_0);
        let x = activations(m, k, 4);
        let got = matmul(&w, &quantize_rows(&x, k), m);
        let mut dense = vec![0f32; n * k];
        w.dequantize_rows(0..n, &mut dense);
        for i in 0..m {
            let x = &x[i * k..(i + 1) * k];
            for o in 0..n {
                let wr = &dense[o * k..(o + 1) * k];
                let exact: f64 = x.iter().zip(wr).map(|(&x, &w)| f64::from(x * w)).sum();
                let bound: f64 = x
                    .chunks_exact(QK8_0)
                    .zip(wr.chunks_exact(QK8_0))
                    .map(|(x, w)| {
                        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let wsum: f32 = w.iter().map(|v| v.abs()).sum();
                        f64::from(amax * wsum) * (1.0 / 254.0 + 1.0 / 2048.0)
                    })
                    .sum();
                let err = (f64::from(got[i * n + o]) - exact).abs();
                assert!(err <= bound * 1.01 + 1e-4, "({i}, {o}): {err} > {bound}");
            }
        }
    }
}

#[cfg(test)]
mod measure {
    use super::*;
    use crate::model::kernels::{q8, test_values};
    use candle_core::Module as _;

    fn candle(w: &[BlockQ8_0], n: usize, k: usize) -> candle_core::quantized::QMatMul {
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            candle_core::quantized::GgmlDType::Q8_0,
            q8::blocks_as_bytes(w),
            vec![n, k],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        candle_core::quantized::QMatMul::from_qtensor(q).unwrap()
    }

    fn best_of(rounds: usize, reps: usize, f: &dyn Fn()) -> f64 {
        let mut best = f64::MAX;
        for _ in 0..rounds {
            let s = std::time::Instant::now();
            for _ in 0..reps {
                f();
            }
            best = best.min(s.elapsed().as_secs_f64() * 1e3 / reps as f64);
        }
        best
    }

    /// Our product (quantize + kernel) against candle's `QMatMul` at the 450M shapes, and one
    /// decode step's products over distinct weights (so from memory, not cache)
    /// (`cargo test --release --lib q8_vnni::measure -- --ignored --nocapture`).
    #[test]
    #[ignore = "measurement"]
    fn against_candle() {
        let dev = candle_core::Device::Cpu;
        for (m, n, k) in [
            (768, 3072, 768),
            (768, 768, 3072),
            (270, 4608, 1024),
            (270, 1024, 4608),
        ] {
            let w = q8::quantize_rows(&test_values(n * k, 3), k);
            let t = Tiled::from_blocks(&w, n, k / QK8_0);
            let x = test_values(m * k, 5);
            let mm = candle(&w, n, k);
            let xt = candle_core::Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
            let _ = mm.forward(&xt).unwrap();
            let theirs = best_of(3, 10, &|| {
                std::hint::black_box(mm.forward(&xt).unwrap());
            });
            let quant = best_of(3, 10, &|| {
                std::hint::black_box(quantize_rows(&x, k));
            });
            let a = quantize_rows(&x, k);
            let kernel = best_of(3, 10, &|| {
                std::hint::black_box(matmul(&t, &a, m));
            });
            eprintln!(
                "[{m}, {k}] x [{n}, {k}]: candle {theirs:.3} ms, ours {:.3} ms (quantize {quant:.3} \
                 + kernel {kernel:.3}; {:.0} GMAC/s)",
                quant + kernel,
                (m * n * k) as f64 / 1e6 / kernel
            );
        }
        // One decode step of the 450M decoder, roughly: 16 layers of a 3072x1024 input
        // projection, a 1024x1024 output one, the 4608x1024 gate/up and 1024x4608 down
        // projections, and the 65536x1024 head.
        let mut shapes = vec![];
        for _ in 0..16 {
            shapes.extend([
                (3072, 1024),
                (1024, 1024),
                (4608, 1024),
                (4608, 1024),
                (1024, 4608),
            ]);
        }
        shapes.push((65536, 1024));
        let weights: Vec<(Vec<BlockQ8_0>, usize, usize)> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(n, k))| (q8::quantize_rows(&test_values(n * k, i as u32), k), n, k))
            .collect();
        let bytes: usize = shapes.iter().map(|(n, k)| n * k * 34 / 32).sum();
        let tiled: Vec<Tiled> = weights
            .iter()
            .map(|(w, n, k)| Tiled::from_blocks(w, *n, k / QK8_0))
            .collect();
        let mms: Vec<_> = weights
            .iter()
            .map(|(w, n, k)| (candle(w, *n, *k), *k))
            .collect();
        drop(weights);
        let ours = || {
            for t in &tiled {
                let k = t.kb * QK8_0;
                let x = vec![0.5f32; k];
                std::hint::black_box(matmul(t, &quantize_rows(&x, k), 1));
            }
        };
        let theirs = || {
            for (mm, k) in &mms {
                let x = candle_core::Tensor::from_vec(vec![0.5f32; *k], (1, *k), &dev).unwrap();
                std::hint::black_box(mm.forward(&x).unwrap());
            }
        };
        // The floor: a 2-thread read of the same tiles.
        let floor = || {
            for t in &tiled {
                let sum: u64 = t
                    .quants
                    .par_chunks(1024)
                    .map(|c| {
                        c.iter()
                            .map(|l| l.0[0] as u64 + l.0[63] as u64)
                            .sum::<u64>()
                    })
                    .sum();
                std::hint::black_box(sum);
            }
        };
        let mut times = [vec![], vec![], vec![]];
        for _ in 0..10 {
            for (f, t) in [&ours as &dyn Fn(), &theirs, &floor]
                .into_iter()
                .zip(&mut times)
            {
                let s = std::time::Instant::now();
                f();
                t.push(s.elapsed().as_secs_f64() * 1e3);
            }
        }
        let [o, c, f] = times.map(|t| {
            let best = t.iter().fold(f64::MAX, |a, &b| a.min(b));
            (best, t.iter().sum::<f64>() / t.len() as f64)
        });
        eprintln!(
            "decode step products ({:.0} MiB), best / mean of 10: ours {:.2} / {:.2} ms, candle \
             {:.2} / {:.2} ms, 2-thread read {:.2} / {:.2} ms",
            bytes as f64 / 1048576.0,
            o.0,
            o.1,
            c.0,
            c.1,
            f.0,
            f.1
        );
    }
}
