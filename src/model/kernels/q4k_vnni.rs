//! Products by Q4_K weights on CPUs with AVX-512 VNNI (`avx512f`, `avx512bw`, `avx512vnni`):
//! weight tiles of 16 output rows multiplied by Q8_K activation blocks with `vpdpbusd`, for
//! every row count (decode steps, prefill), in the manner of [`super::q8_vnni`] for Q8_0.
//!
//! Why not candle's repacked Q4_K tiles (`candle_core::quantized::repack_x86`, which `QMatMul`
//! runs there) for many rows, or [`super::q4k`]'s regrouped AVX2 kernel for decode: candle
//! quantizes the activations with its scalar `BlockQ8K::from_float`, expands each tile's scales
//! and mins to f32 (3072 bytes a 16-row super-block where ggml's blocks hold 2304) in a copy
//! beside ggml's blocks, and converts and scales every 32-value sub-block's sum in f32; here the
//! sub-block sums are scaled in `i32` and one tile layout serves every row count, from one copy
//! of the weight. Measured (BENCHMARKS.md, "Q4_K on our VNNI kernel", 2 Zen 4 cores): a 270-row
//! product at the 450M LM shapes in 0.63-0.85x candle's time (quantization included) and
//! 0.57-0.60x the regrouped kernel's, the LM prefill 309-313 ms at best against 380-390 on
//! candle's tiles; a decode step's products alone at the regrouped kernel's speed and well
//! under `QMatMul`'s (its decode steps ran 11.6-14.7 ms a token against 8-9 here).
//!
//! One activation row (a decode step) runs its own kernel over the same tiles ([`row_avx512`]):
//! each thread takes chunks of about 144 KiB of whole tiles from a shared counter and reads
//! each as one forward stream, one tile at a time. The register tiles that serve more rows read
//! 4 tiles' lines interleaved in 36 KiB tasks, which kept a decode step's 4608x1024 products
//! at about 74% of the read bandwidth although the kernel itself runs at 57-66 GB/s a core from
//! L2; in the model the stream order took a step from 8.5-10.5 to 8.0-8.5 ms (BENCHMARKS.md,
//! "Q4_K decode as one stream a thread"). Reading 4 tiles a super-block at a time, or a
//! super-block's lines 8 apart, was as slow as the interleaved tasks or slower.
//!
//! Layout ([`Tiled`]): for tile `t` (rows `16t..16t + 16`, zero rows past `n`) and super-block
//! `b`, 36 lines (2304 bytes, the 16 rows' 144-byte ggml blocks permuted): line 0 the 16 rows'
//! f16 `d` then their 16 `dmin`; lines 1-3 the 12 packed scale bytes transposed (byte `j` of the
//! 16 rows at `16 j`, so the 6-bit scales and mins of all 16 rows unpack in a few vector
//! instructions); lines 4-35 the nibbles, line `4 + 8c + v` holding bytes `32c + 4v .. + 4` of
//! each row (`[16 rows][4 bytes]`). The low nibbles of that line are 4 values of sub-block `2c`,
//! the high ones of `2c + 1`: masked, each is `vpdpbusd`'s unsigned operand (0..15) against one
//! broadcast 4-byte group of the signed Q8_K quants, each row's sum in its own 32-bit lane.
//! [`Tiled::to_ggml`] gives the ggml blocks back (for `qtensor()`, GGUF export).
//!
//! Arithmetic, per output and super-block `b`: `isum = Σ_g sc_g · Σ_{i∈g} q_i a_i` and
//! `msum = Σ_g m_g · (bsums_{2g} + bsums_{2g+1})`, exact in `i32` (|isum| ≤ 8 · 63 · 32 · 15 ·
//! 128); then `acc = fma(d · d_a, f32(isum), acc)` and `acc = fma(-(dmin · d_a), f32(msum), acc)`,
//! super-blocks in order, one f32 accumulator per output: every output is the same bits whatever
//! the tiling or threads ([`reference_dot`] is that arithmetic in scalar code, and the fallback
//! where the CPU lacks the instructions). Activations are [`super::q4k::quantize_rows`]'s Q8_K
//! blocks, candle's (and so ggml's) `quantize_row_q8_K` bit for bit.

use rayon::prelude::*;

use super::q4k::{BLOCK_BYTES, BlockQ8K, QK_K, f16_bits, scale_min};
use super::tasks::{OutPtr, for_each_block, for_each_chunk};

/// Output rows of a weight tile (one `zmm` of `i32`/`f32` lanes).
pub(crate) const TILE: usize = 16;
/// Lines of one tile's super-block.
const LINES: usize = TILE * BLOCK_BYTES / 64;
/// Byte offsets inside a tile's super-block: `dmin`, the transposed scale bytes, the nibbles.
const OFF_DMIN: usize = 2 * TILE;
const OFF_SCALES: usize = 64;
const OFF_QS: usize = 4 * 64;
const _: () = assert!(LINES == 36 && OFF_QS + 128 * TILE == LINES * 64);

