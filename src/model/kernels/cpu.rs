//! CPU f32 inference kernels that call the `gemm` crate directly.
//!
//! candle's CPU matmul zero-fills every output before the product overwrites it, adds a bias in a
//! second pass, and an attention written with candle ops materialises every head's `[n, n]`
//! scores and copies heads in and out of `[heads, n, hd]` layouts. Profiles of the 450M model put
//! those passes at about a fifth of a classification. The kernels here read and write the packed
//! `[rows, features]` layout in place through strides instead.
//!
//! Every function takes plain slices; `crate::model::ops` decides when a tensor is eligible
//! (CPU, f32, not tracked by autograd) and falls back to candle ops otherwise.

use std::marker::PhantomData;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::exp::fast_exp;
use super::packed::{Kernel, PackedWeight};

/// A strided read-only matrix view into a slice: element `(i, j)` is
/// `data[offset + i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `[rows, cols]` matrix starting at `data[0]`.
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            offset: 0,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The same elements seen as the transposed matrix.
    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows `start..start + len`.
    pub(crate) fn rows(self, start: usize, len: usize) -> Self {
        Self {
            offset: self.offset + start * self.row_stride,
            rows: len,
            ..self
        }
    }

    /// Columns `start..start + len`.
    pub(crate) fn cols(self, start: usize, len: usize) -> Self {
        Self {
            offset: self.offset + start * self.col_stride,
            cols: len,
            ..self
        }
    }

    /// `true` when every addressed element lies inside `data`.
    fn in_bounds(&self) -> bool {
        extent(
            self.offset,
            self.rows,
            self.cols,
            self.row_stride,
            self.col_stride,
        )
        .is_some_and(|end| end <= self.data.len())
    }
}

/// One past the largest index a strided matrix touches (`Some(offset)` when it is empty).
fn extent(offset: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(offset);
    }
    let last = (rows - 1)
        .checked_mul(rs)?
        .checked_add((cols - 1).checked_mul(cs)?)?;
    offset.checked_add(last)?.checked_add(1)
}

/// Where a product is written: `(i, j)` lands at `offset + i * row_stride + j * col_stride`, in a
/// slice of initialised floats or in reserved, not yet initialised capacity.
pub(crate) struct MatMut<'a> {
    ptr: *mut f32,
    len: usize,
    offset: usize,
    row_stride: usize,
    col_stride: usize,
    /// `false` for reserved capacity, which a product may write but never read.
    initialized: bool,
    _borrow: PhantomData<&'a mut [f32]>,
}

impl<'a> MatMut<'a> {
    /// A row-major destination with `row_stride` between rows.
    pub(crate) fn new(data: &'a mut [f32], offset: usize, row_stride: usize) -> Self {
        Self {
            ptr: data.as_mut_ptr(),
            len: data.len(),
            offset,
            row_stride,
            col_stride: 1,
            initialized: true,
            _borrow: PhantomData,
        }
    }

    /// A destination in uninitialised memory (e.g. `Vec::spare_capacity_mut`); only a product
    /// without `accumulate` may write it, since that never reads its destination.
    pub(crate) fn uninit(
        data: &'a mut [MaybeUninit<f32>],
        offset: usize,
        row_stride: usize,
    ) -> Self {
        Self {
            ptr: data.as_mut_ptr().cast(),
            len: data.len(),
            offset,
            row_stride,
            col_stride: 1,
            initialized: false,
            _borrow: PhantomData,
        }
    }

