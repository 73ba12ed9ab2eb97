//! Products by Q6_K weights on CPUs with AVX-512 VNNI (`avx512f`, `avx512bw`, `avx512vnni`):
//! weight tiles of 16 output rows multiplied by Q8_K activation blocks with `vpdpbusd`, for
//! every row count, in the manner of [`super::q4k_vnni`] for Q4_K.
//!
//! Why: with `--quant q4_k` the LM head (the tied 65536x1024 embedding, 52.5 MiB) is Q6_K, the
//! largest single read of a decode step, and candle's block dot (AVX2, one output at a time,
//! [`crate::model::quant::matvec`]) took it at 1.8-2.1 ms against its ~1.55 ms share of the
//! read floor; interleaving its rows or chunking candle's layout gained nothing (BENCHMARKS.md,
//! "Q4_K decode as one stream a thread"). Here one row streams whole tiles front to back, as
//! [`super::q4k_vnni`]'s one-row path does. Measured (BENCHMARKS.md, "The Q6_K head on our
//! VNNI kernel", 2 Zen 4 cores): the head by one row in 1.17-1.27 ms, the time of a 2-thread
//! read of its bytes, against 1.63-1.83 ms on candle's block dot; 2 to 270 rows in 0.6-0.73x
//! `QMatMul`'s time (quantization included). Q4_K_M GGUF imports (whose `ffn_down`/`attn_v`
//! are partly Q6_K) use it too. The `ql`/`qh` lines of a super-block lie in the order the
//! kernel reads them: read 8 and 32 lines apart, the head took 2.1-2.4 ms.
//!
//! Layout ([`Tiled`]): tile `t` (rows `16t..16t + 16`, zero rows past `n`) is `dl + 52 kb`
//! lines: first the `kb` super-blocks' f16 `d` of the 16 rows (32 bytes each, `dl` lines, so
//! no padding at an even `kb`), then per super-block 52 lines (the 16 rows' 208 bytes of
//! quants and scales, permuted): lines 0-31 the low nibbles (`ql`), line `L` holding bytes
//! `4L .. 4L + 4` of each row (`[16 rows][4 bytes]`); lines 32-47 the high bits (`qh`) the
//! same way; lines 48-51 the 16 scales transposed (scale `s` of the 16 rows at `16 s`). One
//! `ql` line and one `qh` line give two 4-value groups of each row as 6-bit `q` (0..63): the
//! low nibbles with the `qh` bits of their 2-bit field, and the high nibbles with theirs, each
//! `vpdpbusd`'s unsigned operand against one broadcast 4-byte group of the signed Q8_K quants.
//! [`Tiled::to_ggml`] gives ggml's `block_q6_K`s back (for `qtensor()`, GGUF export).
//!
//! Arithmetic, per output and super-block: `isum = Σ_s sc_s · (Σ_{i∈s} q_i a_i − 32 · bsums_s)`
//! over the 16 sub-blocks of 16 values (`sc_s` signed), exact in `i32` (|isum| ≤ 16 · 128 · 16
//! · 32 · 128); then `acc = fma(d · d_a, f32(isum), acc)`, super-blocks in order, one f32
//! accumulator per output: every output is the same bits whatever the tiling or threads
//! ([`reference_dot`] is that arithmetic in scalar code, and the fallback where the CPU lacks
//! the instructions). ggml's and candle's block dots sum the same exact integers in another f32
//! order, so they agree within rounding. Activations are [`super::q4k::quantize_rows`]'s Q8_K
//! blocks, candle's (and so ggml's) `quantize_row_q8_K` bit for bit.

use rayon::prelude::*;

use super::q4k::{BlockQ8K, QK_K, f16_bits};
use super::tasks::{OutPtr, for_each_block, for_each_chunk};

/// Bytes of one ggml `block_q6_K`: `ql[128]`, `qh[64]`, `scales[16]` (int8), `d` (f16).
pub(crate) const BLOCK_BYTES: usize = 210;
/// Output rows of a weight tile (one `zmm` of `i32`/`f32` lanes).
pub(crate) const TILE: usize = 16;
/// Lines of one tile's super-block (its `d` apart).
const SB_LINES: usize = 52;
/// Line offset of the transposed scales inside a tile's super-block.
const LINE_SCALES: usize = 48;

/// The line of a tile's super-block holding `ql` bytes `4L .. 4L + 4` of its rows: for half
/// `h` and `v` in 0..8, the lines of bytes `64h + 4v` and `64h + 32 + 4v` (whose nibbles are
/// values `128h + 32j + 4v ..` for `j` = 0..3) and then `qh`'s line for them lie together, in
/// the order the kernels read them.
fn ql_line(l: usize) -> usize {
    let (h, jp, v) = (l / 16, l % 16 / 8, l % 8);
    3 * (8 * h + v) + jp
}

/// The line holding `qh` bytes `4M .. 4M + 4` of its rows (see [`ql_line`]).
fn qh_line(m: usize) -> usize {
    3 * m + 2
}
const _: () = assert!((LINE_SCALES + 4) * 64 == TILE * (BLOCK_BYTES - 2));