/// Whether this CPU runs [`matmul`]'s AVX-512 VNNI kernel (else the scalar reference runs).
pub(crate) fn available() -> bool {
    super::q8_vnni::available()
}

/// One 64-byte line (one aligned `zmm` load).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Q4_K weight rows `[n, k]` in tiles of 16 rows (see the module docs): tile `t`'s super-block
/// `b` at lines `(t * kb + b) * 36 ..`.
pub(crate) struct Tiled {
    lines: Vec<Line>,
    n: usize,
    kb: usize,
}

impl std::fmt::Debug for Tiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "q4k_vnni::Tiled([{}, {}])", self.n, self.kb * QK_K)
    }
}

/// Where byte `i` of row `r`'s (of 16) ggml block goes inside its tile's super-block.
fn position(r: usize, i: usize) -> usize {
    match i {
        0..2 => 2 * r + i,
        2..4 => OFF_DMIN + 2 * r + (i - 2),
        4..16 => OFF_SCALES + (i - 4) * TILE + r,
        _ => {
            // Nibble byte `q` (0..128): line `q / 4` of the nibbles, row `r`'s 4 bytes.
            let q = i - 16;
            OFF_QS + (q / 4) * 64 + 4 * r + q % 4
        }
    }
}

impl Tiled {
    /// Tiles `n` rows of `kb` ggml Q4_K blocks (`bytes`, as a GGUF file or candle stores them).
    pub(crate) fn from_ggml(bytes: &[u8], n: usize, kb: usize) -> Self {
        assert_eq!(
            bytes.len(),
            n * kb * BLOCK_BYTES,
            "q4k_vnni::Tiled: weight is not [n, kb] blocks"
        );
        let tile_lines = kb * LINES;
        let mut lines = vec![Line([0; 64]); n.div_ceil(TILE) * tile_lines];
        // Tiles are independent; each fills its own lines.
        lines
            .par_chunks_mut(tile_lines.max(1))
            .enumerate()
            .for_each(|(t, tile)| {
                for r in t * TILE..n.min((t + 1) * TILE) {
                    let row = &bytes[r * kb * BLOCK_BYTES..(r + 1) * kb * BLOCK_BYTES];
                    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                        let dst = &mut tile[b * LINES..(b + 1) * LINES];
                        for (i, &v) in block.iter().enumerate() {
                            let p = position(r % TILE, i);
                            dst[p / 64].0[p % 64] = v;
                        }
                    }
                }
            });
        Self { lines, n, kb }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes, so the lines are `64 * len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.lines.len() * 64) }
    }

    /// Row `r`'s ggml block `b`.
    fn block(&self, r: usize, b: usize) -> [u8; BLOCK_BYTES] {
        let at = (r / TILE * self.kb + b) * LINES * 64;
        let src = &self.bytes()[at..at + LINES * 64];
        std::array::from_fn(|i| src[position(r % TILE, i)])
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
                super::q4k::dequantize_block(&self.block(r, b), y);
            }
        }
    }
}

/// Output `(i, o)`'s value as the kernel computes it, in scalar code: per super-block the
/// exact `isum` and `msum` (module docs), then `acc = fma(d·d_a, isum, acc)` and
/// `acc = fma(−(dmin·d_a), msum, acc)`, super-blocks in order.
fn reference_dot(w: &Tiled, o: usize, a: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    for (b, a) in a.iter().enumerate() {
        let block = w.block(o, b);
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
            msum += i32::from(m) * (i32::from(a.bsums[2 * g]) + i32::from(a.bsums[2 * g + 1]));
        }
        acc = (d * a.d).mul_add(isum as f32, acc);
        acc = (-(dmin * a.d)).mul_add(msum as f32, acc);
    }
    acc
}

/// Activation rows of a register tile for many rows.
const TILE_M: usize = 4;
/// Weight tiles of a register tile for 3+ rows: 4 x 2 f32 accumulators, `i32` super-block sums
/// and sub-block sums are 24 of the 32 `zmm` registers.
const TILES_N: usize = 2;
/// Weight tiles of a register tile (and a task) for 1-2 rows (decode): 4 weight streams.
const TILES_N_FEW: usize = 4;
/// Activation rows of one parallel task for many rows: the task's 2 weight tiles (`2 * kb *
/// 2304` bytes, 83 KiB at k = 4608) stay in L2 while its rows stream past.
const ROWS_PER_TASK: usize = 64;

/// Bytes of whole tiles a thread takes at a time in a one-row product: long enough for the
/// hardware prefetchers to stream (64 tiles at k = 256, 16 at k = 1024, 4 at k = 4608).
const ROW_CHUNK_BYTES: usize = 144 << 10;

/// Per activation block, the sums of its 8 sub-blocks paired as two `i16` in an `i32`, the
/// `vpdpwssd` partners of a tile's mins (|sum| ≤ 32 · 128 fits).
fn min_pairs(a: &[BlockQ8K]) -> Vec<[i32; 4]> {
    a.iter()
        .map(|a| {
            std::array::from_fn(|p| {
                let s = |g: usize| i32::from(a.bsums[2 * g]) + i32::from(a.bsums[2 * g + 1]);
                (s(2 * p) as u16 as i32) | ((s(2 * p + 1) as u16 as i32) << 16)
            })
        })
        .collect()
}

/// `y [m, n] = a [m, k] . w [n, k]^T` for tiled Q4_K weights `w` and Q8_K activation rows `a`
/// ([`super::q4k::quantize_rows`], `m * k / 256` blocks): `m * n` floats, row-major. Parallel
/// over tiles (and rows for many rows); the AVX-512 VNNI kernel where [`available`], else the
/// scalar reference (the same bits either way).
pub(crate) fn matmul(w: &Tiled, a: &[BlockQ8K], m: usize) -> Vec<f32> {
    let (n, kb) = (w.n, w.kb);
    assert_eq!(a.len(), m * kb, "q4k_vnni matmul: activation is not [m, k]");
    if m == 0 || n == 0 {
        return vec![0f32; m * n];
    }
    #[cfg(target_arch = "x86_64")]
    if available() {
        let pairs = min_pairs(a);
        // Every output is stored by one task below: no zeroing pass first.
        let mut out = Vec::with_capacity(m * n);
        let tiles = n.div_ceil(TILE);
        let dst = OutPtr(out.as_mut_ptr());
        if m == 1 {
            // A decode step: one task per thread, each taking the next chunk of about 144 KiB
            // of whole tiles from a shared counter and reading it as one forward stream
            // ([`row_avx512`]). Measured in the model (BENCHMARKS.md, "Q4_K decode as one
            // stream a thread"): the rayon tasks of 4 interleaved tiles below, or chunks of
            // 36 KiB, left the 4608x1024 products at 74% of the read bandwidth.
            let chunk = ROW_CHUNK_BYTES.div_ceil(kb * LINES * 64);
            for_each_chunk(tiles, chunk, |tiles| {
                // SAFETY: the CPU has AVX-512F/BW/VNNI; the tiles exist; each chunk is taken
                // once, so its outputs are this thread's alone.
                unsafe { row_avx512(w, a, &pairs, tiles, &dst) };
            });
            // SAFETY: the chunks cover every tile once and store each of the `n` outputs.
            unsafe { out.set_len(n) };
            return out;
        }
        let (rows_per_task, tiles_per_task) = if m <= 2 {
            (m, TILES_N_FEW)
        } else {
            (ROWS_PER_TASK, TILES_N)
        };
        for_each_block(tiles, m, tiles_per_task, rows_per_task, |tiles, rows| {
            // SAFETY: the CPU has AVX-512F/BW/VNNI; the tiles and rows exist; tasks write
            // disjoint outputs of the `m * n` buffer.
            unsafe { block_avx512(w, a, &pairs, tiles, rows, &dst) };
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
/// As [`tile`]: the CPU has AVX-512F/BW/VNNI; `a` and `pairs` hold the rows, `w` the tiles;
/// `dst` points to `m * w.n` floats of which this call alone writes these outputs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block_avx512(
    w: &Tiled,
    a: &[BlockQ8K],
    pairs: &[[i32; 4]],
    tiles: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    dst: &OutPtr,
) {
    let (n, kb) = (w.n, w.kb);
    let mut i = rows.start;
    while i < rows.end {
        let rm = TILE_M.min(rows.end - i);
        // Registers: 3 per (row, tile) pair, so 8 pairs at most.
        let tiles_step = if rm <= 2 { TILES_N_FEW } else { TILES_N };
        let mut t = tiles.start;
        while t < tiles.end {
            let rn = tiles_step.min(tiles.end - t);
            let last = t + rn == n.div_ceil(TILE);
            let args = TileArgs {
                w: w.bytes()[t * kb * LINES * 64..].as_ptr(),
                a: a[i * kb..].as_ptr(),
                p: pairs[i * kb..].as_ptr(),
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
                    (4, 2) => tile::<4, 2>(&args),
                    (4, 1) => tile::<4, 1>(&args),
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

/// One activation row by weight tiles `tiles`, one tile after another (a decode step): the
/// arithmetic of [`reference_dot`], as [`tile`]`::<1, _>` computes it, with the weight read
/// in address order, one forward stream (the order measured fastest from memory: 4 tiles'
/// lines interleaved, or a super-block's lines taken 8 apart, left the prefetchers behind).
/// Each sub-block sums into its own accumulator, so the 8 `vpdpbusd` chains of a super-block
/// overlap; the sums are exact `i32`, so their grouping leaves the bits as they are.
///
/// # Safety
/// The CPU has AVX-512F/BW/VNNI; `a` and `pairs` hold one row of `w.kb` blocks, tiles `tiles`
/// exist, and `dst` points to `w.n` floats of which this call alone writes these tiles'.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn row_avx512(
    w: &Tiled,
    a: &[BlockQ8K],
    pairs: &[[i32; 4]],
    tiles: std::ops::Range<usize>,
    dst: &OutPtr,
) {
    use std::arch::x86_64::*;
    let (n, kb) = (w.n, w.kb);
    let low4 = _mm512_set1_epi8(0x0F);
    for t in tiles {
        let tile_w = w.bytes()[t * kb * LINES * 64..].as_ptr();
        let mut acc = _mm512_setzero_ps();
        for (b, (a, pair)) in a.iter().zip(pairs).enumerate().take(kb) {
            // SAFETY: super-block `b` of tile `t` exists; weight loads are whole aligned lines.
            unsafe {
                let blk = tile_w.add(b * LINES * 64);
                let q = a.qs.as_ptr();
                let mut dot = [_mm512_setzero_si512(); 8];
                for c in 0..4 {
                    for v in 0..8 {
                        let bits = _mm512_load_si512(blk.add(OFF_QS + (8 * c + v) * 64).cast());
                        let lo = _mm512_and_si512(bits, low4);
                        let hi = _mm512_and_si512(_mm512_srli_epi16(bits, 4), low4);
                        let a_lo = q.add(64 * c + 4 * v).cast::<i32>().read_unaligned();
                        let a_hi = q.add(64 * c + 32 + 4 * v).cast::<i32>().read_unaligned();
                        dot[2 * c] = _mm512_dpbusd_epi32(dot[2 * c], lo, _mm512_set1_epi32(a_lo));
                        dot[2 * c + 1] =
                            _mm512_dpbusd_epi32(dot[2 * c + 1], hi, _mm512_set1_epi32(a_hi));
                    }
                }
                let (sc, mp) = scales_and_mins(blk);
                let s: [__m512i; 8] = std::array::from_fn(|g| _mm512_mullo_epi32(dot[g], sc[g]));
                let isum = _mm512_add_epi32(
                    _mm512_add_epi32(_mm512_add_epi32(s[0], s[1]), _mm512_add_epi32(s[2], s[3])),
                    _mm512_add_epi32(_mm512_add_epi32(s[4], s[5]), _mm512_add_epi32(s[6], s[7])),
                );
                let mut msum = _mm512_setzero_si512();
                for (p, &pv) in pair.iter().enumerate() {
                    msum = _mm512_dpwssd_epi32(msum, mp[p], _mm512_set1_epi32(pv));
                }
                let dw = _mm512_cvtph_ps(_mm256_load_si256(blk.cast()));
                let dm = _mm512_cvtph_ps(_mm256_load_si256(blk.add(OFF_DMIN).cast()));
                let da = _mm512_set1_ps(a.d);
                acc = _mm512_fmadd_ps(_mm512_mul_ps(dw, da), _mm512_cvtepi32_ps(isum), acc);
                acc = _mm512_fnmadd_ps(_mm512_mul_ps(dm, da), _mm512_cvtepi32_ps(msum), acc);
            }
        }
        let lanes = TILE.min(n - t * TILE);
        let mask: __mmask16 = if lanes == TILE {
            !0
        } else {
            (1u16 << lanes) - 1
        };
        // SAFETY: outputs `16t .. 16t + lanes` are this call's.
        unsafe { _mm512_mask_storeu_ps(dst.0.add(t * TILE), mask, acc) };
    }
}

/// One register tile's operands: `RN` weight tiles from `w` (tile `j` at `j * kb` super-blocks
/// on), `RM` activation rows from `a` and their min pairs from `p` (row stride `kb`), outputs at
/// `c` with row stride `ldc`; the last tile writes its first `last_lanes` outputs only.
#[cfg(target_arch = "x86_64")]
struct TileArgs {
    w: *const u8,
    a: *const BlockQ8K,
    p: *const [i32; 4],
    kb: usize,
    c: *mut f32,
    ldc: usize,
    last_lanes: usize,
}

/// One tile super-block's (at `blk`) 8 sub-block scales of the 16 rows as `i32` lanes, and its
/// mins as 4 vectors of `i16` pairs `[m_{2p}, m_{2p+1}]` (lane `r` row `r`'s), the `vpdpwssd`
/// partners of [`min_pairs`].
///
/// # Safety
/// The CPU has AVX-512F/BW; `blk` is a tile super-block (64-byte aligned, [`LINES`] lines).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn scales_and_mins(
    blk: *const u8,
) -> (
    [std::arch::x86_64::__m512i; 8],
    [std::arch::x86_64::__m512i; 4],
) {
    use std::arch::x86_64::*;
    let low4 = _mm512_set1_epi8(0x0F);
    let low6 = _mm512_set1_epi8(0x3F);
    let bits45 = _mm512_set1_epi8(0x30);
    // `[m_{2p}, m_{2p+1}]` of row `r` as the `i16` pair of lane `r`, from the two sub-blocks'
    // 16 `i16` (indices 0-15 and 16-31 of a `vpermw` source).
    let pair_index = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    // SAFETY: the three scale lines are whole aligned lines of the super-block.
    unsafe {
        // Bytes `[sub-block (4)][row (16)]`: scales and mins of sub-blocks 0-3 from the
        // low 6 bits of bytes 0-3 and 4-7, of 4-7 from bytes 8-11's nibbles and the top
        // 2 bits of bytes 0-3 (scales) and 4-7 (mins).
        let x0 = _mm512_load_si512(blk.add(OFF_SCALES).cast());
        let x1 = _mm512_load_si512(blk.add(OFF_SCALES + 64).cast());
        let x2 = _mm512_load_si512(blk.add(OFF_SCALES + 128).cast());
        let sc_lo = _mm512_and_si512(x0, low6);
        let m_lo = _mm512_and_si512(x1, low6);
        let sc_hi = _mm512_or_si512(
            _mm512_and_si512(x2, low4),
            _mm512_and_si512(_mm512_srli_epi16(x0, 2), bits45),
        );
        let m_hi = _mm512_or_si512(
            _mm512_and_si512(_mm512_srli_epi16(x2, 4), low4),
            _mm512_and_si512(_mm512_srli_epi16(x1, 2), bits45),
        );
        let sc = [
            _mm512_cvtepu8_epi32(_mm512_castsi512_si128(sc_lo)),
            _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32::<1>(sc_lo)),
            _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32::<2>(sc_lo)),
            _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32::<3>(sc_lo)),
            _mm512_cvtepu8_epi32(_mm512_castsi512_si128(sc_hi)),
            _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32::<1>(sc_hi)),
            _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32::<2>(sc_hi)),
            _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32::<3>(sc_hi)),
        ];
        let mp = [
            _mm512_permutexvar_epi16(
                pair_index,
                _mm512_cvtepu8_epi16(_mm512_castsi512_si256(m_lo)),
            ),
            _mm512_permutexvar_epi16(
                pair_index,
                _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64::<1>(m_lo)),
            ),
            _mm512_permutexvar_epi16(
                pair_index,
                _mm512_cvtepu8_epi16(_mm512_castsi512_si256(m_hi)),
            ),
            _mm512_permutexvar_epi16(
                pair_index,
                _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64::<1>(m_hi)),
            ),
        ];
        (sc, mp)
    }
}

