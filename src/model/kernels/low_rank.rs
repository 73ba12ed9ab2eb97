//! The LoRA branch's products in one pass over the rows: `x·Aᵀ` and `(x·Aᵀ)·Bᵀ` forward, and
//! backward `v = dY·B`, `u = x·Aᵀ`, `dA = s vᵀ·x`, `dB = s dYᵀ·u` and `dX += s (v·A) ∘ mask`.
//!
//! Why not the `gemm` crate, which ran them before: one side of every product is the rank `r`
//! (8 by default), which its register tiles cannot fill, and each of the five backward products
//! packed and streamed the layer's activations on its own. At the 450M shapes they took 98-128 ms
//! of a training step (`VLMPIPE_TRAIN_PROFILE=1`: 30 forward, 83 for `dA`/`dB` and 15 for the
//! branch's `dX`). Here a block of four rows of `dY` and `x` is read once, in L1: the rank's dot
//! products against `Bᵀ` and `A` (`r` lane-parallel accumulators, so the FMA chains are
//! independent), then the rank-`r` updates of `dBᵀ` and `dA` (each row of the accumulators
//! loaded and stored once per four rows) and of the block's `dX` rows. Each thread sums its own
//! `dA` and `dBᵀ` over a fixed, contiguous share of the rows; the shares are added in thread
//! order, so a result depends on the pool's size alone (the resumed-training tests compare bits).
//!
//! Ranks 4, 8, 16 and 32 take this path, compiled for AVX-512 where the CPU has it (AVX2 + FMA
//! otherwise); [`supported_rank`] says which, and other ranks keep the `gemm` crate.

use rayon::prelude::*;

/// Floats per accumulator vector: one AVX-512 register (two AVX2 ones).
const LANES: usize = 16;
/// Rows of `dY`/`x` one block of the backward pass reads together.
const BLOCK_ROWS: usize = 4;

/// Whether [`forward`] and [`backward`] take rank `r`.
pub(crate) fn supported_rank(r: usize) -> bool {
    matches!(r, 4 | 8 | 16 | 32)
}

/// `y [m, n] += s · (xl [m, k] · aᵀ) · bᵀ` for `a [r, k]` and `b [n, r]`.
///
/// # Panics
/// On an unsupported rank or operands of the wrong length (bugs in the caller).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    y: &mut [f32],
    xl: &[f32],
    a: &[f32],
    b: &[f32],
    (m, k, n, r): (usize, usize, usize, usize),
    scale: f32,
) {
    assert!(supported_rank(r), "low-rank forward: rank {r}");
    assert!(
        y.len() == m * n && xl.len() == m * k && a.len() == r * k && b.len() == n * r,
        "low-rank forward: operands do not match [{m}, {k}] x [{r}, {k}] x [{n}, {r}]"
    );
    if m == 0 || n == 0 {
        return;
    }
    let bt = transpose(b, n, r);
    let row = |(y, x): (&mut [f32], &[f32])| dispatch_forward(y, x, a, &bt, k, n, scale, r);
    if m * (k + n) * r < 1 << 16 {
        y.chunks_mut(n).zip(xl.chunks(k)).for_each(row);
    } else {
        y.par_chunks_mut(n).zip(xl.par_chunks(k)).for_each(row);
    }
}