/// Whether this CPU runs [`matmul`]'s AVX-512 VNNI kernel (else the scalar reference runs).
pub(crate) fn available() -> bool {
    super::q8_vnni::available()
}

/// One 64-byte line (one aligned `zmm` load).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Q6_K weight rows `[n, k]` in tiles of 16 rows (see the module docs).
pub(crate) struct Tiled {
    lines: Vec<Line>,
    n: usize,
    kb: usize,
}

impl std::fmt::Debug for Tiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "q6k_vnni::Tiled([{}, {}])", self.n, self.kb * QK_K)
    }
}

/// Lines of a tile's `d` values (`kb` super-blocks of 16 f16).
fn d_lines(kb: usize) -> usize {
    (kb * 2 * TILE).div_ceil(64)
}

/// Lines of one tile.
fn tile_lines(kb: usize) -> usize {
    d_lines(kb) + kb * SB_LINES
}

/// Where byte `i` of row `r`'s (of 16) ggml block `b` goes inside its tile (bytes from the
/// tile's start).
fn position(kb: usize, r: usize, b: usize, i: usize) -> usize {
    let sb = (d_lines(kb) + b * SB_LINES) * 64;
    match i {
        // `ql` and `qh`: 4 bytes of each row a line, the lines in the kernel's reading order.
        0..128 => sb + ql_line(i / 4) * 64 + 4 * r + i % 4,
        128..192 => sb + qh_line((i - 128) / 4) * 64 + 4 * r + i % 4,
        192..208 => sb + LINE_SCALES * 64 + (i - 192) * TILE + r,
        _ => b * 2 * TILE + 2 * r + (i - 208),
    }
}