    /// The same destination written transposed: `(i, j)` lands where `(j, i)` did.
    pub(crate) fn t(self) -> Self {
        Self {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// `dst = scale * lhs @ rhs`, or `dst += scale * lhs @ rhs` when `accumulate`.
///
/// Without `accumulate` the destination is written, never read (gemm zeroes its `alpha` then and
/// every kernel path stores without loading). Panics only on a shape or bounds mismatch, which is
/// a bug in the caller, never in user input.
pub(crate) fn gemm(
    dst: MatMut<'_>,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    scale: f32,
    accumulate: bool,
    threads: usize,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "gemm: inner dimensions differ");
    assert!(
        dst.initialized || !accumulate,
        "gemm: cannot accumulate into uninitialised memory"
    );
    assert!(
        lhs.in_bounds() && rhs.in_bounds(),
        "gemm: operand out of bounds"
    );
    let dst_end = extent(dst.offset, m, n, dst.row_stride, dst.col_stride);
    assert!(
        dst_end.is_some_and(|end| end <= dst.len),
        "gemm: destination out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: all three views were bounds-checked above against their buffers (every index the
    // strides address is inside), `dst` holds a unique borrow so nothing else aliases it, an
    // uninitialised `dst` was asserted above to be only written (no `accumulate`), and the strides
    // fit `isize` because they index into allocations.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr.add(dst.offset),
            dst.col_stride as isize,
            dst.row_stride as isize,
            accumulate,
            lhs.data.as_ptr().add(lhs.offset),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr().add(rhs.offset),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `x [m, k] @ w[n, k]^T (+ bias [n])` into a new row-major `[m, n]` buffer.
pub(crate) fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "linear: input is not [m, k]");
    assert_eq!(w.len(), n * k, "linear: weight is not [n, k]");
    let lhs = MatRef::row_major(x, m, k);
    let rhs = MatRef::row_major(w, n, k).t();
    let threads = rayon::current_num_threads();
    match bias {
        // The bias rows are the destination the product accumulates into: no second pass.
        Some(b) => {
            assert_eq!(b.len(), n, "linear: bias is not [n]");
            let mut out = Vec::with_capacity(m * n);
            for _ in 0..m {
                out.extend_from_slice(b);
            }
            gemm(MatMut::new(&mut out, 0, n), lhs, rhs, 1.0, true, threads);
            out
        }
        // Zero-filling the output first (as candle does) is a wasted pass over memory.
        None => {
            let mut out = Vec::with_capacity(m * n);
            gemm(
                MatMut::uninit(&mut out.spare_capacity_mut()[..m * n], 0, n),
                lhs,
                rhs,
                1.0,
                false,
                threads,
            );
            // SAFETY: the product above wrote all `m * n` elements (gemm without `accumulate`
            // stores every destination element).
            unsafe { out.set_len(m * n) };
            out
        }
    }
}

/// Shape of a fused attention call over packed `[rows, heads * head_dim]` activations.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttentionShape {
    pub q_rows: usize,
    pub kv_rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q . k` before the softmax.
    pub scale: f32,
    /// `Some(past)`: query `i` sits at absolute position `past + i` and sees keys `0..=past + i`.
    pub causal_past: Option<usize>,
}

/// Rows `[start, start + len)` of a packed `[N, features]` matrix that belong to one view (one
/// image tile): vision attention and the projector's pixel unshuffle work view by view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewSpan {
    pub start: usize,
    pub rows: usize,
    pub cols: usize,
}

impl ViewSpan {
    pub(crate) fn len(&self) -> usize {
        self.rows * self.cols
    }
}

/// Bidirectional attention of packed views: `q`, `k`, `v` are `[N, width]` (`width = heads *
/// head_dim`) and each view's rows attend only to its own rows. Returns `[N, width]`, or what is
/// wrong when the views do not tile the `N` rows exactly.
pub(crate) fn packed_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    width: usize,
    spans: &[ViewSpan],
    heads: usize,
    scale: f32,
) -> Result<Vec<f32>, &'static str> {
    let mut out = Vec::with_capacity(q.len());
    for span in spans {
        let rows = span.start * width..(span.start + span.len()) * width;
        let shape = AttentionShape {
            q_rows: span.len(),
            kv_rows: span.len(),
            heads,
            kv_heads: heads,
            head_dim: width / heads,
            scale,
            causal_past: None,
        };
        let (Some(qv), Some(kv), Some(vv)) =
            (q.get(rows.clone()), k.get(rows.clone()), v.get(rows))
        else {
            return Err("a view runs past the patches");
        };
        out.extend(attention(qv, kv, vv, shape));
    }
    Ok(out)
}

/// Query rows per task: the `[rows, kv_rows]` scores of one task stay in L2 cache.
const ATTENTION_BLOCK_ROWS: usize = 64;

/// `softmax(scale * q k^T) v` per head, reading and writing the packed layout directly.
///
/// `q` is `[q_rows, heads * head_dim]`, `k`/`v` are `[kv_rows, kv_heads * head_dim]` (query head
/// `h` uses key/value head `h / (heads / kv_heads)`); returns `[q_rows, heads * head_dim]`. Work is
/// split into (head, block of query rows) tasks over the rayon pool, each running single-threaded
/// products, so no `[heads, n, n]` score tensor and no head transposes are ever built. Where the
/// weights are packed ([`Kernel::for_this_cpu`]) the products run on the packed kernel, each
/// key/value head packed once; else on the `gemm` crate.
pub(crate) fn attention(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape) -> Vec<f32> {
    attention_with(q, k, v, shape, Kernel::for_this_cpu())
}

