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
//! every output is bitwise what ggml's block dot (candle's `vec_dot`, which `QMatMul` runs
//! except on AVX-512 VNNI CPUs) computes for the same blocks, whatever the tile.
//! The same arithmetic in scalar code is the fallback where AVX2, FMA or F16C are missing, and
//! the tests' reference. Activations are quantized as candle's
//! `BlockQ8_0::from_float` does ([`quantize_rows`]).
//!
//! Where it runs: CPUs without AVX-512 VNNI (decode steps; many rows take `quant::prefill`'s
//! dequantized panels). On AVX-512 VNNI CPUs every Q8_0 product runs [`super::q8_vnni`]
//! instead, which measured faster than this kernel and than candle's VNNI tiles there.

use rayon::prelude::*;

use super::tasks::OutPtr;

/// Whether this CPU has the integer dot product candle's repacked Q8_0 tiles need (AVX-512 VNNI
/// with AVX-512F, or AVX-VNNI with AVX2: its `repack_x86::level`, which is private); on plain
/// AVX2 candle does not tile Q8_0 and our kernels take every product. (With AVX-512 VNNI our
/// own tiles, [`super::q8_vnni`], take them; candle's only with `VLMPIPE_QUANT_PRODUCT=qmatmul`.)
pub(crate) fn candle_has_vnni_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"))
            || (is_x86_feature_detected!("avxvnni") && is_x86_feature_detected!("avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

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

/// Blocks as the bytes a GGUF file (or candle's storage) holds: the inverse of [`view_blocks`].
pub(crate) fn blocks_as_bytes(blocks: &[BlockQ8_0]) -> &[u8] {
    // SAFETY: a block is 34 plain bytes (`repr(C)`, alignment 1), so the slice is
    // `34 * len` initialised bytes.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast(), std::mem::size_of_val(blocks)) }
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

/// Weight rows a group interleaves ([`Grouped`]).
pub(crate) const GROUP: usize = 8;

/// One 64-byte line of [`Grouped`] storage (its alignment is the point).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Q8_0 weight rows `[n, k]` regrouped for streaming: the same bytes as ggml's `n * k / 32`
/// blocks, permuted (see the module docs). Group `g` (rows `8g..8g + 8`, zero rows past `n`)
/// starts at line `g * group_lines`: first `kb` runs of 8 f16 scales (row order), padded to a
/// line, then `kb` runs of 8 x 32 quants.
pub(crate) struct Grouped {
    lines: Vec<Line>,
    n: usize,
    kb: usize,
}

impl std::fmt::Debug for Grouped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grouped([{}, {}])", self.n, self.kb * QK8_0)
    }
}

impl Grouped {
    /// Bytes of a group's scales (`kb` runs of 8 f16), padded to whole lines.
    fn scale_bytes(kb: usize) -> usize {
        (kb * GROUP * 2).next_multiple_of(64)
    }

    fn group_bytes(kb: usize) -> usize {
        Self::scale_bytes(kb) + kb * GROUP * QK8_0
    }

    /// Regroups `n` rows of `kb` ggml blocks.
    pub(crate) fn from_blocks(w: &[BlockQ8_0], n: usize, kb: usize) -> Self {
        assert_eq!(w.len(), n * kb, "Grouped: weight is not [n, kb] blocks");
        let groups = n.div_ceil(GROUP);
        let group_bytes = Self::group_bytes(kb);
        let mut lines = vec![Line([0; 64]); groups * group_bytes / 64];
        let scale_bytes = Self::scale_bytes(kb);
        // Groups are independent; each fills its own lines.
        lines
            .par_chunks_mut((group_bytes / 64).max(1))
            .enumerate()
            .for_each(|(g, group)| {
                // SAFETY: `Line` is 64 plain bytes; the group's lines are contiguous.
                let bytes = unsafe {
                    std::slice::from_raw_parts_mut(group.as_mut_ptr().cast::<u8>(), group_bytes)
                };
                for r in g * GROUP..n.min((g + 1) * GROUP) {
                    let j = r % GROUP;
                    for (l, b) in w[r * kb..(r + 1) * kb].iter().enumerate() {
                        let d = l * GROUP * 2 + j * 2;
                        bytes[d..d + 2].copy_from_slice(&b.d);
                        let q = scale_bytes + (l * GROUP + j) * QK8_0;
                        for (dst, &src) in bytes[q..q + QK8_0].iter_mut().zip(&b.qs) {
                            *dst = src as u8;
                        }
                    }
                }
            });
        Self { lines, n, kb }
    }

    /// The ggml blocks again, row by row (what a GGUF file or candle's `QTensor` holds).
    pub(crate) fn to_blocks(&self) -> Vec<BlockQ8_0> {
        let mut out = Vec::with_capacity(self.n * self.kb);
        for r in 0..self.n {
            for l in 0..self.kb {
                out.push(BlockQ8_0 {
                    d: self.scale_bits(r, l).to_le_bytes(),
                    qs: *self.quants(r, l),
                });
            }
        }
        out
    }

    /// Output rows (weight rows).
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// Blocks per row.
    pub(crate) fn kb(&self) -> usize {
        self.kb
    }

    /// Bytes of the ggml blocks this holds (`n * kb * 34`, padding rows not counted).
    pub(crate) fn ggml_bytes(&self) -> usize {
        self.n * self.kb * std::mem::size_of::<BlockQ8_0>()
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes, so the lines are `64 * len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.lines.len() * 64) }
    }

    fn group_start(&self, g: usize) -> usize {
        g * Self::group_bytes(self.kb)
    }

    fn scale_bits(&self, r: usize, l: usize) -> u16 {
        let at = self.group_start(r / GROUP) + l * GROUP * 2 + (r % GROUP) * 2;
        let b = self.bytes();
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn quants(&self, r: usize, l: usize) -> &[i8; QK8_0] {
        let at = self.group_start(r / GROUP)
            + Self::scale_bytes(self.kb)
            + (l * GROUP + r % GROUP) * QK8_0;
        let q: &[u8; QK8_0] = self.bytes()[at..at + QK8_0].try_into().expect("32 bytes");
        // SAFETY: `i8` and `u8` have the same size and alignment; every bit pattern is valid.
        unsafe { &*(q as *const [u8; QK8_0]).cast::<[i8; QK8_0]>() }
    }

    /// Rows `rows` dequantized into `out` (`rows.len() * k` floats), as candle's
    /// `BlockQ8_0::to_float` (`d * q`, exact in f32).
    pub(crate) fn dequantize_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let k = self.kb * QK8_0;
        assert!(rows.end <= self.n && out.len() == rows.len() * k);
        for (r, out) in rows.zip(out.chunks_exact_mut(k.max(1))) {
            for (l, out) in out.chunks_exact_mut(QK8_0).enumerate() {
                let d = half::f16::from_bits(self.scale_bits(r, l)).to_f32();
                for (o, &q) in out.iter_mut().zip(self.quants(r, l)) {
                    *o = f32::from(q) * d;
                }
            }
        }
    }

    /// Where row `r`'s quants and scale of block 0 are, and the steps to the next block.
    fn row_ptrs(&self, r: usize) -> RowPtrs {
        let base = self.group_start(r / GROUP);
        let j = r % GROUP;
        let bytes = self.bytes().as_ptr();
        RowPtrs {
            // SAFETY: both offsets lie inside group `r / GROUP`'s bytes.
            qs: unsafe { bytes.add(base + Self::scale_bytes(self.kb) + j * QK8_0) }.cast(),
            // SAFETY: as above.
            d: unsafe { bytes.add(base + j * 2) },
        }
    }
}

/// A weight row's first quants and scale in [`Grouped`] storage; block `l` is `l * GROUP * 32`
/// bytes on for the quants and `l * GROUP * 2` for the scale.
#[derive(Clone, Copy)]
struct RowPtrs {
    qs: *const i8,
    d: *const u8,
}

const QS_STEP: usize = GROUP * QK8_0;
const D_STEP: usize = GROUP * 2;

/// `y [m, n] = a [m, k] . w [n, k]^T` for Q8_0 weight rows `w` and quantized activation rows
/// `a` ([`quantize_rows`], `m * k / 32` blocks): `m * n` floats, row-major. Parallel over
/// output columns; AVX2 where the CPU has it, else scalar code with the same arithmetic (the
/// same values).
pub(crate) fn matmul(w: &Grouped, a: &[BlockQ8_0], m: usize) -> Vec<f32> {
    let (n, kb) = (w.n, w.kb);
    assert_eq!(a.len(), m * kb, "q8 matmul: activation is not [m, k]");
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_available() {
        let a_scales: Vec<f32> = a.iter().map(|b| scale(b.d)).collect();
        let dst = OutPtr(out.as_mut_ptr());
        let panels = n.div_ceil(COLUMN_PANEL);
        // Few rows (decode): panels of 4 groups, so both cores stream weights; many rows: each
        // panel's weight blocks are reused across every activation row.
        (0..panels).into_par_iter().for_each(|p| {
            let cols = p * COLUMN_PANEL..n.min((p + 1) * COLUMN_PANEL);
            // SAFETY: the CPU has AVX2, FMA and F16C; `a` and `a_scales` hold `m` rows of `kb`
            // blocks (checked above); tasks write disjoint columns of `dst`, which holds `m * n`
            // floats.
            unsafe { panel_avx2(w, a, &a_scales, m, cols, &dst) };
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

/// Output columns (weight rows) a task computes for every activation row: 4 groups.
const COLUMN_PANEL: usize = 4 * GROUP;
/// Activation rows of a register tile.
const TILE_M: usize = 4;
/// Weight rows of a register tile for many activation rows: 4 x 2 accumulators, the two
/// weight blocks and their absolute values leave room for the temporaries in 16 registers.
const TILE_N: usize = 2;
/// Blocks ahead a one-row product prefetches its group's quants (8 x 256 bytes): measured
/// against 0, 16 and 24 at the 450M decode shapes (`BENCHMARKS.md`).
const PREFETCH_BLOCKS: usize = 8;

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

/// [`matmul`] in scalar code over ggml's blocks, lane for lane the AVX2 kernel's arithmetic
/// (the tests' reference).
#[cfg(test)]
pub(crate) fn matmul_reference(
    w: &[BlockQ8_0],
    a: &[BlockQ8_0],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let kb = k / QK8_0;
    let g = Grouped::from_blocks(w, n, kb);
    let mut out = vec![0f32; m * n];
    for (y, a) in out.chunks_exact_mut(n).zip(a.chunks_exact(kb)) {
        for (r, y) in y.iter_mut().enumerate() {
            *y = dot_reference(&g, r, a);
        }
    }
    out
}

/// A block's f16 scale in f32.
fn scale(d: [u8; 2]) -> f32 {
    half::f16::from_le_bytes(d).to_f32()
}

/// Weight row `r`'s dot product with one activation row as the AVX2 kernel computes it: eight
/// f32 lanes, each adding one `i32` sum of four products per block by an FMA, summed as
/// `hsum_float_8` does.
fn dot_reference(w: &Grouped, r: usize, a: &[BlockQ8_0]) -> f32 {
    let mut acc = [0f32; 8];
    for (l, a) in a.iter().enumerate() {
        let d = half::f16::from_bits(w.scale_bits(r, l)).to_f32() * scale(a.d);
        // `_mm256_maddubs_epi16(|w|, sign(a, w))`: pairs of `u8 x i8` products summed with
        // saturation to i16; `_mm256_madd_epi16` by ones adds neighbouring pairs into i32.
        let mut pairs = [0i16; 16];
        let operands = w.quants(r, l).chunks_exact(2).zip(a.qs.chunks_exact(2));
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
/// The CPU must have AVX2, FMA and F16C; `a`, `a_scales` hold `m` rows of `w.kb` blocks;
/// `dst` points to `m * w.n` floats of which this call alone writes the columns `cols`, which
/// start on a group.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_avx2(
    w: &Grouped,
    a: &[BlockQ8_0],
    a_scales: &[f32],
    m: usize,
    cols: std::ops::Range<usize>,
    dst: &OutPtr,
) {
    let (n, kb) = (w.n, w.kb);
    if m == 1 {
        let mut out = [0f32; GROUP];
        for g in cols.start / GROUP..cols.end.div_ceil(GROUP) {
            // SAFETY: group `g` exists (`cols` lies in `0..n`); `a` is one row of `kb` blocks.
            unsafe { group_row_avx2(w, g, a, a_scales, &mut out) };
            let rows = g * GROUP..n.min((g + 1) * GROUP);
            // SAFETY: these outputs are in this task's columns of the `[1, n]` buffer.
            let y = unsafe { std::slice::from_raw_parts_mut(dst.0.add(rows.start), rows.len()) };
            y.copy_from_slice(&out[..rows.len()]);
        }
        return;
    }
    let mut i = 0;
    while i < m {
        let rows = TILE_M.min(m - i);
        let mut j = cols.start;
        while j < cols.end {
            let width = TILE_N.min(cols.end - j);
            let t = TileArgs {
                w: [w.row_ptrs(j), w.row_ptrs(if width > 1 { j + 1 } else { j })],
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

/// One activation row against the 8 weight rows of group `g`: the group's scales are
/// converted 8 at a time and its aligned quants streamed front to back (see the module docs).
/// Lane for lane the arithmetic of [`tile`] (`d_w * d_a` rounded once, then one FMA a block).
///
/// # Safety
/// As [`panel_avx2`], and group `g` exists in `w`; `a`, `a_scales` are one row of `w.kb`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_row_avx2(
    w: &Grouped,
    g: usize,
    a: &[BlockQ8_0],
    a_scales: &[f32],
    out: &mut [f32; GROUP],
) {
    use std::arch::x86_64::*;
    let kb = w.kb;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); GROUP];
    let base = w.bytes()[w.group_start(g)..].as_ptr();
    let scales = base;
    // SAFETY: the quants follow the scales inside group `g`.
    let quants = unsafe { base.add(Grouped::scale_bytes(kb)) };
    for (l, (ab, &ad)) in a.iter().zip(a_scales).enumerate() {
        // SAFETY: block `l` of the group and of the activation row exist; the quants are on
        // 32-byte boundaries (lines of 64, runs of 32); a prefetch may point anywhere.
        unsafe {
            let aq = _mm256_loadu_si256(ab.qs.as_ptr().cast());
            let d = _mm256_mul_ps(
                _mm256_cvtph_ps(_mm_loadu_si128(scales.add(l * D_STEP).cast())),
                _mm256_set1_ps(ad),
            );
            let q = quants.add(l * QS_STEP);
            let ahead = q.wrapping_add(PREFETCH_BLOCKS * QS_STEP);
            for line in 0..QS_STEP / 64 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line).cast());
            }
            for (j, acc) in acc.iter_mut().enumerate() {
                let wq = _mm256_load_si256(q.add(j * QK8_0).cast());
                let dot = _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(aq, wq));
                let f = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, dot));
                let dj = _mm256_permutevar8x32_ps(d, _mm256_set1_epi32(j as i32));
                *acc = _mm256_fmadd_ps(dj, f, *acc);
            }
        }
    }
    for (o, v) in out.iter_mut().zip(&acc) {
        *o = hsum8_avx(*v);
    }
}

/// `hsum_float_8`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn hsum8_avx(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let h = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_movehdup_ps(h));
    _mm_cvtss_f32(h)
}

/// One register tile's operands: `RM` activation rows from `a`, `RN` weight rows `w`, outputs
/// at `c` with row stride `ldc`.
#[cfg(target_arch = "x86_64")]
struct TileArgs {
    w: [RowPtrs; TILE_N],
    a: *const BlockQ8_0,
    a_scales: *const f32,
    kb: usize,
    c: *mut f32,
    ldc: usize,
}

/// `RM x RN` outputs over all `kb` blocks (ggml's block dot, see the module docs).
///
/// # Safety
/// As [`panel_avx2`]: AVX2, FMA and F16C, and `RM` activation rows of `kb` blocks behind
/// `t.a`, `t.a_scales`, `RN` weight rows behind `t.w`, outputs writable at `t.c`.
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
            unsafe {
                wq[j] = _mm256_load_si256(t.w[j].qs.add(l * QS_STEP).cast());
                let bits = i32::from(u16::from_le_bytes([
                    *t.w[j].d.add(l * D_STEP),
                    *t.w[j].d.add(l * D_STEP + 1),
                ]));
                wd[j] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
            }
            wabs[j] = _mm256_sign_epi8(wq[j], wq[j]);
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
            // SAFETY: output `(i, j)` of the tile is writable (the caller's contract).
            unsafe { *t.c.add(i * t.ldc + j) = hsum8_avx(*v) };
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
            let got = matmul(&Grouped::from_blocks(&w, n, k / QK8_0), &a, m);
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
            matmul(&Grouped::from_blocks(&w, 1, 3), &a, 1)[0].to_bits(),
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

    /// Regrouping is a permutation: the ggml blocks come back unchanged, for row counts that
    /// are not whole groups and widths whose scales do not fill a line; every row dequantizes
    /// as candle's `to_float` does.
    #[test]
    fn grouped_rows_are_the_ggml_blocks_permuted() {
        for (n, kb) in [(1, 1), (13, 3), (16, 4), (70, 36)] {
            let w = quantize_rows(&values(n * kb * QK8_0, 5 + n as u64), kb * QK8_0);
            let g = Grouped::from_blocks(&w, n, kb);
            assert_eq!(g.to_blocks(), w, "[{n}, {kb} blocks]");
            assert_eq!(g.ggml_bytes(), n * kb * 34);
            let mut got = vec![0f32; n * kb * QK8_0];
            g.dequantize_rows(0..n, &mut got);
            let bytes = blocks_as_bytes(&w);
            let dev = candle_core::Device::Cpu;
            let want = candle_core::quantized::ggml_file::qtensor_from_ggml(
                candle_core::quantized::GgmlDType::Q8_0,
                bytes,
                vec![n, kb * QK8_0],
                &dev,
            )
            .unwrap()
            .dequantize(&dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            assert_eq!(got, want);
        }
    }
}
