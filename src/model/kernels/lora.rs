//! The LoRA linear layer of training, forward and backward, on slices.
//!
//! `y = x Wᵀ (+ b) + s · (x ∘ mask) Aᵀ Bᵀ` with a frozen `W [n, k]`, trained `A [r, k]` and
//! `B [n, r]`, and an optional dropout mask on the low-rank branch's input. Through candle's
//! autograd the same layer is six graph nodes (frozen product, two products, scale, add, mask),
//! each allocating its output and, in the backward pass, a zero-filled gradient it adds into;
//! here it is the frozen product and one pass of [`super::low_rank`] over the rows each way
//! (the `gemm` crate for ranks that pass does not take), and only `dY·W` (the gradient the
//! frozen weight passes to the input) is a weight-sized product.
//!
//! The frozen weight is read dense or packed ([`Frozen`]). Packed (where inference packs too,
//! [`super::packed::Kernel::for_this_cpu`]), `x·Wᵀ` runs the packed kernel, at the 450M decoder
//! shapes 88-95% of the AVX-512 FMA peak against the `gemm` crate's 49-61% on the same 2 Zen 4
//! cores (`packed::tests::gflops`); `dY·W` reads the same panels ([`super::packed_grad`]), so the
//! weight is held once, packed.

use super::backward::profile;
use super::cpu::{self, MatMut, MatRef};
use super::low_rank;
use super::packed::PackedWeight;
use super::packed_grad;

/// The frozen `W [n, k]` as a layer holds it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Frozen<'a> {
    /// Row-major `[n, k]`.
    Dense(&'a [f32]),
    /// Packed for the CPU product ([`PackedWeight`]).
    Packed(&'a PackedWeight),
}

impl Frozen<'_> {
    fn dims_ok(self, n: usize, k: usize) -> bool {
        match self {
            Frozen::Dense(w) => w.len() == n * k,
            Frozen::Packed(p) => p.n() == n && p.k() == k,
        }
    }
}

/// Sizes of one LoRA layer: `x [m, k]`, `W [n, k]`, `A [r, k]`, `B [n, r]`, scale `s`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LoraShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    pub scale: f32,
}

/// The low-rank branch's input `x ∘ mask` (a copy only when there is a mask).
fn branch_input<'a>(x: &'a [f32], mask: Option<&[f32]>, owned: &'a mut Vec<f32>) -> &'a [f32] {
    match mask {
        Some(mask) => {
            assert_eq!(mask.len(), x.len(), "lora: mask is not [m, k]");
            *owned = x.iter().zip(mask).map(|(x, m)| x * m).collect();
            owned
        }
        None => x,
    }
}

/// `x [m, k] -> y [m, n]` as in the module docs.
///
/// # Panics
/// On a slice whose length does not match `shape` (a bug in the caller).
pub(crate) fn lora_forward(
    x: &[f32],
    w: Frozen<'_>,
    bias: Option<&[f32]>,
    a: &[f32],
    b: &[f32],
    mask: Option<&[f32]>,
    shape: LoraShape,
) -> Vec<f32> {
    let LoraShape { m, k, n, r, scale } = shape;
    assert!(w.dims_ok(n, k), "lora: W is not [n, k]");
    assert_eq!(a.len(), r * k, "lora: A is not [r, k]");
    assert_eq!(b.len(), n * r, "lora: B is not [n, r]");
    let mut owned = Vec::new();
    let xl = branch_input(x, mask, &mut owned);
    let mut y = profile::time("lora fwd: frozen x·Wᵀ", || match w {
        Frozen::Dense(w) => cpu::linear(x, m, k, w, n, bias),
        Frozen::Packed(p) => p.matmul(x, m, bias),
    });
    let _branch = profile::Span::new("lora fwd: low-rank branch");
    if low_rank::supported_rank(r) {
        low_rank::forward(&mut y, xl, a, b, (m, k, n, r), scale);
        return y;
    }
    // [m, k] @ [r, k]^T -> [m, r]
    let u = cpu::linear(xl, m, k, a, r, None);
    // y += s * u @ B^T
    cpu::gemm(
        MatMut::new(&mut y, 0, n),
        MatRef::row_major(&u, m, r),
        MatRef::row_major(b, n, r).t(),
        scale,
        true,
        rayon::current_num_threads(),
    );
    y
}

/// Gradients of [`lora_forward`] given `dy [m, n]`.
#[derive(Debug)]
pub(crate) struct LoraGrads {
    /// `[m, k]`, when asked for.
    pub dx: Option<Vec<f32>>,
    /// `[r, k]`.
    pub da: Vec<f32>,
    /// `[n, r]`.
    pub db: Vec<f32>,
}