/// [`attention`] on the packed `kernel`, or the `gemm` crate for `None`. The packed kernel's
/// products have only 64-deep (`q k^T`) or 64-wide (`p v`) operands, which the `gemm` crate ran at
/// 40-55% of the FMA peak in the vision tower's profile; with each head's keys and values packed
/// once, both products are the packed kernel's own tiles (BENCHMARKS.md, "Vision attention on
/// the packed kernel").
pub(crate) fn attention_with(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    kernel: Option<Kernel>,
) -> Vec<f32> {
    let AttentionShape {
        q_rows,
        kv_rows,
        heads,
        kv_heads,
        head_dim: hd,
        scale,
        causal_past,
    } = shape;
    assert!(
        kv_heads > 0 && heads % kv_heads == 0,
        "attention: bad head counts"
    );
    let (q_width, kv_width) = (heads * hd, kv_heads * hd);
    assert_eq!(
        q.len(),
        q_rows * q_width,
        "attention: q is not [rows, heads * hd]"
    );
    assert_eq!(k.len(), kv_rows * kv_width, "attention: k shape");
    assert_eq!(v.len(), kv_rows * kv_width, "attention: v shape");
    let groups = heads / kv_heads;
    let blocks = q_rows.div_ceil(ATTENTION_BLOCK_ROWS);
    let q_all = MatRef::row_major(q, q_rows, q_width);
    let k_all = MatRef::row_major(k, kv_rows, kv_width);
    let v_all = MatRef::row_major(v, kv_rows, kv_width);
    // Each key/value head's operands packed once for all its query blocks.
    let packed: Option<Vec<(PackedWeight, PackedWeight)>> = kernel.map(|kernel| {
        (0..kv_heads)
            .into_par_iter()
            .map(|g| {
                (
                    PackedWeight::pack_strided(&k[g * hd..], kv_rows, hd, kv_width, kernel),
                    PackedWeight::pack_transposed_strided(
                        &v[g * hd..],
                        kv_rows,
                        hd,
                        kv_width,
                        kernel,
                    ),
                )
            })
            .collect()
    });

    let pieces: Vec<(usize, usize, Vec<f32>)> = (0..heads * blocks)
        .into_par_iter()
        .map(|task| {
            let (h, block) = (task / blocks, task % blocks);
            let g = h / groups;
            let row0 = block * ATTENTION_BLOCK_ROWS;
            let rows = ATTENTION_BLOCK_ROWS.min(q_rows - row0);
            // Keys beyond the block's last query are masked for every row of a causal block.
            let keys = match causal_past {
                Some(past) => (past + row0 + rows).min(kv_rows),
                None => kv_rows,
            };
            let mut scores = vec![0f32; rows * keys];
            match &packed {
                Some(packed) => {
                    // The scale goes on the block's queries (`rows x hd`, not `rows x keys`).
                    let qs: Vec<f32> = q[row0 * q_width + h * hd..]
                        .chunks(q_width)
                        .take(rows)
                        .flat_map(|row| row[..hd].iter().map(|&x| x * scale))
                        .collect();
                    packed[g]
                        .0
                        .matmul_serial(&qs, rows, hd, keys, hd, &mut scores, keys);
                }
                None => gemm(
                    MatMut::new(&mut scores, 0, keys),
                    q_all.rows(row0, rows).cols(h * hd, hd),
                    k_all.rows(0, keys).cols(g * hd, hd).t(),
                    scale,
                    false,
                    1,
                ),
            }
            for (i, row) in scores.chunks_mut(keys).enumerate() {
                let visible = match causal_past {
                    Some(past) => (past + row0 + i + 1).min(keys),
                    None => keys,
                };
                softmax_in_place(&mut row[..visible]);
                row[visible..].fill(0.0);
            }
            let mut out = vec![0f32; rows * hd];
            match &packed {
                Some(packed) => packed[g]
                    .1
                    .matmul_serial(&scores, rows, keys, hd, keys, &mut out, hd),
                // Computed as `out^T = v^T scores^T`: both operands are then already in the
                // column-major panels gemm reads, so neither the scores nor v are repacked per
                // task.
                None => gemm(
                    MatMut::new(&mut out, 0, hd).t(),
                    v_all.rows(0, keys).cols(g * hd, hd).t(),
                    MatRef::row_major(&scores, rows, keys).t(),
                    1.0,
                    false,
                    1,
                ),
            }
            (h, row0, out)
        })
        .collect();

    let mut out = vec![0f32; q_rows * q_width];
    for (h, row0, piece) in pieces {
        for (i, src) in piece.chunks(hd).enumerate() {
            let start = (row0 + i) * q_width + h * hd;
            out[start..start + hd].copy_from_slice(src);
        }
    }
    out
}