impl Tiled {
    /// Tiles `n` rows of `kb` ggml Q6_K blocks (`bytes`, as a GGUF file or candle stores them).
    pub(crate) fn from_ggml(bytes: &[u8], n: usize, kb: usize) -> Self {
        assert_eq!(
            bytes.len(),
            n * kb * BLOCK_BYTES,
            "q6k_vnni::Tiled: weight is not [n, kb] blocks"
        );
        let lines_per_tile = tile_lines(kb);
        let mut lines = vec![Line([0; 64]); n.div_ceil(TILE) * lines_per_tile];
        // Tiles are independent; each fills its own lines.
        lines
            .par_chunks_mut(lines_per_tile.max(1))
            .enumerate()
            .for_each(|(t, tile)| {
                for r in t * TILE..n.min((t + 1) * TILE) {
                    let row = &bytes[r * kb * BLOCK_BYTES..(r + 1) * kb * BLOCK_BYTES];
                    for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                        for (i, &v) in block.iter().enumerate() {
                            let p = position(kb, r % TILE, b, i);
                            tile[p / 64].0[p % 64] = v;
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
        let at = r / TILE * tile_lines(self.kb) * 64;
        let tile = &self.bytes()[at..at + tile_lines(self.kb) * 64];
        std::array::from_fn(|i| tile[position(self.kb, r % TILE, b, i)])
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

    /// Bytes of the ggml blocks this holds (`n * kb * 210`, padding rows not counted).
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
                dequantize_block(&self.block(r, b), y);
            }
        }
    }
}

/// Value `i` (0..256) of a ggml Q6_K block as `q` in 0..63 (ggml's `ql`/`qh` packing: per half
/// of 128 values, 32-value group `j` takes the low (`j` = 0, 1) or high (2, 3) nibbles of
/// `ql[64h + 32 (j % 2) + l]` and bits `2j, 2j + 1` of `qh[32h + l]`).
fn q_of(block: &[u8; BLOCK_BYTES], i: usize) -> u8 {
    let (h, j, l) = (i / 128, i % 128 / 32, i % 32);
    let ql = block[64 * h + 32 * (j % 2) + l];
    let qh = block[128 + 32 * h + l];
    let low = if j < 2 { ql & 0xF } else { ql >> 4 };
    low | (((qh >> (2 * j)) & 3) << 4)
}

/// One block as ggml's `dequantize_row_q6_K`: `d * sc * (q - 32)` in that order.
fn dequantize_block(block: &[u8; BLOCK_BYTES], y: &mut [f32]) {
    let d = f16_bits(u16::from_le_bytes([block[208], block[209]]));
    for (i, y) in y.iter_mut().enumerate().take(QK_K) {
        let sc = block[192 + i / 16] as i8;
        *y = d * f32::from(sc) * f32::from(q_of(block, i) as i8 - 32);
    }
}

/// Output `o`'s value as the kernel computes it, in scalar code: per super-block the exact
/// `isum` (module docs), then `acc = fma(d·d_a, isum, acc)`, super-blocks in order.
fn reference_dot(w: &Tiled, o: usize, a: &[BlockQ8K]) -> f32 {
    let mut acc = 0f32;
    for (b, a) in a.iter().enumerate() {
        let block = w.block(o, b);
        let d = f16_bits(u16::from_le_bytes([block[208], block[209]]));
        let mut isum = 0i32;
        for s in 0..QK_K / 16 {
            let mut dot = -32 * i32::from(a.bsums[s]);
            for i in 16 * s..16 * s + 16 {
                dot += i32::from(q_of(&block, i)) * i32::from(a.qs[i]);
            }
            isum += i32::from(block[192 + s] as i8) * dot;
        }
        acc = (d * a.d).mul_add(isum as f32, acc);
    }
    acc
}

/// Per activation block, `-32 · bsums_s` for its 16 sub-blocks: each sub-block's `vpdpbusd`
/// sum starts there, which takes the `q − 32` offset out exactly.
fn offsets(a: &[BlockQ8K]) -> Vec<[i32; 16]> {
    a.iter()
        .map(|a| std::array::from_fn(|s| -32 * i32::from(a.bsums[s])))
        .collect()
}

/// Activation rows of a register tile for 3+ rows.
const TILE_M: usize = 4;
/// Weight tiles of a register tile for 1-2 rows: 4 `i32`/f32 registers a (row, tile) pair.
const TILES_N_FEW: usize = 2;
/// Weight tiles of a parallel task for 3+ rows, its register tiles one weight tile wide.
const TILES_PER_TASK: usize = 2;
/// Activation rows of one parallel task for many rows: the task's weight tiles stay in L2
/// while its rows stream past.
const ROWS_PER_TASK: usize = 64;
/// Bytes of whole tiles a thread takes at a time in a one-row product ([`super::q4k_vnni`]'s
/// chunk: long enough for the hardware prefetchers to stream).
const ROW_CHUNK_BYTES: usize = 144 << 10;

/// `y [m, n] = a [m, k] . w [n, k]^T` for tiled Q6_K weights `w` and Q8_K activation rows `a`
/// ([`super::q4k::quantize_rows`], `m * k / 256` blocks): `m * n` floats, row-major. Parallel
/// over tiles (and rows for many rows); the AVX-512 VNNI kernel where [`available`], else the
/// scalar reference (the same bits either way).
pub(crate) fn matmul(w: &Tiled, a: &[BlockQ8K], m: usize) -> Vec<f32> {
    let (n, kb) = (w.n, w.kb);
    assert_eq!(a.len(), m * kb, "q6k_vnni matmul: activation is not [m, k]");
    if m == 0 || n == 0 {
        return vec![0f32; m * n];
    }
    #[cfg(target_arch = "x86_64")]
    if available() {
        let off = offsets(a);
        // Every output is stored by one task below: no zeroing pass first.
        let mut out = Vec::with_capacity(m * n);
        let tiles = n.div_ceil(TILE);
        let dst = OutPtr(out.as_mut_ptr());
        if m == 1 {
            // A decode step: one task per thread, each taking the next chunk of whole tiles
            // from a shared counter and reading it as one forward stream ([`row_avx512`]).
            let chunk = ROW_CHUNK_BYTES.div_ceil(tile_lines(kb) * 64);
            for_each_chunk(tiles, chunk, |tiles| {
                // SAFETY: the CPU has AVX-512F/BW/VNNI; the tiles exist; each chunk is taken
                // once, so its outputs are this thread's alone.
                unsafe { row_avx512(w, a, &off, tiles, &dst) };
            });
            // SAFETY: the chunks cover every tile once and store each of the `n` outputs.
            unsafe { out.set_len(n) };
            return out;
        }
        let (rows_per_task, tiles_per_task) = if m <= 2 {
            (m, TILES_N_FEW)
        } else {
            (ROWS_PER_TASK, TILES_PER_TASK)
        };
        for_each_block(tiles, m, tiles_per_task, rows_per_task, |tiles, rows| {
            // SAFETY: the CPU has AVX-512F/BW/VNNI; the tiles and rows exist; tasks write
            // disjoint outputs of the `m * n` buffer.
            unsafe { block_avx512(w, a, &off, tiles, rows, &dst) };
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

/// The four 4-value groups of weight `q` (0..63) one `ql` line pair and one `qh` line give:
/// `[j = 0, 1, 2, 3]` from the low nibbles of `l0`, `l1`, the high nibbles of `l0`, `l1`,
/// each with bits `2j, 2j + 1` of `qh` as bits 4-5.
///
/// # Safety
/// The CPU has AVX-512F/BW.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn six_bit(
    l0: std::arch::x86_64::__m512i,
    l1: std::arch::x86_64::__m512i,
    qh: std::arch::x86_64::__m512i,
) -> [std::arch::x86_64::__m512i; 4] {
    use std::arch::x86_64::*;
    let low4 = _mm512_set1_epi8(0x0F);
    let bits45 = _mm512_set1_epi8(0x30);
    // `(x & 0x0F) | y` (`y` already masked to bits 4-5); the 16-bit shifts carry bits across
    // bytes only into the bits the masks drop.
    const LOW_OR: i32 = 0xEC;
    [
        _mm512_ternarylogic_epi32::<LOW_OR>(
            l0,
            _mm512_and_si512(_mm512_slli_epi16::<4>(qh), bits45),
            low4,
        ),
        _mm512_ternarylogic_epi32::<LOW_OR>(
            l1,
            _mm512_and_si512(_mm512_slli_epi16::<2>(qh), bits45),
            low4,
        ),
        _mm512_ternarylogic_epi32::<LOW_OR>(
            _mm512_srli_epi16::<4>(l0),
            _mm512_and_si512(qh, bits45),
            low4,
        ),
        _mm512_ternarylogic_epi32::<LOW_OR>(
            _mm512_srli_epi16::<4>(l1),
            _mm512_and_si512(_mm512_srli_epi16::<2>(qh), bits45),
            low4,
        ),
    ]
}

/// One activation row by weight tiles `tiles`, one tile after another (a decode step): the
/// arithmetic of [`reference_dot`] with the weight read in address order, one forward stream,
/// as [`super::q4k_vnni`]'s one-row path. Each sub-block sums into its own accumulator, so the
/// 16 `vpdpbusd` chains of a super-block overlap; the sums are exact `i32`.
///
/// # Safety
/// The CPU has AVX-512F/BW/VNNI; `a` and `off` hold one row of `w.kb` blocks, tiles `tiles`
/// exist, and `dst` points to `w.n` floats of which this call alone writes these tiles'.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn row_avx512(
    w: &Tiled,
    a: &[BlockQ8K],
    off: &[[i32; 16]],
    tiles: std::ops::Range<usize>,
    dst: &OutPtr,
) {
    use std::arch::x86_64::*;
    let (n, kb) = (w.n, w.kb);
    let (dl, tl) = (d_lines(kb), tile_lines(kb));
    for t in tiles {
        let tile_w = w.bytes()[t * tl * 64..].as_ptr();
        let mut acc = _mm512_setzero_ps();
        for (b, (a, off)) in a.iter().zip(off).enumerate().take(kb) {
            // SAFETY: super-block `b` of tile `t` exists; weight loads are whole aligned lines
            // (the scales and `d` at 16- and 32-byte offsets inside them).
            unsafe {
                let blk = tile_w.add((dl + b * SB_LINES) * 64);
                let q = a.qs.as_ptr();
                let mut dot: [__m512i; 16] = std::array::from_fn(|s| _mm512_set1_epi32(off[s]));
                for h in 0..2 {
                    for v in 0..8 {
                        let at = blk.add(3 * (8 * h + v) * 64);
                        let l0 = _mm512_load_si512(at.cast());
                        let l1 = _mm512_load_si512(at.add(64).cast());
                        let qh = _mm512_load_si512(at.add(128).cast());
                        let wq = six_bit(l0, l1, qh);
                        for (j, wq) in wq.into_iter().enumerate() {
                            let s = 8 * h + 2 * j + v / 4;
                            let at = q.add(128 * h + 32 * j + 4 * v).cast::<i32>();
                            let av = _mm512_set1_epi32(at.read_unaligned());
                            dot[s] = _mm512_dpbusd_epi32(dot[s], wq, av);
                        }
                    }
                }
                let sc = blk.add(LINE_SCALES * 64);
                let s: [__m512i; 16] = std::array::from_fn(|s| {
                    let scale = _mm512_cvtepi8_epi32(_mm_load_si128(sc.add(16 * s).cast()));
                    _mm512_mullo_epi32(dot[s], scale)
                });
                let sum8: [__m512i; 8] =
                    std::array::from_fn(|i| _mm512_add_epi32(s[2 * i], s[2 * i + 1]));
                let isum = _mm512_add_epi32(
                    _mm512_add_epi32(
                        _mm512_add_epi32(sum8[0], sum8[1]),
                        _mm512_add_epi32(sum8[2], sum8[3]),
                    ),
                    _mm512_add_epi32(
                        _mm512_add_epi32(sum8[4], sum8[5]),
                        _mm512_add_epi32(sum8[6], sum8[7]),
                    ),
                );
                let dw = _mm512_cvtph_ps(_mm256_load_si256(tile_w.add(b * 2 * TILE).cast()));
                let da = _mm512_set1_ps(a.d);
                acc = _mm512_fmadd_ps(_mm512_mul_ps(dw, da), _mm512_cvtepi32_ps(isum), acc);
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

/// Outputs of rows `rows` by tiles `tiles`, one register tile after another.
///
/// # Safety
/// As [`tile`]: the CPU has AVX-512F/BW/VNNI; `a` and `off` hold the rows, `w` the tiles;
/// `dst` points to `m * w.n` floats of which this call alone writes these outputs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block_avx512(
    w: &Tiled,
    a: &[BlockQ8K],
    off: &[[i32; 16]],
    tiles: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    dst: &OutPtr,
) {
    let (n, kb) = (w.n, w.kb);
    let tl = tile_lines(kb);
    let mut i = rows.start;
    while i < rows.end {
        let rm = TILE_M.min(rows.end - i);
        // Registers: 4 per (row, tile) pair, so 4 pairs.
        let tiles_step = if rm <= 2 { TILES_N_FEW } else { 1 };
        let mut t = tiles.start;
        while t < tiles.end {
            let rn = tiles_step.min(tiles.end - t);
            let last = t + rn == n.div_ceil(TILE);
            let args = TileArgs {
                w: w.bytes()[t * tl * 64..].as_ptr(),
                tl,
                a: a[i * kb..].as_ptr(),
                off: off[i * kb..].as_ptr(),
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
                    (4, 1) => tile::<4, 1>(&args),
                    (3, 1) => tile::<3, 1>(&args),
                    (2, 2) => tile::<2, 2>(&args),
                    (2, 1) => tile::<2, 1>(&args),
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

/// One register tile's operands: `RN` weight tiles from `w` (`tl` lines apart), `RM` activation
/// rows from `a` and their offsets from `off` (row stride `kb`), outputs at `c` with row
/// stride `ldc`; the last tile writes its first `last_lanes` outputs only.
#[cfg(target_arch = "x86_64")]
struct TileArgs {
    w: *const u8,
    tl: usize,
    a: *const BlockQ8K,
    off: *const [i32; 16],
    kb: usize,
    c: *mut f32,
    ldc: usize,
    last_lanes: usize,
}

/// `RM x 16 RN` outputs over all `kb` super-blocks (the arithmetic of [`reference_dot`]). A
/// super-block goes in 8 steps of a sub-block pair (`s`, `s + 4`: the low and high nibbles of
/// the same `ql` lines), each pair's two sums finished into `isum` before the next.
///
/// # Safety
/// The CPU has AVX-512F/BW/VNNI; `RM` activation rows of `kb` blocks behind `t.a` and `t.off`,
/// `RN` tiles behind `t.w`, the outputs writable at `t.c`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
// Register arrays indexed by the tile's row and column, as the loops nest.
#[allow(clippy::needless_range_loop)]
unsafe fn tile<const RM: usize, const RN: usize>(t: &TileArgs) {
    use std::arch::x86_64::*;
    let (kb, dl) = (t.kb, d_lines(t.kb));
    let low4 = _mm512_set1_epi8(0x0F);
    let bits45 = _mm512_set1_epi8(0x30);
    let mut acc = [[_mm512_setzero_ps(); RN]; RM];
    for b in 0..kb {
        // SAFETY: super-block `b` of every row and tile exists (the caller's contract); every
        // weight load is a whole aligned line (`Line`), or 16/32 aligned bytes inside one.
        unsafe {
            let blk: [*const u8; RN] =
                std::array::from_fn(|j| t.w.add((j * t.tl + dl + b * SB_LINES) * 64));
            let mut isum = [[_mm512_setzero_si512(); RN]; RM];
            for h in 0..2 {
                for half in 0..2 {
                    for jp in 0..2 {
                        let s_lo = 8 * h + 2 * jp + half;
                        let s_hi = s_lo + 4;
                        let mut dlo = [[_mm512_setzero_si512(); RN]; RM];
                        let mut dhi = [[_mm512_setzero_si512(); RN]; RM];
                        for i in 0..RM {
                            let off = &*t.off.add(i * kb + b);
                            for j in 0..RN {
                                dlo[i][j] = _mm512_set1_epi32(off[s_lo]);
                                dhi[i][j] = _mm512_set1_epi32(off[s_hi]);
                            }
                        }
                        for v in 4 * half..4 * half + 4 {
                            let mut wlo = [_mm512_setzero_si512(); RN];
                            let mut whi = [_mm512_setzero_si512(); RN];
                            for j in 0..RN {
                                let at = blk[j].add(3 * (8 * h + v) * 64);
                                let l = _mm512_load_si512(at.add(64 * jp).cast());
                                let qh = _mm512_load_si512(at.add(128).cast());
                                // Bits `2jp, 2jp + 1` of `qh` for the low nibbles, `2jp + 4,
                                // 2jp + 5` for the high ones, moved to bits 4-5.
                                let (hl, hh) = if jp == 0 {
                                    (_mm512_slli_epi16::<4>(qh), qh)
                                } else {
                                    (_mm512_slli_epi16::<2>(qh), _mm512_srli_epi16::<2>(qh))
                                };
                                wlo[j] = _mm512_ternarylogic_epi32::<0xEC>(
                                    l,
                                    _mm512_and_si512(hl, bits45),
                                    low4,
                                );
                                whi[j] = _mm512_ternarylogic_epi32::<0xEC>(
                                    _mm512_srli_epi16::<4>(l),
                                    _mm512_and_si512(hh, bits45),
                                    low4,
                                );
                            }
                            for i in 0..RM {
                                let q = (*t.a.add(i * kb + b)).qs.as_ptr();
                                let at = 128 * h + 32 * jp + 4 * v;
                                let alo =
                                    _mm512_set1_epi32(q.add(at).cast::<i32>().read_unaligned());
                                let ahi = _mm512_set1_epi32(
                                    q.add(at + 64).cast::<i32>().read_unaligned(),
                                );
                                for j in 0..RN {
                                    dlo[i][j] = _mm512_dpbusd_epi32(dlo[i][j], wlo[j], alo);
                                    dhi[i][j] = _mm512_dpbusd_epi32(dhi[i][j], whi[j], ahi);
                                }
                            }
                        }
                        for j in 0..RN {
                            let sc = blk[j].add(LINE_SCALES * 64);
                            let sc_lo =
                                _mm512_cvtepi8_epi32(_mm_load_si128(sc.add(16 * s_lo).cast()));
                            let sc_hi =
                                _mm512_cvtepi8_epi32(_mm_load_si128(sc.add(16 * s_hi).cast()));
                            for i in 0..RM {
                                let both = _mm512_add_epi32(
                                    _mm512_mullo_epi32(dlo[i][j], sc_lo),
                                    _mm512_mullo_epi32(dhi[i][j], sc_hi),
                                );
                                isum[i][j] = _mm512_add_epi32(isum[i][j], both);
                            }
                        }
                    }
                }
            }
            for j in 0..RN {
                let dw = _mm512_cvtph_ps(_mm256_load_si256(
                    t.w.add(j * t.tl * 64 + b * 2 * TILE).cast(),
                ));
                for i in 0..RM {
                    let da = _mm512_set1_ps((*t.a.add(i * kb + b)).d);
                    acc[i][j] = _mm512_fmadd_ps(
                        _mm512_mul_ps(dw, da),
                        _mm512_cvtepi32_ps(isum[i][j]),
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

    /// Random Q6_K blocks (any quants, any signed scales) whose `d` is a finite f16 of
    /// moderate size.
    pub(super) fn blocks(n: usize, kb: usize, seed: u64) -> Vec<u8> {
        let mut w = bytes(n * kb * BLOCK_BYTES, seed);
        for (i, block) in w.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            let d = half::f16::from_f32(0.0001 + (i % 7) as f32 * 0.00013);
            block[208..].copy_from_slice(&d.to_le_bytes());
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

    fn candle_blocks(w: &[u8], n: usize, k: usize) -> candle_core::quantized::QTensor {
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            candle_core::quantized::GgmlDType::Q6K,
            w,
            vec![n, k],
            &candle_core::Device::Cpu,
        )
        .unwrap()
    }

    /// Tiling is a permutation of ggml's bytes: the blocks come back unchanged for row counts
    /// that are not whole tiles and odd super-block counts; rows dequantize as candle's
    /// `to_float` (ggml's `dequantize_row_q6_K`) bit for bit.
    #[test]
    fn tiles_round_trip_to_ggml_bytes() {
        for (n, kb) in [(1, 1), (13, 3), (16, 2), (70, 4)] {
            let w = blocks(n, kb, 3 + n as u64);
            let t = Tiled::from_ggml(&w, n, kb);
            assert_eq!(t.to_ggml(), w, "[{n}, {kb} super-blocks]");
            assert_eq!(t.ggml_bytes(), w.len());
            assert_eq!(t.bytes().len(), n.div_ceil(TILE) * tile_lines(kb) * 64);
            let mut got = vec![0f32; n * kb * QK_K];
            t.dequantize_rows(0..n, &mut got);
            let want = candle_blocks(&w, n, kb * QK_K)
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits())
            );
        }
        // Every byte of a tile is some row's byte exactly once; at an even `kb` nothing else.
        for kb in [1, 2, 3] {
            let mut seen = vec![false; tile_lines(kb) * 64];
            for r in 0..TILE {
                for b in 0..kb {
                    for i in 0..BLOCK_BYTES {
                        assert!(!std::mem::replace(&mut seen[position(kb, r, b, i)], true));
                    }
                }
            }
            let used = seen.iter().filter(|&&s| s).count();
            assert_eq!(used, TILE * kb * BLOCK_BYTES);
            assert_eq!(kb % 2 == 0, used == seen.len());
        }
    }

    /// Every path of the kernel equals the scalar reference bit for bit: one row (the chunked
    /// path: partial last tiles, a partial last chunk (1100 rows at k = 256 are 69 tiles, 44 a
    /// chunk), several chunks at k = 4608, odd super-block counts), two rows (register tiles
    /// of 2 x 2), and 3+ rows (4 x 1 and remainders, several row chunks a tile pair).
    #[test]
    fn kernel_equals_the_scalar_reference_bitwise() {
        for (m, n, kb) in [
            (1, 1, 1),
            (1, 1100, 1),
            (1, 16, 1),
            (1, 1, 3),
            (1, 130, 18),
            (1, 65, 5),
            (1, 1024, 4),
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
            assert_eq!(got.len(), m * n);
            for (i, a) in a.chunks_exact(kb).enumerate() {
                for o in 0..n {
                    let (g, want) = (got[i * n + o], reference_dot(&w, o, a));
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "[{m}, {k}] x [{n}, {k}] ({i}, {o}): {g} vs {want}"
                    );
                }
            }
        }
    }

    /// The reference is candle's own Q6_K product (its block dot against the same Q8_K
    /// blocks, which sums the same exact integers in another f32 order) within rounding, and
    /// within f32 rounding of the f64 dot of the dequantized weight and activations.
    #[test]
    fn reference_is_candles_block_dot_within_rounding() {
        let (m, n, kb) = (3, 40, 4);
        let k = kb * QK_K;
        let raw = blocks(n, kb, 7);
        let w = Tiled::from_ggml(&raw, n, kb);
        let x = activations(m, k, 8);
        let a = quantize_rows(&x, k);
        let got = matmul(&w, &a, m);
        let qm = candle_core::quantized::QMatMul::from_qtensor(candle_blocks(&raw, n, k)).unwrap();
        let xt = candle_core::Tensor::from_vec(x, (m, k), &candle_core::Device::Cpu).unwrap();
        let theirs = candle_core::Module::forward(&qm, &xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut dense = vec![0f32; n * k];
        w.dequantize_rows(0..n, &mut dense);
        for (i, a) in a.chunks_exact(kb).enumerate() {
            let xq: Vec<f64> = a
                .iter()
                .flat_map(|a| a.qs.map(|q| f64::from(a.d) * f64::from(q)))
                .collect();
            for o in 0..n {
                let row = &dense[o * k..(o + 1) * k];
                let exact: f64 = row.iter().zip(&xq).map(|(&w, &x)| f64::from(w) * x).sum();
                let size: f64 = row
                    .iter()
                    .zip(&xq)
                    .map(|(&w, &x)| (f64::from(w) * x).abs())
                    .sum();
                // The dequantized weight's own rounding (`d·sc·(q − 32)`) and the f32 sums'.
                let tol = 8.0 * f64::from(f32::EPSILON) * size;
                let g = f64::from(got[i * n + o]);
                assert!((g - exact).abs() <= tol, "({i}, {o}): {g} vs {exact}");
                let c = f64::from(theirs[i * n + o]);
                assert!((g - c).abs() <= tol, "({i}, {o}): {g} vs candle's {c}");
            }
        }
    }

    /// The extremes of the integer arithmetic: every `q` 63 (and 0), scales -128 and 127,
    /// against activations of -128 and 127.
    #[test]
    fn extremes_match_the_reference() {
        let (n, kb) = (16, 2);
        for (qbyte, sc) in [(0xFFu8, -128i8), (0xFF, 127), (0x00, -128), (0x00, 127)] {
            let mut w = blocks(n, kb, 1);
            for block in w.chunks_exact_mut(BLOCK_BYTES) {
                block[..192].fill(qbyte);
                block[192..208].fill(sc as u8);
            }
            let t = Tiled::from_ggml(&w, n, kb);
            for fill in [-128i8, 127] {
                let mut a = quantize_rows(&vec![1.0; kb * QK_K], kb * QK_K);
                for a in &mut a {
                    a.qs = [fill; QK_K];
                    a.bsums = [i16::from(fill) * 16; QK_K / 16];
                }
                for m in [1, 3] {
                    let a: Vec<BlockQ8K> = (0..m).flat_map(|_| a.clone()).collect();
                    let got = matmul(&t, &a, m);
                    for (o, &v) in got.iter().enumerate() {
                        let want = reference_dot(&t, o % n, &a[..kb]);
                        assert_eq!(v.to_bits(), want.to_bits(), "{qbyte} {sc} {fill}: {o}");
                        // Per super-block `d·sc·(q − 32)·256·fill·d_a`.
                        let q = if qbyte == 0 { -32.0 } else { 31.0 };
                        let exact: f64 = (0..kb)
                            .map(|b| {
                                let block = &w[(o % n * kb + b) * BLOCK_BYTES..];
                                let d = f64::from(f16_bits(u16::from_le_bytes([
                                    block[208], block[209],
                                ])));
                                d * f64::from(sc) * q * 256.0 * f64::from(fill)
                            })
                            .sum::<f64>()
                            * f64::from(a[0].d);
                        assert!((f64::from(v) - exact).abs() <= 1e-5 * exact.abs());
                    }
                }
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
    use candle_core::quantized::GgmlDType;
    use candle_core::quantized::k_quants::{BlockQ6K, BlockQ8K as CandleQ8K, GgmlType};

    fn candle(w: &[u8], n: usize, k: usize) -> candle_core::quantized::QTensor {
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            GgmlDType::Q6K,
            w,
            vec![n, k],
            &candle_core::Device::Cpu,
        )
        .unwrap()
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

    /// The 450M LM head (65536x1024, 52.5 MiB) by one row: ours (quantize + kernel) against
    /// candle's block dot (`quant::matvec`, the path before this kernel) and a 2-thread read of
    /// the tiles, taking turns; then many rows at the Q4_K_M `ffn_down`/`attn_v`-like shapes
    /// against candle's `QMatMul` (`cargo test --release --lib q6k_vnni::measure -- --ignored
    /// --nocapture`).
    #[test]
    #[ignore = "measurement"]
    fn against_candle() {
        let dev = candle_core::Device::Cpu;
        let (n, k) = (65536, 1024);
        let raw = blocks(n, k / QK_K, 3);
        let t = Tiled::from_ggml(&raw, n, k / QK_K);
        let x = activations(1, k, 5);
        let ours = || {
            std::hint::black_box(matmul(&t, &q4k::quantize_rows(&x, k), 1));
        };
        // candle's block dot per output over its blocks, 64 outputs a task (`quant::matvec`).
        let qt = candle(&raw, n, k);
        let data = qt.data().unwrap();
        // SAFETY: candle's CPU storage of Q6_K blocks is a `Vec<BlockQ6K>` viewed as bytes.
        let wb: &[BlockQ6K] =
            unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), data.len() / BLOCK_BYTES) };
        let theirs = || {
            let mut a = vec![CandleQ8K::zeros(); k / QK_K];
            CandleQ8K::from_float(&x, &mut a);
            let mut y = vec![0f32; n];
            y.par_chunks_mut(64)
                .zip(wb.par_chunks(64 * k / QK_K))
                .for_each(|(y, w)| {
                    for (y, w) in y.iter_mut().zip(w.chunks_exact(k / QK_K)) {
                        *y = BlockQ6K::vec_dot(k, w, &a);
                    }
                });
            std::hint::black_box(y);
        };
        let floor = || {
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
        };
        let mut times = [vec![], vec![], vec![]];
        for _ in 0..20 {
            for (f, t) in [&ours as &dyn Fn(), &theirs, &floor]
                .into_iter()
                .zip(&mut times)
            {
                let s = std::time::Instant::now();
                f();
                t.push(s.elapsed().as_secs_f64() * 1e3);
            }
        }
        let [o, c, f] = times.map(|mut t| {
            t.sort_by(f64::total_cmp);
            (t[0], t[t.len() / 2])
        });
        eprintln!(
            "LM head 1 x [{n}, {k}] Q6_K ({:.1} MiB), best / median of 20: ours {:.3} / {:.3} ms, \
             candle block dot {:.3} / {:.3} ms, 2-thread read {:.3} / {:.3} ms",
            raw.len() as f64 / 1048576.0,
            o.0,
            o.1,
            c.0,
            c.1,
            f.0,
            f.1
        );
        // One row against a weight that stays in L2 (420 KiB): the kernel's own rate.
        {
            let (n, k) = (512, 1024);
            let raw = blocks(n, k / QK_K, 4);
            let t = Tiled::from_ggml(&raw, n, k / QK_K);
            let a = q4k::quantize_rows(&activations(1, k, 6), k);
            let ours = best_of(5, 400, &|| {
                std::hint::black_box(matmul(&t, &a, 1));
            });
            // The kernel alone on this thread, no task hand-off.
            let off = offsets(&a);
            let mut out = vec![0f32; n];
            let dst = OutPtr(out.as_mut_ptr());
            let single = best_of(5, 400, &|| {
                // SAFETY: the test runs on an AVX-512 VNNI CPU (`available`); `out` holds `n`.
                unsafe { row_avx512(&t, &a, &off, 0..n / TILE, &dst) };
            });
            std::hint::black_box(out);
            eprintln!(
                "1 row x [{n}, {k}] from L2: ours {ours:.4} ms ({:.1} GB/s), on one thread \
                 {single:.4} ms ({:.1} GB/s)",
                raw.len() as f64 / 1e6 / ours,
                raw.len() as f64 / 1e6 / single
            );
        }
        for (m, n, k) in [
            (2, 65536, 1024),
            (8, 65536, 1024),
            (270, 1024, 4608),
            (270, 512, 1024),
            (270, 4608, 1024),
        ] {
            let raw = blocks(n, k / QK_K, 4);
            let t = Tiled::from_ggml(&raw, n, k / QK_K);
            let x = activations(m, k, 6);
            let mm = candle_core::quantized::QMatMul::from_qtensor(candle(&raw, n, k)).unwrap();
            let xt = candle_core::Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
            let _ = mm.forward(&xt).unwrap();
            let theirs = best_of(3, 3, &|| {
                std::hint::black_box(mm.forward(&xt).unwrap());
            });
            let ours = best_of(3, 3, &|| {
                std::hint::black_box(matmul(&t, &q4k::quantize_rows(&x, k), m));
            });
            eprintln!(
                "[{m}, {k}] x [{n}, {k}] Q6_K: candle QMatMul {theirs:.3} ms, ours {ours:.3} ms \
                 ({:.0} GMAC/s)",
                (m * n * k) as f64 / 1e6 / ours
            );
        }
    }
}
