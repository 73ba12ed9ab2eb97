//! `dY·W` read straight from a packed weight: the gradient a frozen projection passes to its
//! input in training ([`super::lora`]), with the weight held once, packed for the forward.
//!
//! In the panel layout of [`super::packed`], panel `p` holds `w[p * 64 + j][kk]` at `kk * 64 + j`:
//! for one output `dX[r][kk] = Σ_n dY[r][n] w[n][kk]`, the 64 weights a panel contributes are
//! contiguous, and so are the 64 `dY[r][p * 64..]` they meet. A register tile of 6 rows x 4
//! columns keeps 24 AVX-512 accumulators of partial dot products across every panel and sums
//! each one's lanes once at the end (10 loads per 24 FMAs, as the forward kernel).
//! Unpacking the weight for the `gemm` crate instead cost about 240 ms of a 450M LoRA step on 2
//! Zen 4 cores (`VLMPIPE_TRAIN_PROFILE=1 vlmpipe bench train`), a third of the product itself.
//! Weights packed for another kernel (the portable or AVX2 ones, only on request) take that
//! unpacking path.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::cpu::{self, MatMut, MatRef};
use super::packed::{Kernel, PANEL, PackedWeight};

/// Rows of `dY` per register tile.
const ROWS: usize = 6;
/// Columns of `dX` per register tile: 24 accumulators, the 4 columns' weight vectors and one
/// row vector take 29 of the 32 AVX-512 registers (the forward kernel's 6 x 4 block).
const COLS: usize = 4;
/// Column tiles one task computes per row tile: their weight strips (24 columns of every panel,
/// 442 KiB at 4608 rows) and the row tile's `dY` stay in L2 while every row tile passes.
const TILES_PER_TASK: usize = 4;
/// Lanes of one AVX-512 f32 vector.
const LANES: usize = 16;

/// `dy [m, n] @ w [n, k]` as a new row-major `[m, k]`.
///
/// # Panics
/// When `dy.len() != m * n` (a bug in the caller).
pub(crate) fn dy_w(w: &PackedWeight, dy: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.n(), w.k());
    assert_eq!(dy.len(), m * n, "dY·W: dY is not [m, n]");
    if m == 0 || k == 0 {
        return Vec::new();
    }
    if n == 0 {
        return vec![0.0; m * k];
    }
    if w.kernel() == Kernel::Avx512 && Kernel::Avx512.available() {
        return avx512(w, dy, m);
    }
    let dense = w.to_dense();
    let mut dx = vec![0f32; m * k];
    cpu::gemm(
        MatMut::new(&mut dx, 0, k),
        MatRef::row_major(dy, m, n),
        MatRef::row_major(&dense, n, k),
        1.0,
        false,
        rayon::current_num_threads(),
    );
    dx
}

/// Where tasks store their disjoint columns of the output.
struct OutPtr(*mut MaybeUninit<f32>);
// SAFETY: tasks write disjoint column ranges through the pointer (see `avx512`).
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so closures capture the `Sync` wrapper, not its raw field.
    fn at(&self, i: usize) -> *mut MaybeUninit<f32> {
        self.0.wrapping_add(i)
    }
}

fn avx512(w: &PackedWeight, dy: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.n(), w.k());
    let panels = n.div_ceil(PANEL);
    let ld = panels * PANEL;
    let chunks = ld / LANES;
    // `dY` padded with zeros to whole panels and whole row tiles: the packed weight is zero past
    // `n`, so the padding adds nothing, and the kernel needs no masked loads (a copy of 1-5 MB
    // at the 450M shapes, against products of 5-20 ms).
    let m_pad = m.div_ceil(ROWS) * ROWS;
    let mut padded = vec![0f32; m_pad * ld];
    padded
        .par_chunks_mut(ld)
        .zip(dy.par_chunks(n))
        .for_each(|(dst, src)| dst[..n].copy_from_slice(src));
    let mut out: Vec<f32> = Vec::with_capacity(m * k);
    let dst = OutPtr(out.spare_capacity_mut().as_mut_ptr());
    let span = TILES_PER_TASK * COLS;
    let data = w.panel_data();
    (0..k.div_ceil(span)).into_par_iter().for_each(|task| {
        let (start, end) = (task * span, ((task + 1) * span).min(k));
        let width = end - start;
        // The task's columns of every panel, copied together: in place they lie `k * PANEL`
        // floats apart, a multiple of 128 KiB whenever `k` is a multiple of 512, so all of them
        // fall into the same L2 sets and evict each other (measured: half the speed).
        // Regrouped by 16-row chunks of `n` (one vector of each column per chunk), so the
        // kernel walks one contiguous run per chunk in a single loop.
        let mut strip = Vec::with_capacity(panels * width * PANEL);
        for p in 0..panels {
            let panel = &data[(p * k + start) * PANEL..][..width * PANEL];
            for j in (0..PANEL).step_by(LANES) {
                for c in 0..width {
                    strip.extend_from_slice(&panel[c * PANEL + j..][..LANES]);
                }
            }
        }
        for r0 in (0..m).step_by(ROWS) {
            let rows = ROWS.min(m - r0);
            let x = &padded[r0 * ld..][..ROWS * ld];
            let mut c0 = start;
            while c0 < end {
                let cols = COLS.min(end - c0);
                let mut sums = [[0f32; COLS]; ROWS];
                if cols == COLS {
                    // SAFETY: AVX-512F is present (checked by the caller); `x` holds `ROWS` padded
                    // rows of `ld` floats, and `strip` every panel's `width` columns, of which
                    // `c0 - start..` + COLS are read.
                    unsafe { tile::<COLS>(x, ld, &strip, width, chunks, c0 - start, &mut sums) };
                } else {
                    for c in 0..cols {
                        let mut one = [[0f32; COLS]; ROWS];
                        // SAFETY: as above, for the one column `c0 + c`.
                        unsafe {
                            tile::<1>(x, ld, &strip, width, chunks, c0 - start + c, &mut one)
                        };
                        for (s, o) in sums.iter_mut().zip(&one) {
                            s[c] = o[0];
                        }
                    }
                }
                for (r, row) in sums.iter().enumerate().take(rows) {
                    for (c, &v) in row.iter().enumerate().take(cols) {
                        // SAFETY: `(r0 + r, c0 + c)` is inside the `[m, k]` output, and only
                        // this task writes columns `start..end`.
                        unsafe { dst.at((r0 + r) * k + c0 + c).write(MaybeUninit::new(v)) };
                    }
                }
                c0 += cols;
            }
        }
    });
    // SAFETY: the tasks' column ranges cover `0..k`, and each wrote every row of its range.
    unsafe { out.set_len(m * k) };
    out
}