/// `RM x 16 RN` outputs over all `kb` super-blocks (the arithmetic of [`reference_dot`]).
///
/// # Safety
/// The CPU has AVX-512F/BW/VNNI; `RM` activation rows of `kb` blocks behind `t.a` and `t.p`,
/// `RN` tiles of `kb` super-blocks behind `t.w`, the outputs writable at `t.c`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
// Register arrays indexed by the tile's row and column, as the loops nest.
#[allow(clippy::needless_range_loop)]
unsafe fn tile<const RM: usize, const RN: usize>(t: &TileArgs) {
    use std::arch::x86_64::*;
    let kb = t.kb;
    let low4 = _mm512_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); RN]; RM];
    for b in 0..kb {
        // SAFETY: super-block `b` of every row and tile exists (the caller's contract); every
        // weight load is a whole aligned line (`Line`).
        unsafe {
            // Each tile's 8 sub-block scales as `i32` lanes and its mins as 4 `i16` pairs.
            let mut sc = [[_mm512_setzero_si512(); 8]; RN];
            let mut mp = [[_mm512_setzero_si512(); 4]; RN];
            for j in 0..RN {
                (sc[j], mp[j]) = scales_and_mins(t.w.add((j * kb + b) * LINES * 64));
            }
            let mut isum = [[_mm512_setzero_si512(); RN]; RM];
            for c in 0..4 {
                for h in 0..2 {
                    let mut dot = [[_mm512_setzero_si512(); RN]; RM];
                    for v in 0..8 {
                        let mut wv = [_mm512_setzero_si512(); RN];
                        for j in 0..RN {
                            let line =
                                t.w.add((j * kb + b) * LINES * 64 + OFF_QS + (8 * c + v) * 64);
                            let bits = _mm512_load_si512(line.cast());
                            wv[j] = if h == 0 {
                                _mm512_and_si512(bits, low4)
                            } else {
                                _mm512_and_si512(_mm512_srli_epi16(bits, 4), low4)
                            };
                        }
                        for i in 0..RM {
                            let q = (*t.a.add(i * kb + b)).qs.as_ptr();
                            let at = q.add(64 * c + 32 * h + 4 * v);
                            let av = _mm512_set1_epi32(at.cast::<i32>().read_unaligned());
                            for j in 0..RN {
                                dot[i][j] = _mm512_dpbusd_epi32(dot[i][j], wv[j], av);
                            }
                        }
                    }
                    for i in 0..RM {
                        for j in 0..RN {
                            let scaled = _mm512_mullo_epi32(dot[i][j], sc[j][2 * c + h]);
                            isum[i][j] = _mm512_add_epi32(isum[i][j], scaled);
                        }
                    }
                }
            }
            let mut dw = [_mm512_setzero_ps(); RN];
            let mut dm = [_mm512_setzero_ps(); RN];
            for j in 0..RN {
                let blk = t.w.add((j * kb + b) * LINES * 64);
                dw[j] = _mm512_cvtph_ps(_mm256_load_si256(blk.cast()));
                dm[j] = _mm512_cvtph_ps(_mm256_load_si256(blk.add(OFF_DMIN).cast()));
            }
            for i in 0..RM {
                let pair = &*t.p.add(i * kb + b);
                let da = _mm512_set1_ps((*t.a.add(i * kb + b)).d);
                for j in 0..RN {
                    let mut msum = _mm512_setzero_si512();
                    for (p, &pv) in pair.iter().enumerate() {
                        msum = _mm512_dpwssd_epi32(msum, mp[j][p], _mm512_set1_epi32(pv));
                    }
                    acc[i][j] = _mm512_fmadd_ps(
                        _mm512_mul_ps(dw[j], da),
                        _mm512_cvtepi32_ps(isum[i][j]),
                        acc[i][j],
                    );
                    acc[i][j] = _mm512_fnmadd_ps(
                        _mm512_mul_ps(dm[j], da),
                        _mm512_cvtepi32_ps(msum),
                        acc[i][j],
                    );
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
    use crate::model::kernels::q4k::quantize_rows;

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
    pub(super) fn blocks(n: usize, kb: usize, seed: u64) -> Vec<u8> {
        let mut w = bytes(n * kb * BLOCK_BYTES, seed);
        for (i, block) in w.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            let d = half::f16::from_f32(0.001 + (i % 7) as f32 * 0.0013);
            let dmin = half::f16::from_f32(0.0005 + (i % 5) as f32 * 0.0007);
            block[0..2].copy_from_slice(&d.to_le_bytes());
            block[2..4].copy_from_slice(&dmin.to_le_bytes());
        }
        w
    }

    /// Activations with a large value now and then (so blocks' scales differ) and a zero block.
    pub(super) fn activations(m: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut x: Vec<f32> = bytes(m * k, seed)
            .iter()
            .enumerate()
            .map(|(i, &b)| (f32::from(b) - 127.5) / 64.0 * if i % 97 == 0 { 8.0 } else { 1.0 })
            .collect();
        if m * k >= 2 * QK_K {
            x[QK_K..2 * QK_K].fill(0.0);
        }
        x
    }

    /// Tiling is a permutation of ggml's bytes: the blocks come back unchanged for row counts
    /// that are not whole tiles; rows dequantize as ggml's `dequantize_row_q4_K`.
    #[test]
    fn tiles_round_trip_to_ggml_bytes() {
        for (n, kb) in [(1, 1), (13, 3), (16, 2), (70, 4)] {
            let w = blocks(n, kb, 3 + n as u64);
            let t = Tiled::from_ggml(&w, n, kb);
            assert_eq!(t.to_ggml(), w, "[{n}, {kb} super-blocks]");
            assert_eq!(t.ggml_bytes(), w.len());
            assert_eq!(t.bytes().len(), n.div_ceil(TILE) * kb * 2304);
            let mut got = vec![0f32; n * kb * QK_K];
            t.dequantize_rows(0..n, &mut got);
            let grouped = crate::model::kernels::q4k::Grouped::from_ggml(&w, n, kb);
            let mut want = vec![0f32; n * kb * QK_K];
            grouped.dequantize_rows(0..n, &mut want);
            assert_eq!(got, want);
        }
        // Every byte of a tile's super-block is some row's byte, exactly once.
        let mut seen = [false; LINES * 64];
        for r in 0..TILE {
            for i in 0..BLOCK_BYTES {
                assert!(!std::mem::replace(&mut seen[position(r, i)], true));
            }
        }
    }

    /// The kernel equals the scalar reference bit for bit: one and two rows (decode), odd row
    /// counts (register tiles of 4 rows and their remainders, several row chunks a tile
    /// group), `n` not whole tiles or tile groups, several widths.
    #[test]
    fn kernel_equals_the_scalar_reference_bitwise() {
        for (m, n, kb) in [
            (1, 1, 1),
            (1, 70, 2),
            (2, 16, 1),
            (2, 100, 3),
            (3, 33, 2),
            (4, 48, 1),
            (5, 17, 4),
            (9, 130, 2),
            (67, 40, 1),
            (130, 64, 2),
        ] {
            let k = kb * QK_K;
            let w = Tiled::from_ggml(&blocks(n, kb, 1 + n as u64), n, kb);
            let a = quantize_rows(&activations(m, k, 2 + m as u64), k);
            let got = matmul(&w, &a, m);
            let want: Vec<f32> = a
                .chunks_exact(kb)
                .flat_map(|a| (0..n).map(|o| reference_dot(&w, o, a)).collect::<Vec<_>>())
                .collect();
            let same = got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits());
            assert!(same, "[{m}, {k}] x [{n}, {k}]");
        }
    }

    /// The one-row path ([`row_avx512`] over chunks of [`ROW_CHUNK_BYTES`]) equals the scalar
    /// reference bit for bit: a partial last tile, a partial last chunk (1100 rows at k = 256
    /// are 69 tiles, chunks of 64), a width of several chunks' tiles at k = 4608 (18
    /// super-blocks, chunks of 4 tiles), one tile, odd super-block counts.
    #[test]
    fn one_row_path_equals_the_scalar_reference_bitwise() {
        for (n, kb) in [(1100, 1), (16, 1), (1, 3), (130, 18), (65, 5), (1024, 4)] {
            let k = kb * QK_K;
            let w = Tiled::from_ggml(&blocks(n, kb, 11 + n as u64), n, kb);
            let a = quantize_rows(&activations(1, k, 12 + kb as u64), k);
            let got = matmul(&w, &a, 1);
            assert_eq!(got.len(), n);
            for (o, g) in got.iter().enumerate() {
                let want = reference_dot(&w, o, &a);
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "[{n}, {k}] output {o}: {g} vs {want}"
                );
            }
        }
    }

    /// The reference is within f32 rounding of the f64 dot product of the dequantized weight
    /// row and the dequantized Q8_K activations (the same exact terms, summed in f64).
    #[test]
    fn reference_is_the_block_dot_within_f32_rounding() {
        let (m, n, kb) = (3, 20, 3);
        let k = kb * QK_K;
        let w = Tiled::from_ggml(&blocks(n, kb, 7), n, kb);
        let a = quantize_rows(&activations(m, k, 8), k);
        let got = matmul(&w, &a, m);
        let mut dense = vec![0f32; n * k];
        w.dequantize_rows(0..n, &mut dense);
        for (i, a) in a.chunks_exact(kb).enumerate() {
            let x: Vec<f64> = a
                .iter()
                .flat_map(|a| a.qs.map(|q| f64::from(a.d) * f64::from(q)))
                .collect();
            for o in 0..n {
                let row = &dense[o * k..(o + 1) * k];
                let exact: f64 = row.iter().zip(&x).map(|(&w, &x)| f64::from(w) * x).sum();
                let size: f64 = row
                    .iter()
                    .zip(&x)
                    .map(|(&w, &x)| (f64::from(w) * x).abs())
                    .sum();
                // The dequantized weight's own f32 rounding (`d·sc·q − dmin·m`) and the
                // accumulation's: a few ulps of the terms' magnitude.
                let tol = 8.0 * f64::from(f32::EPSILON) * size;
                let g = f64::from(got[i * n + o]);
                assert!((g - exact).abs() <= tol, "({i}, {o}): {g} vs {exact}");
            }
        }
    }

    /// The extremes of the integer arithmetic: every nibble 15, scales and mins 63, against
    /// activations of -128 and 127 (the largest sub-block and super-block sums).
    #[test]
    fn extremes_match_the_reference() {
        let (n, kb) = (16, 2);
        let mut w = blocks(n, kb, 1);
        for block in w.chunks_exact_mut(BLOCK_BYTES) {
            block[4..].fill(0xFF);
        }
        let t = Tiled::from_ggml(&w, n, kb);
        for fill in [-128i8, 127] {
            let mut a = quantize_rows(&vec![1.0; kb * QK_K], kb * QK_K);
            for a in &mut a {
                a.qs = [fill; QK_K];
                a.bsums = [i16::from(fill) * 16; QK_K / 16];
            }
            let got = matmul(&t, &a, 1);
            for (o, &v) in got.iter().enumerate() {
                assert_eq!(
                    v.to_bits(),
                    reference_dot(&t, o, &a).to_bits(),
                    "{fill}: {o}"
                );
                // Per super-block `(d·63·15 − dmin·63)·256·fill·d_a`.
                let want: f64 = (0..kb)
                    .map(|b| {
                        let block = &w[(o * kb + b) * BLOCK_BYTES..];
                        let d = f64::from(f16_bits(u16::from_le_bytes([block[0], block[1]])));
                        let dmin = f64::from(f16_bits(u16::from_le_bytes([block[2], block[3]])));
                        (d * 63.0 * 15.0 - dmin * 63.0) * 256.0 * f64::from(fill)
                    })
                    .sum::<f64>()
                    * f64::from(a[0].d);
                assert!(
                    (f64::from(v) - want).abs() <= 1e-5 * want.abs(),
                    "{v} vs {want}"
                );
            }
        }
    }
}

