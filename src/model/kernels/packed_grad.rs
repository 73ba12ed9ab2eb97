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
    let mut out = Vec::with_capacity(m * k);
    for r in 0..m {
        for part in &parts {
            let cols = part.len() / m;
            out.extend_from_slice(&part[r * cols..][..cols]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::test_values as values;

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