/// The low-rank gradients of one LoRA layer (see the module docs): returns `(dA [r, k],
/// dB [n, r])` and, when `dx` is given, adds the branch's share of the input gradient into it.
///
/// # Panics
/// On an unsupported rank or operands of the wrong length (bugs in the caller).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    xl: &[f32],
    dy: &[f32],
    a: &[f32],
    b: &[f32],
    mask: Option<&[f32]>,
    dx: Option<&mut [f32]>,
    (m, k, n, r): (usize, usize, usize, usize),
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    assert!(supported_rank(r), "low-rank backward: rank {r}");
    assert!(
        xl.len() == m * k && dy.len() == m * n && a.len() == r * k && b.len() == n * r,
        "low-rank backward: operands do not match [{m}, {k}] x [{m}, {n}] x [{r}, {k}] x [{n}, {r}]"
    );
    assert!(
        mask.is_none_or(|mk| mk.len() == m * k) && dx.as_ref().is_none_or(|d| d.len() == m * k)
    );
    if m == 0 || k == 0 {
        // No rows, or `x·Aᵀ = 0` and nothing of `dX`: both gradients are zero.
        return (vec![0f32; r * k], vec![0f32; n * r]);
    }
    let bt = transpose(b, n, r);
    let threads = rayon::current_num_threads().max(1);
    let share = m.div_ceil(threads).max(1);
    // Each task: a contiguous share of the rows, its own dA and dBᵀ partial sums.
    let task = |t: usize, dx: Option<&mut [f32]>| {
        let rows = t * share..((t + 1) * share).min(m);
        let mut da = vec![0f32; r * k];
        let mut dbt = vec![0f32; r * n];
        let shared = Shared {
            xl: &xl[rows.start * k..rows.end * k],
            dy: &dy[rows.start * n..rows.end * n],
            mask: mask.map(|mk| &mk[rows.start * k..rows.end * k]),
            a,
            bt: &bt,
            k,
            n,
            scale,
        };
        dispatch_backward(&shared, &mut da, &mut dbt, dx, r);
        (da, dbt)
    };
    let tasks = m.div_ceil(share);
    let parts: Vec<(Vec<f32>, Vec<f32>)> = match dx {
        Some(dx) => dx
            .par_chunks_mut(share * k)
            .enumerate()
            .map(|(t, dx)| task(t, Some(dx)))
            .collect(),
        None => (0..tasks).into_par_iter().map(|t| task(t, None)).collect(),
    };
    let mut parts = parts.into_iter();
    let (mut da, mut dbt) = parts
        .next()
        .unwrap_or_else(|| (vec![0f32; r * k], vec![0f32; r * n]));
    for (pa, pb) in parts {
        da.iter_mut().zip(&pa).for_each(|(d, p)| *d += p);
        dbt.iter_mut().zip(&pb).for_each(|(d, p)| *d += p);
    }
    da.iter_mut().for_each(|d| *d *= scale);
    let mut db = transpose(&dbt, r, n);
    db.iter_mut().for_each(|d| *d *= scale);
    (da, db)
}

/// `[rows, cols]` row-major, transposed.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (i, row) in x.chunks_exact(cols).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            out[j * rows + i] = v;
        }
    }
    out
}

/// What every row block of one task reads.
struct Shared<'a> {
    /// The task's rows of the branch input, `[rows, k]`.
    xl: &'a [f32],
    /// The task's rows of `dY`, `[rows, n]`.
    dy: &'a [f32],
    mask: Option<&'a [f32]>,
    /// `[r, k]`.
    a: &'a [f32],
    /// `Bᵀ`, `[r, n]`.
    bt: &'a [f32],
    k: usize,
    n: usize,
    scale: f32,
}

/// Calls `$f::<R>` for the runtime rank (one of [`supported_rank`]'s).
macro_rules! by_rank {
    ($r:expr, $f:ident, ($($arg:expr),*)) => {
        match $r {
            4 => $f::<4>($($arg),*),
            8 => $f::<8>($($arg),*),
            16 => $f::<16>($($arg),*),
            _ => $f::<32>($($arg),*),
        }
    };
}

/// A function that runs `$f::<R>` for rank `r` inside a copy compiled for AVX-512 (or AVX2 +
/// FMA) where the CPU has it, so the generic bodies are inlined and vectorised there.
macro_rules! simd_by_rank {
    ($name:ident, $f:ident, ($($arg:ident: $ty:ty),*)) => {
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty,)* r: usize) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty,)* r: usize) {
                    by_rank!(r, $f, ($($arg),*))
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty,)* r: usize) {
                    by_rank!(r, $f, ($($arg),*))
                }
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has every feature `avx512` is compiled with.
                    return unsafe { avx512($($arg,)* r) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has every feature `avx2` is compiled with.
                    return unsafe { avx2($($arg,)* r) };
                }
            }
            by_rank!(r, $f, ($($arg),*))
        }
    };
}