/// The `ROWS x C` outputs at rows `x` (`ROWS` padded rows of `ld` floats) and columns `c0..c0 + C`
/// of a strip of `width` columns regrouped by chunks of 16 rows of the weight:
/// `sums[r][c] = Σ_s Σ_l x[r][s * 16 + l] * strip[(s * width + c0 + c) * 16 + l]`.
///
/// # Safety
/// The CPU must have AVX-512F; `x` must hold `ROWS * ld` floats with `ld >= chunks * 16`,
/// `strip` `chunks * width * 16`, and `c0 + C <= width`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const C: usize>(
    x: &[f32],
    ld: usize,
    strip: &[f32],
    width: usize,
    chunks: usize,
    c0: usize,
    sums: &mut [[f32; COLS]; ROWS],
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= ROWS * ld && ld >= chunks * LANES && c0 + C <= width);
    debug_assert!(strip.len() >= chunks * width * LANES);
    let (xp, wp) = (x.as_ptr(), strip.as_ptr());
    // SAFETY: (every access below) inside `x` and `strip` by the function's contract.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); C]; ROWS];
        for s in 0..chunks {
            let w = wp.add((s * width + c0) * LANES);
            let ws: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(w.add(c * LANES)));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let d = _mm512_loadu_ps(xp.add(r * ld + s * LANES));
                for (a, &wv) in acc_r.iter_mut().zip(&ws) {
                    *a = _mm512_fmadd_ps(d, wv, *a);
                }
            }
        }
        // Lanes summed from memory, not by `_mm512_reduce_add_ps`: its 128-bit steps cannot
        // use registers 16-31 without AVX-512VL, so the allocator kept the accumulators in the
        // first 16 and spilled the rest inside the loop (measured at half the speed).
        let mut lanes = [0f32; LANES];
        for (sum_r, acc_r) in sums.iter_mut().zip(&acc) {
            for (s, &a) in sum_r.iter_mut().zip(acc_r) {
                _mm512_storeu_ps(lanes.as_mut_ptr(), a);
                *s = lanes.iter().sum();
            }
        }
    }
}

/// Never called: [`dy_w`] takes this path only where AVX-512F exists.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile<const C: usize>(
    _x: &[f32],
    _ld: usize,
    _strip: &[f32],
    _width: usize,
    _chunks: usize,
    _c0: usize,
    _sums: &mut [[f32; COLS]; ROWS],
) {
    unreachable!("the AVX-512 kernel runs only on x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 500.0
                    - 1.0
            })
            .collect()
    }

    /// Against `dY·W` evaluated in f64, for every kernel this CPU runs, at shapes with partial
    /// row tiles, a partial last panel and partial column tiles and tasks, and a single row.
    #[test]
    fn dy_w_equals_the_definition() {
        for (m, n, k) in [(7, 70, 33), (1, 130, 64), (9, 64, 61), (4, 5, 6)] {
            let (dy, w) = (values(m * n, 1), values(n * k, 2));
            let expected: Vec<f64> = (0..m * k)
                .map(|i| {
                    let (r, c) = (i / k, i % k);
                    (0..n)
                        .map(|j| f64::from(dy[r * n + j]) * f64::from(w[j * k + c]))
                        .sum()
                })
                .collect();
            for kernel in [Kernel::Portable, Kernel::Avx2, Kernel::Avx512] {
                if !kernel.available() {
                    continue;
                }
                let packed = PackedWeight::pack(&w, n, k, kernel);
                let got = dy_w(&packed, &dy, m);
                assert_eq!(got.len(), m * k);
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert!(
                        (f64::from(*g) - e).abs() < 1e-4 * (1.0 + e.abs()),
                        "{kernel:?} {m}x{n}x{k} [{i}]: {g} vs {e}"
                    );
                }
            }
        }
    }
}