/// Defines `pub fn $name` that runs `$body` (an `#[inline(always)]` function) compiled for
/// AVX2 + FMA when the CPU has them, and for the baseline target otherwise.
///
/// The crate is built for baseline x86-64 (SSE2) so the binary runs anywhere; without this, the
/// element-wise kernels below auto-vectorise only 4 lanes wide and without FMA.
macro_rules! simd_dispatch {
    ($(#[$doc:meta])* $name:ident, $avx2:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                // The bodies' 16-lane accumulators are one AVX-512 vector: the same operations
                // in the same order (no contraction into FMA), so the same bits, in half the
                // instructions of AVX2.
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports every feature `avx512` is compiled with.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports every feature `$avx2` is compiled with.
                    return unsafe { $avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx2($($arg: $ty),*) {
            $body($($arg),*)
        }
    };
}

simd_dispatch!(
    /// Softmax of one row in place; an all `-inf` row becomes all zeros rather than NaN.
    softmax_in_place,
    softmax_avx2,
    softmax_body,
    (row: &mut [f32])
);

simd_dispatch!(
    /// `y = x * sigmoid(x)` element-wise.
    silu_rows,
    silu_avx2,
    silu_body,
    (x: &[f32], y: &mut [f32])
);

simd_dispatch!(
    /// `y = gelu_tanh(x)` element-wise (`0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`).
    gelu_tanh_rows,
    gelu_tanh_avx2,
    gelu_tanh_body,
    (x: &[f32], y: &mut [f32])
);

/// Independent accumulators, so reductions vectorise (a single running float would force the
/// additions into sequence).
const LANES: usize = 16;

#[inline(always)]
fn softmax_body(row: &mut [f32]) {
    let mut maxes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &x) in maxes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&maxes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in sums.iter_mut().zip(chunk) {
            *x = fast_exp(*x - max);
            *s += *x;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = fast_exp(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[inline(always)]
fn silu_body(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x / (1.0 + fast_exp(-x));
    }
}

#[inline(always)]
fn gelu_tanh_body(x: &[f32], y: &mut [f32]) {
    // 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
    const K: f32 = 0.797_884_6;
    for (y, &x) in y.iter_mut().zip(x) {
        let u2 = 2.0 * K * (x + 0.044_715 * x * x * x);
        *y = x / (1.0 + fast_exp(-u2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn naive_matmul_wt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
            }
        }
        out
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn linear_matches_naive_with_and_without_bias() {
        for &(m, k, n) in &[(1, 3, 2), (17, 33, 65), (70, 128, 40)] {
            let x = pseudo_random(m * k, 1);
            let w = pseudo_random(n * k, 2);
            let b = pseudo_random(n, 3);
            let expected = naive_matmul_wt(&x, m, k, &w, n);
            assert!(max_diff(&linear(&x, m, k, &w, n, None), &expected) < 1e-4);
            let with_bias: Vec<f32> = expected
                .iter()
                .enumerate()
                .map(|(i, y)| y + b[i % n])
                .collect();
            assert!(max_diff(&linear(&x, m, k, &w, n, Some(&b)), &with_bias) < 1e-4);
        }
    }

    #[test]
    fn gemm_without_accumulate_never_reads_the_destination() {
        // One shape per gemm code path: general, small (horizontal kernels), and the gemv paths
        // a single row or column takes. A NaN destination would leak into any element it read.
        for &(m, k, n) in &[
            (40, 24, 36),
            (3, 5, 4),
            (1, 64, 300),
            (300, 64, 1),
            (2, 8, 2000),
        ] {
            let x = pseudo_random(m * k, 4);
            let w = pseudo_random(n * k, 5);
            let mut dst = vec![f32::NAN; m * n];
            gemm(
                MatMut::new(&mut dst, 0, n),
                MatRef::row_major(&x, m, k),
                MatRef::row_major(&w, n, k).t(),
                1.0,
                false,
                2,
            );
            let diff = max_diff(&dst, &naive_matmul_wt(&x, m, k, &w, n));
            assert!(diff < 1e-4, "{m}x{k}x{n}: {diff}");
        }
    }

    /// Attention one query at a time, the textbook way.
    fn naive_attention(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> Vec<f32> {
        let hd = s.head_dim;
        let (qw, kw) = (s.heads * hd, s.kv_heads * hd);
        let mut out = vec![0f32; s.q_rows * qw];
        for h in 0..s.heads {
            let g = h / (s.heads / s.kv_heads);
            for i in 0..s.q_rows {
                let visible = s
                    .causal_past
                    .map_or(s.kv_rows, |p| (p + i + 1).min(s.kv_rows));
                let mut w: Vec<f32> = (0..visible)
                    .map(|j| {
                        s.scale
                            * (0..hd)
                                .map(|d| q[i * qw + h * hd + d] * k[j * kw + g * hd + d])
                                .sum::<f32>()
                    })
                    .collect();
                let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                w.iter_mut().for_each(|x| *x = (*x - max).exp());
                let sum: f32 = w.iter().sum();
                for d in 0..hd {
                    out[i * qw + h * hd + d] = (0..visible)
                        .map(|j| w[j] / sum * v[j * kw + g * hd + d])
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_naive_full_causal_and_grouped() {
        let cases = [
            // Vision-like: one block boundary crossed, no mask.
            (130, 130, 4, 4, 16, None),
            // Causal prefill with grouped KV heads.
            (70, 70, 4, 2, 8, Some(0)),
            // Causal continuation after a cached prefix.
            (5, 12, 2, 1, 8, Some(7)),
        ];
        for (q_rows, kv_rows, heads, kv_heads, head_dim, causal_past) in cases {
            let shape = AttentionShape {
                q_rows,
                kv_rows,
                heads,
                kv_heads,
                head_dim,
                scale: (head_dim as f32).powf(-0.5),
                causal_past,
            };
            let q = pseudo_random(q_rows * heads * head_dim, 6);
            let k = pseudo_random(kv_rows * kv_heads * head_dim, 7);
            let v = pseudo_random(kv_rows * kv_heads * head_dim, 8);
            let naive = naive_attention(&q, &k, &v, shape);
            let kernels = [
                None,
                Some(Kernel::Portable),
                Some(Kernel::Avx2),
                Some(Kernel::Avx512),
            ];
            for kernel in kernels
                .into_iter()
                .filter(|k| k.is_none_or(Kernel::available))
            {
                let diff = max_diff(&attention_with(&q, &k, &v, shape, kernel), &naive);
                assert!(diff < 1e-5, "{shape:?} on {kernel:?}: {diff}");
            }
        }
    }

    /// The AVX-512 build of the element-wise kernels computes the same bits as the AVX2 one
    /// (the same operations in the same order), which the f32 parity references were made with.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_builds_give_the_same_bits() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            eprintln!("no AVX2 + FMA here: nothing to compare");
            return;
        }
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 200) as f32 / 10.0 - 10.0)
            .collect();
        for len in [1, 15, 16, 17, 1000] {
            let (mut a, mut b) = (x[..len].to_vec(), x[..len].to_vec());
            softmax_in_place(&mut a);
            // SAFETY: AVX2 and FMA are present (checked above).
            unsafe { softmax_avx2(&mut b) };
            assert_eq!(a, b, "softmax of {len}");
            let (mut a, mut b) = (vec![0f32; len], vec![0f32; len]);
            gelu_tanh_rows(&x[..len], &mut a);
            // SAFETY: as above.
            unsafe { gelu_tanh_avx2(&x[..len], &mut b) };
            assert_eq!(a, b, "gelu of {len}");
            silu_rows(&x[..len], &mut a);
            // SAFETY: as above.
            unsafe { silu_avx2(&x[..len], &mut b) };
            assert_eq!(a, b, "silu of {len}");
        }
    }

    #[test]
    fn softmax_handles_masked_rows() {
        let mut row = [1.0, 2.0, f32::NEG_INFINITY];
        softmax_in_place(&mut row);
        assert!((row[0] + row[1] - 1.0).abs() < 1e-6 && row[2] == 0.0);
        let mut dead = [f32::NEG_INFINITY; 3];
        softmax_in_place(&mut dead);
        assert_eq!(dead, [0.0; 3]);
    }

    #[test]
    #[should_panic(expected = "uninitialised")]
    fn gemm_refuses_to_accumulate_into_uninitialised_memory() {
        let x = vec![1f32; 4];
        let mut out: Vec<f32> = Vec::with_capacity(4);
        gemm(
            MatMut::uninit(&mut out.spare_capacity_mut()[..4], 0, 2),
            MatRef::row_major(&x, 2, 2),
            MatRef::row_major(&x, 2, 2),
            1.0,
            true,
            1,
        );
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn gemm_rejects_views_past_the_slice() {
        let x = vec![0f32; 10];
        let mut dst = vec![0f32; 4];
        gemm(
            MatMut::new(&mut dst, 0, 2),
            MatRef::row_major(&x, 2, 6),
            MatRef::row_major(&x, 6, 2),
            1.0,
            false,
            1,
        );
    }
}