simd_by_rank!(
    dispatch_forward,
    forward_row,
    (y: &mut [f32], x: &[f32], a: &[f32], bt: &[f32], k: usize, n: usize, scale: f32)
);

simd_by_rank!(
    dispatch_backward,
    backward_rows,
    (s: &Shared<'_>, da: &mut [f32], dbt: &mut [f32], dx: Option<&mut [f32]>)
);

/// `out[j] = Σ_c x[c] · w[j * len + c]` for `j < R`: `R` independent lane-parallel
/// accumulators over one read of `x`, each reduced in a fixed order.
#[inline(always)]
fn dots<const R: usize>(x: &[f32], w: &[f32], len: usize) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        assert!(x.len() >= len && w.len() >= R * len);
        // SAFETY: the CPU has AVX-512F; the lengths are checked above.
        return unsafe { dots_avx512::<R>(x, w, len) };
    }
    let x = &x[..len];
    let rows: [&[f32]; R] = std::array::from_fn(|j| &w[j * len..][..len]);
    let mut acc = [[0f32; LANES]; R];
    let body = len - len % LANES;
    for c in (0..body).step_by(LANES) {
        let xs: &[f32; LANES] = x[c..c + LANES].try_into().expect("a full chunk");
        for (acc, row) in acc.iter_mut().zip(&rows) {
            let ws: &[f32; LANES] = row[c..c + LANES].try_into().expect("a full chunk");
            for l in 0..LANES {
                acc[l] = xs[l].mul_add(ws[l], acc[l]);
            }
        }
    }
    std::array::from_fn(|j| {
        let mut sum = acc[j].iter().sum::<f32>();
        for c in body..len {
            sum = x[c].mul_add(rows[j][c], sum);
        }
        sum
    })
}

/// [`dots`] with the accumulators held in AVX-512 registers (the compiler kept the portable
/// body's on the stack, one lane at a time): the same operations per lane and the same final
/// sums, so the same bits.
///
/// # Safety
/// The CPU must have AVX-512F; `x` must hold `len` floats and `w` `R * len`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512<const R: usize>(x: &[f32], w: &[f32], len: usize) -> [f32; R] {
    use std::arch::x86_64::*;
    let body = len - len % LANES;
    let mut acc = [_mm512_setzero_ps(); R];
    for c in (0..body).step_by(LANES) {
        // SAFETY: `c + LANES <= len`, and row `j` of `w` holds `len` floats from `j * len`.
        unsafe {
            let xs = _mm512_loadu_ps(x.as_ptr().add(c));
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(xs, _mm512_loadu_ps(w.as_ptr().add(j * len + c)), *acc);
            }
        }
    }
    std::array::from_fn(|j| {
        let mut lanes = [0f32; LANES];
        // SAFETY: `lanes` holds 16 floats.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[j]) };
        let mut sum = lanes.iter().sum::<f32>();
        for c in body..len {
            sum = x[c].mul_add(w[j * len + c], sum);
        }
        sum
    })
}

/// `out[c] += Σ_j coef[j] · w[j * len + c]`, times `mask[c]` when there is one: 16 outputs at a
/// time, the rank's terms summed in registers.
#[inline(always)]
fn combine<const R: usize>(
    out: &mut [f32],
    coef: &[f32; R],
    w: &[f32],
    len: usize,
    mask: Option<&[f32]>,
) {
    let out = &mut out[..len];
    let rows: [&[f32]; R] = std::array::from_fn(|j| &w[j * len..][..len]);
    let term = |c: usize| {
        let mut t = [0f32; LANES];
        for (row, &cj) in rows.iter().zip(coef) {
            let ws: &[f32; LANES] = row[c..c + LANES].try_into().expect("a full chunk");
            for l in 0..LANES {
                t[l] = ws[l].mul_add(cj, t[l]);
            }
        }
        t
    };
    let body = len - len % LANES;
    for c in (0..body).step_by(LANES) {
        let t = term(c);
        let o: &mut [f32; LANES] = (&mut out[c..c + LANES]).try_into().expect("a full chunk");
        match mask {
            Some(mk) => {
                let m: &[f32; LANES] = mk[c..c + LANES].try_into().expect("a full chunk");
                for l in 0..LANES {
                    o[l] += t[l] * m[l];
                }
            }
            None => {
                for l in 0..LANES {
                    o[l] += t[l];
                }
            }
        }
    }
    for c in body..len {
        let mut t = 0f32;
        for (row, &cj) in rows.iter().zip(coef) {
            t = row[c].mul_add(cj, t);
        }
        out[c] += mask.map_or(t, |mk| t * mk[c]);
    }
}