/// The backward pass of [`lora_forward`]: `dX = dY W + s (dY B) A ∘ mask`,
/// `dA = s (dY B)ᵀ (x ∘ mask)`, `dB = s dYᵀ ((x ∘ mask) Aᵀ)`.
///
/// # Panics
/// On a slice whose length does not match `shape` (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lora_backward(
    x: &[f32],
    w: Frozen<'_>,
    a: &[f32],
    b: &[f32],
    mask: Option<&[f32]>,
    dy: &[f32],
    shape: LoraShape,
    want_dx: bool,
) -> LoraGrads {
    let LoraShape { m, k, n, r, scale } = shape;
    assert_eq!(x.len(), m * k, "lora: x is not [m, k]");
    assert!(w.dims_ok(n, k), "lora: W is not [n, k]");
    assert_eq!(a.len(), r * k, "lora: A is not [r, k]");
    assert_eq!(b.len(), n * r, "lora: B is not [n, r]");
    assert_eq!(dy.len(), m * n, "lora: dY is not [m, n]");
    let threads = rayon::current_num_threads();
    let mut owned = Vec::new();
    let xl = branch_input(x, mask, &mut owned);
    let dy_m = MatRef::row_major(dy, m, n);
    // dX = dY @ W: [m, n] @ [n, k]
    let frozen_dx = |dx: &mut Vec<f32>| {
        profile::time("lora bwd: frozen dY·W", || match w {
            Frozen::Dense(w) => {
                *dx = vec![0f32; m * k];
                cpu::gemm(
                    MatMut::new(dx, 0, k),
                    dy_m,
                    MatRef::row_major(w, n, k),
                    1.0,
                    false,
                    threads,
                );
            }
            Frozen::Packed(p) => *dx = packed_grad::dy_w(p, dy, m),
        })
    };
    if low_rank::supported_rank(r) {
        let mut dx = want_dx.then(|| {
            let mut dx = Vec::new();
            frozen_dx(&mut dx);
            dx
        });
        let _branch = profile::Span::new("lora bwd: low-rank branch");
        let (da, db) =
            low_rank::backward(xl, dy, a, b, mask, dx.as_deref_mut(), (m, k, n, r), scale);
        return LoraGrads { dx, da, db };
    }
    let low_rank = profile::Span::new("lora bwd: low-rank branch");
    // v = dY @ B: [m, n] @ [n, r] -> [m, r]
    let mut v = vec![0f32; m * r];
    cpu::gemm(
        MatMut::new(&mut v, 0, r),
        dy_m,
        MatRef::row_major(b, n, r),
        1.0,
        false,
        threads,
    );
    // u = x_l @ A^T: [m, r]
    let u = cpu::linear(xl, m, k, a, r, None);
    // dA = s v^T @ x_l: [r, m] @ [m, k]
    let mut da = vec![0f32; r * k];
    cpu::gemm(
        MatMut::new(&mut da, 0, k),
        MatRef::row_major(&v, m, r).t(),
        MatRef::row_major(xl, m, k),
        scale,
        false,
        threads,
    );
    // dB = s dY^T @ u: [n, m] @ [m, r]
    let mut db = vec![0f32; n * r];
    cpu::gemm(
        MatMut::new(&mut db, 0, r),
        dy_m.t(),
        MatRef::row_major(&u, m, r),
        scale,
        false,
        threads,
    );
    drop(low_rank);
    let dx = want_dx.then(|| {
        let mut dx = Vec::new();
        frozen_dx(&mut dx);
        let _branch = profile::Span::new("lora bwd: low-rank branch");
        let v_m = MatRef::row_major(&v, m, r);
        let a_m = MatRef::row_major(a, r, k);
        match mask {
            // dX += s v @ A
            None => cpu::gemm(MatMut::new(&mut dx, 0, k), v_m, a_m, scale, true, threads),
            Some(mask) => {
                let mut t = vec![0f32; m * k];
                cpu::gemm(MatMut::new(&mut t, 0, k), v_m, a_m, scale, false, threads);
                for ((d, t), mk) in dx.iter_mut().zip(&t).zip(mask) {
                    *d += t * mk;
                }
            }
        }
        dx
    });
    LoraGrads { dx, da, db }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[rows, inner] @ [inner, cols]` by definition, in f64.
    fn naive(lhs: &[f32], rhs: &[f32], rows: usize, inner: usize, cols: usize) -> Vec<f64> {
        let mut out = vec![0f64; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                out[i * cols + j] = (0..inner)
                    .map(|p| f64::from(lhs[i * inner + p]) * f64::from(rhs[p * cols + j]))
                    .sum();
            }
        }
        out
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for i in 0..rows {
            for j in 0..cols {
                out[j * rows + i] = x[i * cols + j];
            }
        }
        out
    }

    use super::super::test_values as data;

    fn assert_close(ours: &[f32], expected: &[f64], what: &str) {
        assert_eq!(ours.len(), expected.len(), "{what}");
        for (i, (a, b)) in ours.iter().zip(expected).enumerate() {
            assert!(
                (f64::from(*a) - b).abs() < 1e-3 * (1.0 + b.abs()),
                "{what}[{i}]: {a} vs {b}"
            );
        }
    }

    /// Every form of the frozen weight (dense, and packed for each kernel this CPU runs), with
    /// more output rows than a panel holds and a partial last panel.
    #[test]
    fn forward_and_backward_match_the_definitions() {
        // Rank 4 runs the fused low-rank pass, rank 3 the `gemm` crate.
        for r in [4, 3] {
            check_rank(r);
        }
    }

    fn check_rank(r: usize) {
        use super::super::packed::Kernel;
        let s = LoraShape {
            m: 7,
            k: 33,
            n: 70,
            r,
            scale: 1.5,
        };
        let (x, w, a, b, dy) = (
            data(s.m * s.k, 1),
            data(s.n * s.k, 2),
            data(s.r * s.k, 3),
            data(s.n * s.r, 4),
            data(s.m * s.n, 5),
        );
        let bias = data(s.n, 6);
        let mask: Vec<f32> = (0..s.m * s.k)
            .map(|i| if i % 3 == 0 { 0.0 } else { 1.25 })
            .collect();
        let packed: Vec<PackedWeight> = [Kernel::Portable, Kernel::Avx2, Kernel::Avx512]
            .into_iter()
            .filter(|k| k.available())
            .map(|kernel| PackedWeight::pack(&w, s.n, s.k, kernel))
            .collect();
        let forms = std::iter::once(Frozen::Dense(&w)).chain(packed.iter().map(Frozen::Packed));
        for (form, mask) in forms.flat_map(|f| [(f, None), (f, Some(&mask[..]))]) {
            let xl: Vec<f32> = match mask {
                Some(mk) => x.iter().zip(mk).map(|(x, m)| x * m).collect(),
                None => x.clone(),
            };
            let y = lora_forward(&x, form, Some(&bias), &a, &b, mask, s);
            let base = naive(&x, &transpose(&w, s.n, s.k), s.m, s.k, s.n);
            let u = naive(&xl, &transpose(&a, s.r, s.k), s.m, s.k, s.r);
            let u32s: Vec<f32> = u.iter().map(|&v| v as f32).collect();
            let delta = naive(&u32s, &transpose(&b, s.n, s.r), s.m, s.r, s.n);
            let expected: Vec<f64> = (0..s.m * s.n)
                .map(|i| base[i] + f64::from(bias[i % s.n]) + f64::from(s.scale) * delta[i])
                .collect();
            assert_close(&y, &expected, &format!("y, {form:?}"));

            let g = lora_backward(&x, form, &a, &b, mask, &dy, s, true);
            let v: Vec<f32> = naive(&dy, &b, s.m, s.n, s.r)
                .iter()
                .map(|&v| v as f32)
                .collect();
            let scaled =
                |t: Vec<f64>| -> Vec<f64> { t.iter().map(|v| v * f64::from(s.scale)).collect() };
            let da = scaled(naive(&transpose(&v, s.m, s.r), &xl, s.r, s.m, s.k));
            assert_close(&g.da, &da, "dA");
            let db = scaled(naive(&transpose(&dy, s.m, s.n), &u32s, s.n, s.m, s.r));
            assert_close(&g.db, &db, "dB");
            let dxw = naive(&dy, &w, s.m, s.n, s.k);
            let dxl = naive(&v, &a, s.m, s.r, s.k);
            let dx: Vec<f64> = (0..s.m * s.k)
                .map(|i| {
                    let keep = mask.map_or(1.0, |mk| f64::from(mk[i]));
                    dxw[i] + f64::from(s.scale) * dxl[i] * keep
                })
                .collect();
            assert_close(g.dx.as_deref().unwrap_or(&[]), &dx, "dX");
            assert!(
                lora_backward(&x, form, &a, &b, mask, &dy, s, false)
                    .dx
                    .is_none()
            );
        }
    }
}
