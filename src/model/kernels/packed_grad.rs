//! `dY·W` read straight from a packed weight: the gradient a frozen projection passes to its
//! input in training ([`super::lora`]), with the weight held once, packed for the forward.
//!
//! Columns `q * 64..` of `dY·W` are `dY` times panel `q` of `Wᵀ`: the product the forward kernel
//! computes, at 91-96% of the AVX-512 FMA peak at the 450M decoder shapes. One task per such
//! panel transposes its 64 x 64 blocks out of the packed weight ([`PackedWeight::transposed_panel`],
//! one pass over the weight, as the `gemm` crate packs its right-hand side) and runs the kernel.
//! Measured on 2 Zen 4 cores (`packed::tests::gflops`): 78-82% of the peak this way against
//! 65-72% unpacking the whole weight for the `gemm` crate and 70-78% for a kernel reducing dot
//! products along the panels' rows (both operands streamed as vectors from L2). Weights packed
//! for the AVX2 or portable kernels (only on request) are unpacked for the `gemm` crate: their
//! forward kernels run this product slower than it does (48-60% and 18%).
//!
//! A few rows of `dY` (the tied LM head's answer rows in training) take [`dy_w_few_rows`]
//! instead: transposing a 65536 x 1024 head costs far more than a product that only has to read
//! it once. At 2 rows it reads the head in 10-12 ms, against 13-16 ms for the `gemm` crate on the
//! dense head (`VLMPIPE_TRAIN_PROFILE=1 vlmpipe bench train`, BENCHMARKS.md "The LM head packed
//! in training"); its 16-lane loops are written in intrinsics, as plain code they stayed scalar
//! (29 ms).

use rayon::prelude::*;

use super::cpu::{self, MatMut, MatRef};
use super::packed::{Kernel, PANEL, PackedWeight};

/// `dy [m, n] @ w [n, k]` as a new row-major `[m, k]`.
///
/// # Panics
/// When `dy.len() != m * n` (a bug in the caller).
pub(crate) fn dy_w(w: &PackedWeight, dy: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.n(), w.k());
    assert_eq!(dy.len(), m * n, "dY·W: dY is not [m, n]");
    if m == 0 || k == 0 || n == 0 {
        return vec![0.0; m * k];
    }
    if m <= FEW_ROWS {
        return dy_w_few_rows(w, dy, m);
    }
    if w.kernel() != Kernel::Avx512 {
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
        return dx;
    }
    let parts: Vec<Vec<f32>> = (0..k.div_ceil(PANEL))
        .into_par_iter()
        .map(|q| w.transposed_panel(q).matmul(dy, m, None))
        .collect();
    join_columns(&parts, m, k)
}

/// The row-major `[m, k]` from column blocks, each `[m, cols]` row-major, left to right.
fn join_columns(parts: &[Vec<f32>], m: usize, k: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(m * k);
    for r in 0..m {
        for part in parts {
            let cols = part.len() / m;
            out.extend_from_slice(&part[r * cols..][..cols]);
        }
    }
    out
}

/// Up to this many rows of `dY` take [`dy_w_few_rows`]: the LM head's answer rows and the last
/// layer's tail in training. Transposing the weight panel by panel writes and rereads a copy of
/// it, which costs more than the product itself when `dY` is a few rows.
const FEW_ROWS: usize = 8;

/// Columns of `dY·W` one task owns: one task reads a 16 KiB run of every panel.
const FEW_ROWS_COLUMNS: usize = 64;

/// `dY·W` for a few rows of `dY`, reading the packed weight once, front to back in runs.
///
/// In panel `p`, column `kk` of `w` is a contiguous run of 64 floats (rows `p * 64..` of `w`):
/// its dot product with `dY`'s matching 64 entries adds to output `kk`. Each task owns 64 columns
/// and, for every panel, reads their 64 runs (16 KiB) into 16-lane accumulators per row and column
/// (4 KiB a row of `dY`, in L1), reduced once at the end. The tasks' columns are fixed, not the
/// threads', so every output is the same bits on any number of threads.
fn dy_w_few_rows(w: &PackedWeight, dy: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.n(), w.k());
    let panels = n.div_ceil(PANEL);
    let padded = panels * PANEL;
    // The packed weight holds zeros past `n`; `dY`'s rows get zeros there too.
    let mut dyp = vec![0f32; m * padded];
    for (dst, src) in dyp.chunks_exact_mut(padded).zip(dy.chunks_exact(n)) {
        dst[..n].copy_from_slice(src);
    }
    let parts: Vec<Vec<f32>> = (0..k.div_ceil(FEW_ROWS_COLUMNS))
        .into_par_iter()
        .map(|c| {
            let c0 = c * FEW_ROWS_COLUMNS;
            let cols = FEW_ROWS_COLUMNS.min(k - c0);
            #[cfg(target_arch = "x86_64")]
            if w.kernel() == Kernel::Avx512 {
                // SAFETY: a weight packed for `Avx512` was packed on a CPU with AVX-512F.
                return unsafe { few_rows_avx512(w.panels(), &dyp, m, k, panels, c0, cols) };
            }
            few_rows(w.panels(), &dyp, m, k, panels, c0, cols)
        })
        .collect();
    join_columns(&parts, m, k)
}