/// `acc[j * len + c] += Σ_i coef[i][j] · rows[i][c]` for the block's rows `i` (one load and
/// store of the accumulators per block).
#[inline(always)]
fn rank_update<const R: usize>(acc: &mut [f32], coef: &[[f32; R]], rows: &[&[f32]], len: usize) {
    let body = len - len % LANES;
    for (j, acc) in acc.chunks_exact_mut(len).enumerate().take(R) {
        if let [r0, r1, r2, r3] = rows {
            let (r0, r1, r2, r3) = (&r0[..len], &r1[..len], &r2[..len], &r3[..len]);
            let (c0, c1, c2, c3) = (coef[0][j], coef[1][j], coef[2][j], coef[3][j]);
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F; every row and `acc` hold `len` floats (sliced).
                unsafe { update4_avx512(acc, [r0, r1, r2, r3], [c0, c1, c2, c3], body) };
            } else {
                update4(acc, [r0, r1, r2, r3], [c0, c1, c2, c3], body);
            }
            #[cfg(not(target_arch = "x86_64"))]
            update4(acc, [r0, r1, r2, r3], [c0, c1, c2, c3], body);
            for c in body..len {
                acc[c] = r3[c].mul_add(
                    c3,
                    r2[c].mul_add(c2, r1[c].mul_add(c1, r0[c].mul_add(c0, acc[c]))),
                );
            }
        } else {
            for (row, coef) in rows.iter().zip(coef) {
                let cj = coef[j];
                for (a, x) in acc.iter_mut().zip(&row[..len]) {
                    *a = x.mul_add(cj, *a);
                }
            }
        }
    }
}

/// `acc[c] += x0[c] c0 + x1[c] c1 + x2[c] c2 + x3[c] c3` (as nested FMAs, in that order) for
/// `c < body`, a multiple of [`LANES`].
#[inline(always)]
fn update4(acc: &mut [f32], x: [&[f32]; 4], coef: [f32; 4], body: usize) {
    let [x0, x1, x2, x3] = x;
    let [c0, c1, c2, c3] = coef;
    for c in (0..body).step_by(LANES) {
        let a: &mut [f32; LANES] = (&mut acc[c..c + LANES]).try_into().expect("a full chunk");
        let x0: &[f32; LANES] = x0[c..c + LANES].try_into().expect("a full chunk");
        let x1: &[f32; LANES] = x1[c..c + LANES].try_into().expect("a full chunk");
        let x2: &[f32; LANES] = x2[c..c + LANES].try_into().expect("a full chunk");
        let x3: &[f32; LANES] = x3[c..c + LANES].try_into().expect("a full chunk");
        for l in 0..LANES {
            a[l] = x3[l].mul_add(
                c3,
                x2[l].mul_add(c2, x1[l].mul_add(c1, x0[l].mul_add(c0, a[l]))),
            );
        }
    }
}

/// [`update4`] in AVX-512 registers (the compiler left the portable body scalar): the same
/// FMAs per element, so the same bits.
///
/// # Safety
/// The CPU must have AVX-512F; `acc` and every row must hold at least `body` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn update4_avx512(acc: &mut [f32], x: [&[f32]; 4], coef: [f32; 4], body: usize) {
    use std::arch::x86_64::*;
    assert!(acc.len() >= body && x.iter().all(|r| r.len() >= body));
    let c = coef.map(|c| _mm512_set1_ps(c));
    for i in (0..body).step_by(LANES) {
        // SAFETY: `i + LANES <= body`, within every slice (asserted above).
        unsafe {
            let mut a = _mm512_loadu_ps(acc.as_ptr().add(i));
            for (x, c) in x.iter().zip(&c) {
                a = _mm512_fmadd_ps(_mm512_loadu_ps(x.as_ptr().add(i)), *c, a);
            }
            _mm512_storeu_ps(acc.as_mut_ptr().add(i), a);
        }
    }
}