#[cfg(test)]
mod measure {
    use super::tests::{activations, blocks};
    use super::*;
    use crate::model::kernels::q4k;
    use candle_core::Module as _;

    fn candle(w: &[u8], n: usize, k: usize) -> candle_core::quantized::QMatMul {
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            candle_core::quantized::GgmlDType::Q4K,
            w,
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

    /// Our product (quantize + kernel) against candle's `QMatMul` (its repacked VNNI tiles) and
    /// the regrouped AVX2 kernel at the 450M LM shapes, then one decode step's Q4_K products
    /// over distinct weights (from memory) against the regrouped kernel and a 2-thread read
    /// (`cargo test --release --lib q4k_vnni::measure -- --ignored --nocapture`).
    #[test]
    #[ignore = "measurement"]
    fn against_candle() {
        let dev = candle_core::Device::Cpu;
        for (m, n, k) in [
            (270, 4608, 1024),
            (270, 1024, 4608),
            (270, 3072, 1024),
            (32, 4608, 1024),
        ] {
            let w = blocks(n, k / QK_K, 3);
            let t = Tiled::from_ggml(&w, n, k / QK_K);
            let g = q4k::Grouped::from_ggml(&w, n, k / QK_K);
            let x = activations(m, k, 5);
            let mm = candle(&w, n, k);
            let xt = candle_core::Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
            let _ = mm.forward(&xt).unwrap();
            let theirs = best_of(3, 5, &|| {
                std::hint::black_box(mm.forward(&xt).unwrap());
            });
            let quant = best_of(3, 5, &|| {
                std::hint::black_box(q4k::quantize_rows(&x, k));
            });
            let scalar = best_of(3, 5, &|| {
                std::hint::black_box(q4k::quantize_rows_scalar(&x, k));
            });
            let a = q4k::quantize_rows(&x, k);
            let kernel = best_of(3, 5, &|| {
                std::hint::black_box(matmul(&t, &a, m));
            });
            let grouped = best_of(3, 5, &|| {
                std::hint::black_box(q4k::matmul(&g, &a, m));
            });
            eprintln!(
                "[{m}, {k}] x [{n}, {k}]: candle {theirs:.3} ms, ours {:.3} ms (quantize {quant:.3} \
                 + kernel {kernel:.3}; {:.0} GMAC/s), regrouped AVX2 kernel {grouped:.3} ms; \
                 the scalar loop's Q8_K quantization {scalar:.3} ms",
                quant + kernel,
                (m * n * k) as f64 / 1e6 / kernel
            );
        }
        // One row against a weight that stays in L2 (576 KiB): the kernel's own rate, apart
        // from memory.
        {
            let (n, k) = (1024, 1024);
            let w = blocks(n, k / QK_K, 4);
            let t = Tiled::from_ggml(&w, n, k / QK_K);
            let g = q4k::Grouped::from_ggml(&w, n, k / QK_K);
            let a = q4k::quantize_rows(&activations(1, k, 6), k);
            let ours = best_of(5, 200, &|| {
                std::hint::black_box(matmul(&t, &a, 1));
            });
            let grouped = best_of(5, 200, &|| {
                std::hint::black_box(q4k::matmul(&g, &a, 1));
            });
            eprintln!(
                "1 row x [{n}, {k}] from L2: ours {ours:.4} ms ({:.1} GB/s), regrouped AVX2 \
                 {grouped:.4} ms ({:.1} GB/s)",
                w.len() as f64 / 1e6 / ours,
                w.len() as f64 / 1e6 / grouped
            );
        }
        // One decode step of the 450M decoder's Q4_K projections, roughly: 16 layers of a
        // 3072x1024 input projection, a 1024x1024 output one, the 4608x1024 gate/up and
        // 1024x4608 down projections (the Q6_K head apart).
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
        let weights: Vec<(Vec<u8>, usize, usize)> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(n, k))| (blocks(n, k / QK_K, i as u64), n, k))
            .collect();
        let bytes: usize = weights.iter().map(|(w, _, _)| w.len()).sum();
        let tiled: Vec<Tiled> = weights
            .iter()
            .map(|(w, n, k)| Tiled::from_ggml(w, *n, k / QK_K))
            .collect();
        let grouped: Vec<q4k::Grouped> = weights
            .iter()
            .map(|(w, n, k)| q4k::Grouped::from_ggml(w, *n, k / QK_K))
            .collect();
        drop(weights);
        let ours = || {
            for t in &tiled {
                let k = t.kb * QK_K;
                let x = activations(1, k, 9);
                std::hint::black_box(matmul(t, &q4k::quantize_rows(&x, k), 1));
            }
        };
        let regrouped = || {
            for (g, t) in grouped.iter().zip(&tiled) {
                let k = t.kb * QK_K;
                let x = activations(1, k, 9);
                std::hint::black_box(q4k::matmul(g, &q4k::quantize_rows(&x, k), 1));
            }
        };
        // The floor: a 2-thread read of the same tiles.
        let floor = || {
            for t in &tiled {
                let sum: u64 = t
                    .lines
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
        for _ in 0..12 {
            for (f, t) in [&ours as &dyn Fn(), &regrouped, &floor]
                .into_iter()
                .zip(&mut times)
            {
                let s = std::time::Instant::now();
                f();
                t.push(s.elapsed().as_secs_f64() * 1e3);
            }
        }
        let [o, g, f] = times.map(|t| {
            let best = t.iter().fold(f64::MAX, |a, &b| a.min(b));
            (best, t.iter().sum::<f64>() / t.len() as f64)
        });
        eprintln!(
            "decode step Q4_K products ({:.0} MiB), best / mean of 12: ours {:.2} / {:.2} ms, \
             regrouped AVX2 {:.2} / {:.2} ms, 2-thread read {:.2} / {:.2} ms",
            bytes as f64 / 1048576.0,
            o.0,
            o.1,
            g.0,
            g.1,
            f.0,
            f.1
        );
    }
}