/// [`few_rows`] in AVX-512 intrinsics: the same multiply-adds in the same order per lane, and
/// the same reduction, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn few_rows_avx512(
    panels_data: &[f32],
    dyp: &[f32],
    m: usize,
    k: usize,
    panels: usize,
    c0: usize,
    cols: usize,
) -> Vec<f32> {
    use std::arch::x86_64::{__m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_setzero_ps};
    let padded = panels * PANEL;
    let mut acc: Vec<__m512> = vec![_mm512_setzero_ps(); m * cols];
    for p in 0..panels {
        let runs = &panels_data[(p * k + c0) * PANEL..][..cols * PANEL];
        for (r, acc) in acc.chunks_exact_mut(cols).enumerate() {
            let d = &dyp[r * padded + p * PANEL..][..PANEL];
            // SAFETY: `d` holds 64 floats, every `run` below 64 (bounds checked by the slices).
            let dv = unsafe {
                [
                    _mm512_loadu_ps(d.as_ptr()),
                    _mm512_loadu_ps(d.as_ptr().add(16)),
                    _mm512_loadu_ps(d.as_ptr().add(32)),
                    _mm512_loadu_ps(d.as_ptr().add(48)),
                ]
            };
            for (a, run) in acc.iter_mut().zip(runs.chunks_exact(PANEL)) {
                let mut s = *a;
                for (v, dv) in dv.iter().enumerate() {
                    // SAFETY: `run` holds 64 floats.
                    s = _mm512_fmadd_ps(
                        unsafe { _mm512_loadu_ps(run.as_ptr().add(16 * v)) },
                        *dv,
                        s,
                    );
                }
                *a = s;
            }
        }
    }
    acc.iter()
        .map(|a| {
            // SAFETY: `__m512` is 16 f32 lanes.
            reduce(unsafe { std::mem::transmute::<__m512, [f32; 16]>(*a) })
        })
        .collect()
}

/// The sum of 16 lanes in a fixed pairwise order, the same on every path.
#[inline(always)]
fn reduce(mut h: [f32; 16]) -> f32 {
    let mut width = 8;
    while width > 0 {
        for l in 0..width {
            h[l] += h[l + width];
        }
        width /= 2;
    }
    h[0]
}

/// Columns `c0..c0 + cols` of `dY·W` for every row of `dY`, as `[m, cols]` row-major.
#[inline(always)]
fn few_rows(
    panels_data: &[f32],
    dyp: &[f32],
    m: usize,
    k: usize,
    panels: usize,
    c0: usize,
    cols: usize,
) -> Vec<f32> {
    const LANES: usize = 16;
    let padded = panels * PANEL;
    let mut acc = vec![[0f32; LANES]; m * cols];
    for p in 0..panels {
        let runs = &panels_data[(p * k + c0) * PANEL..][..cols * PANEL];
        for (kk, run) in runs.chunks_exact(PANEL).enumerate() {
            for r in 0..m {
                let d = &dyp[r * padded + p * PANEL..][..PANEL];
                let a = &mut acc[r * cols + kk];
                for v in 0..PANEL / LANES {
                    for l in 0..LANES {
                        a[l] = run[v * LANES + l].mul_add(d[v * LANES + l], a[l]);
                    }
                }
            }
        }
    }
    acc.into_iter().map(reduce).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_values as values;

    /// The few-rows product is the same bits in AVX-512 intrinsics as in plain code (the same
    /// layout packed for either kernel), and on one thread as on the pool.
    #[test]
    fn few_rows_paths_agree_bitwise() {
        let (m, n, k) = (3, 1000, 200);
        let (dy, w) = (values(m * n, 3), values(n * k, 4));
        let portable = dy_w(&PackedWeight::pack(&w, n, k, Kernel::Portable), &dy, m);
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| dy_w(&PackedWeight::pack(&w, n, k, Kernel::Portable), &dy, m));
        assert_eq!(portable, one_thread);
        if Kernel::Avx512.available() {
            let avx512 = dy_w(&PackedWeight::pack(&w, n, k, Kernel::Avx512), &dy, m);
            assert_eq!(portable, avx512);
        } else {
            eprintln!("no AVX-512 here: only the plain path was compared");
        }
    }

    /// Against `dY·W` evaluated in f64, for every kernel this CPU runs: partial last panels of
    /// `w` and of `wᵀ`, several panels of each, and a single row.
    #[test]
    fn dy_w_equals_the_definition() {
        for (m, n, k) in [
            (7, 70, 33),
            (1, 130, 64),
            (9, 64, 61),
            (4, 5, 6),
            (5, 70, 150),
            // Parallel, several depth passes of the kernel and a partial last panel.
            (13, 1100, 150),
            (270, 600, 64),
            // The few-rows path: several 64-column tasks, a partial last task and panel.
            (2, 1000, 200),
            (8, 4163, 130),
        ] {
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