/// One row of [`forward`]: `u = x · aᵀ`, then `y += s · u · bᵀ`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_row<const R: usize>(
    y: &mut [f32],
    x: &[f32],
    a: &[f32],
    bt: &[f32],
    k: usize,
    n: usize,
    scale: f32,
) {
    let u: [f32; R] = dots::<R>(x, a, k).map(|v| v * scale);
    combine::<R>(y, &u, bt, n, None);
}

/// Every row block of one task of [`backward`].
#[inline(always)]
fn backward_rows<const R: usize>(
    s: &Shared<'_>,
    da: &mut [f32],
    dbt: &mut [f32],
    mut dx: Option<&mut [f32]>,
) {
    let (k, n) = (s.k, s.n);
    let rows = s.xl.len() / k.max(1);
    for r0 in (0..rows).step_by(BLOCK_ROWS) {
        let block = BLOCK_ROWS.min(rows - r0);
        let xs: [&[f32]; BLOCK_ROWS] =
            std::array::from_fn(|i| &s.xl[(r0 + i.min(block - 1)) * k..][..k]);
        let ds: [&[f32]; BLOCK_ROWS] =
            std::array::from_fn(|i| &s.dy[(r0 + i.min(block - 1)) * n..][..n]);
        let mut v = [[0f32; R]; BLOCK_ROWS];
        let mut u = [[0f32; R]; BLOCK_ROWS];
        for i in 0..block {
            v[i] = dots::<R>(ds[i], s.bt, n);
            u[i] = dots::<R>(xs[i], s.a, k);
        }
        rank_update::<R>(dbt, &u[..block], &ds[..block], n);
        rank_update::<R>(da, &v[..block], &xs[..block], k);
        if let Some(dx) = dx.as_deref_mut() {
            for (i, v) in v.iter().enumerate().take(block) {
                let row = r0 + i;
                let coef = v.map(|t| t * s.scale);
                let mask = s.mask.map(|mk| &mk[row * k..][..k]);
                combine::<R>(&mut dx[row * k..][..k], &coef, s.a, k, mask);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values as data;
    use super::*;

    /// f64 products by definition.
    fn mm(lhs: &[f32], rhs: &[f32], rows: usize, inner: usize, cols: usize) -> Vec<f64> {
        (0..rows * cols)
            .map(|i| {
                let (a, b) = (i / cols, i % cols);
                (0..inner)
                    .map(|p| f64::from(lhs[a * inner + p]) * f64::from(rhs[p * cols + b]))
                    .sum()
            })
            .collect()
    }

    fn close(ours: &[f32], expected: &[f64], what: &str) {
        assert_eq!(ours.len(), expected.len(), "{what}");
        for (i, (a, b)) in ours.iter().zip(expected).enumerate() {
            assert!(
                (f64::from(*a) - b).abs() < 1e-4 * (1.0 + b.abs()),
                "{what}[{i}]: {a} vs {b}"
            );
        }
    }

    /// Every supported rank; row counts that leave partial blocks and shares; widths with
    /// partial vectors; with and without a mask and `dX`; serial and parallel sizes.
    #[test]
    fn forward_and_backward_match_the_definitions() {
        for (m, k, n, r) in [
            (7, 33, 70, 4),
            (9, 64, 17, 8),
            (1, 5, 3, 16),
            (70, 130, 300, 8),
            (13, 40, 50, 32),
        ] {
            let (x, a, b, dy) = (
                data(m * k, 1),
                data(r * k, 2),
                data(n * r, 3),
                data(m * n, 4),
            );
            let mask: Vec<f32> = (0..m * k)
                .map(|i| if i % 3 == 0 { 0.0 } else { 1.25 })
                .collect();
            let scale = 1.5f32;
            let at = transpose(&a, r, k);
            let bt = transpose(&b, n, r);
            let u = mm(&x, &at, m, k, r);
            let u32s: Vec<f32> = u.iter().map(|&v| v as f32).collect();

            let y0 = data(m * n, 5);
            let mut y = y0.clone();
            forward(&mut y, &x, &a, &b, (m, k, n, r), scale);
            let delta = mm(&u32s, &bt, m, r, n);
            let expected: Vec<f64> = (0..m * n)
                .map(|i| f64::from(y0[i]) + f64::from(scale) * delta[i])
                .collect();
            close(&y, &expected, &format!("y {m}x{k}x{n} r{r}"));

            let v: Vec<f32> = mm(&dy, &b, m, n, r).iter().map(|&v| v as f32).collect();
            let s = f64::from(scale);
            let da: Vec<f64> = mm(&transpose(&v, m, r), &x, r, m, k)
                .iter()
                .map(|t| t * s)
                .collect();
            let db: Vec<f64> = mm(&transpose(&dy, m, n), &u32s, n, m, r)
                .iter()
                .map(|t| t * s)
                .collect();
            let va = mm(&v, &a, m, r, k);
            for masked in [false, true] {
                let mk = masked.then_some(&mask[..]);
                let dx0 = data(m * k, 6);
                let mut dx = dx0.clone();
                let (gda, gdb) = backward(&x, &dy, &a, &b, mk, Some(&mut dx), (m, k, n, r), scale);
                close(&gda, &da, "dA");
                close(&gdb, &db, "dB");
                let expected: Vec<f64> = (0..m * k)
                    .map(|i| f64::from(dx0[i]) + s * va[i] * mk.map_or(1.0, |mk| f64::from(mk[i])))
                    .collect();
                close(
                    &dx,
                    &expected,
                    &format!("dX {m}x{k}x{n} r{r} masked {masked}"),
                );
                let (nda, ndb) = backward(&x, &dy, &a, &b, mk, None, (m, k, n, r), scale);
                assert_eq!((nda, ndb), (gda, gdb), "dA and dB do not depend on dX");
            }
        }
    }
}

#[cfg(test)]
mod measure {
    use super::super::test_values as data;
    use super::*;

    /// The low-rank backward and forward of one training step's LoRA layers at the
    /// LFM2-VL-450M shapes (270 rows, rank 8): `cargo test --release --lib
    /// low_rank::measure -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement"]
    fn a_steps_low_rank_products() {
        // (k, n, layers): 10 convolution layers, 6 attention layers, 16 FFNs.
        let shapes = [
            (1024, 3072, 10),
            (1024, 1024, 10),
            (1024, 1024, 12),
            (1024, 512, 12),
            (1024, 4608, 32),
            (4608, 1024, 16),
        ];
        let (m, r) = (270, 8);
        for round in 0..3 {
            let (mut fwd, mut bwd) = (0f64, 0f64);
            for &(k, n, count) in &shapes {
                let (x, a, b, dy) = (
                    data(m * k, 1),
                    data(r * k, 2),
                    data(n * r, 3),
                    data(m * n, 4),
                );
                let mut y = vec![0f32; m * n];
                let mut dx = vec![0f32; m * k];
                for _ in 0..count {
                    let t = std::time::Instant::now();
                    forward(&mut y, &x, &a, &b, (m, k, n, r), 2.0);
                    fwd += t.elapsed().as_secs_f64();
                    let t = std::time::Instant::now();
                    std::hint::black_box(backward(
                        &x,
                        &dy,
                        &a,
                        &b,
                        None,
                        Some(&mut dx),
                        (m, k, n, r),
                        2.0,
                    ));
                    bwd += t.elapsed().as_secs_f64();
                }
            }
            println!(
                "round {round}: forward {:.1} ms, backward {:.1} ms",
                fwd * 1e3,
                bwd * 1e3
            );
        }
    }
}
