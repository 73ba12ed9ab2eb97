//! Forward and backward passes of the decoder's elementwise blocks for training, on slices.
//!
//! Through candle's autograd, RMSNorm is six graph nodes (square, mean, add, sqrt, divide,
//! multiply) and SwiGLU's `silu(g) * u` three, each a single-threaded pass that allocates its
//! output and, backward, a zero-filled gradient it adds into. Here each block is one parallel
//! pass forward and one backward; the frozen norm weight gets no gradient.

use rayon::prelude::*;

use super::exp::fast_exp;

/// Wall time per kind of fused training op, collected when `VLMPIPE_TRAIN_PROFILE=1`
/// (`vlmpipe bench train` prints it): what the decoder's forward and backward spend in each
/// kernel, the rest being candle's own ops and graph bookkeeping.
pub(crate) mod profile {
    use std::collections::BTreeMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::Instant;

    /// Calls and seconds per op kind.
    static TABLE: Mutex<BTreeMap<&'static str, (usize, f64)>> = Mutex::new(BTreeMap::new());

    pub(crate) fn enabled() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| {
            matches!(
                std::env::var("VLMPIPE_TRAIN_PROFILE").as_deref(),
                Ok("1") | Ok("on")
            )
        })
    }

    /// Runs `f`, adding its wall time to `kind` when profiling.
    pub(crate) fn time<R>(kind: &'static str, f: impl FnOnce() -> R) -> R {
        if !enabled() {
            return f();
        }
        let start = Instant::now();
        let out = f();
        add(kind, start.elapsed().as_secs_f64());
        out
    }

    /// Times from its creation to its drop under `kind` (a scope's tail).
    pub(crate) struct Span {
        kind: &'static str,
        start: Option<Instant>,
    }

    impl Span {
        pub(crate) fn new(kind: &'static str) -> Self {
            Self {
                kind,
                start: enabled().then(Instant::now),
            }
        }
    }

    impl Drop for Span {
        fn drop(&mut self) {
            if let Some(start) = self.start {
                add(self.kind, start.elapsed().as_secs_f64());
            }
        }
    }

    fn add(kind: &'static str, secs: f64) {
        let mut table = TABLE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = table.entry(kind).or_insert((0, 0.0));
        entry.0 += 1;
        entry.1 += secs;
    }

    /// The collected `(kind, calls, seconds)` since the last call, emptying the table.
    pub(crate) fn take() -> Vec<(&'static str, usize, f64)> {
        let mut table = TABLE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::take(&mut *table)
            .into_iter()
            .map(|(k, (n, s))| (k, n, s))
            .collect()
    }
}
/// Rows per rayon task: enough work per task to amortise scheduling.
fn rows_per_task(row: usize) -> usize {
    (16 * 1024 / row.max(1)).max(1)
}

/// RMSNorm over rows of `d`: `y = x / sqrt(mean(x²) + eps) * w`.
///
/// # Panics
/// When `x.len()` is not a multiple of `w.len()` (a bug in the caller).
pub(crate) fn rms_norm_forward(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "rms norm: x is not [rows, d]"
    );
    let mut y = vec![0f32; x.len()];
    let block = d * rows_per_task(d);
    y.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .for_each(|(y, x)| {
            for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                let inv = inv_rms(x, eps);
                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * inv * w;
                }
            }
        });
    y
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

/// The input gradient of [`rms_norm_forward`] for the frozen `w`:
/// `dx = inv · (g∘w) − x · inv³ · mean((g∘w)∘x)`.
///
/// # Panics
/// When the slices do not match (a bug in the caller).
pub(crate) fn rms_norm_backward(x: &[f32], w: &[f32], g: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "rms norm: x is not [rows, d]"
    );
    assert_eq!(g.len(), x.len(), "rms norm: gradient is not x's shape");
    let mut dx = vec![0f32; x.len()];
    let block = d * rows_per_task(d);
    dx.par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(g.par_chunks(block)))
        .for_each(|(dx, (x, g))| {
            for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                let inv = inv_rms(x, eps);
                let dot: f32 = g.iter().zip(w).zip(x).map(|((g, w), x)| g * w * x).sum();
                let c = inv * inv * inv * dot / d as f32;
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                    *dx = inv * g * w - x * c;
                }
            }
        });
    dx
}

/// `silu(g) ∘ u` (SwiGLU's gate), elementwise.
///
/// # Panics
/// When the slices differ in length (a bug in the caller).
pub(crate) fn swiglu_forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len(), "swiglu: gate and up differ in length");
    let mut h = vec![0f32; g.len()];
    const BLOCK: usize = 16 * 1024;
    h.par_chunks_mut(BLOCK)
        .zip(g.par_chunks(BLOCK).zip(u.par_chunks(BLOCK)))
        .for_each(|(h, (g, u))| {
            for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
                *h = g / (1.0 + fast_exp(-g)) * u;
            }
        });
    h
}

/// Gradients of [`swiglu_forward`]: `dg = dh ∘ u ∘ σ(g)(1 + g(1 − σ(g)))`, `du = dh ∘ silu(g)`.
///
/// # Panics
/// When the slices differ in length (a bug in the caller).
pub(crate) fn swiglu_backward(g: &[f32], u: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(
        g.len() == u.len() && g.len() == dh.len(),
        "swiglu: gate, up and gradient differ in length"
    );
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    const BLOCK: usize = 16 * 1024;
    dg.par_chunks_mut(BLOCK)
        .zip(du.par_chunks_mut(BLOCK))
        .zip(
            g.par_chunks(BLOCK)
                .zip(u.par_chunks(BLOCK))
                .zip(dh.par_chunks(BLOCK)),
        )
        .for_each(|((dg, du), ((g, u), dh))| {
            for ((((dg, du), &g), &u), &dh) in dg.iter_mut().zip(du).zip(g).zip(u).zip(dh) {
                let s = 1.0 / (1.0 + fast_exp(-g));
                *du = dh * g * s;
                *dg = dh * u * s * (1.0 + g * (1.0 - s));
            }
        });
    (dg, du)
}

/// Softmax over rows of `row` (the inference kernel, [`super::cpu::softmax_in_place`]).
///
/// # Panics
/// When `x.len()` is not a multiple of `row` (a bug in the caller).
pub(crate) fn softmax_forward(x: &[f32], row: usize) -> Vec<f32> {
    assert!(
        row > 0 && x.len().is_multiple_of(row),
        "softmax: x is not [rows, row]"
    );
    let mut y = x.to_vec();
    y.par_chunks_mut(row * rows_per_task(row))
        .for_each(|block| block.chunks_mut(row).for_each(super::cpu::softmax_in_place));
    y
}

/// The input gradient of [`softmax_forward`] from its output `y`: `y ∘ (g − Σ g∘y)` per row.
///
/// # Panics
/// When the slices do not match (a bug in the caller).
pub(crate) fn softmax_backward(y: &[f32], g: &[f32], row: usize) -> Vec<f32> {
    assert!(
        row > 0 && y.len().is_multiple_of(row) && g.len() == y.len(),
        "softmax: shapes differ"
    );
    let mut dx = vec![0f32; y.len()];
    let block = row * rows_per_task(row);
    dx.par_chunks_mut(block)
        .zip(y.par_chunks(block).zip(g.par_chunks(block)))
        .for_each(|(dx, (y, g))| {
            for ((dx, y), g) in dx.chunks_mut(row).zip(y.chunks(row)).zip(g.chunks(row)) {
                let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                for ((dx, y), g) in dx.iter_mut().zip(y).zip(g) {
                    *dx = y * (g - dot);
                }
            }
        });
    dx
}

/// Shape of LFM2's gated short convolution over `[batch, len, 3 * dim]` projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvShape {
    pub batch: usize,
    pub len: usize,
    pub dim: usize,
}

/// `B ∘ X ∘ mask` of one row of the `[len, 3 * dim]` projection (`B`, `C`, `X` side by side).
fn gated_input(bcx: &[f32], mask: Option<&[f32]>, len: usize, dim: usize) -> Vec<f32> {
    let mut bx = vec![0f32; len * dim];
    for t in 0..len {
        let row = &bcx[t * 3 * dim..(t + 1) * 3 * dim];
        let keep = mask.map_or(1.0, |m| m[t]);
        for ((o, b), x) in bx[t * dim..(t + 1) * dim]
            .iter_mut()
            .zip(&row[..dim])
            .zip(&row[2 * dim..])
        {
            *o = b * x * keep;
        }
    }
    bx
}

/// The causal depthwise convolution of `bx [len, dim]` with `taps [K][dim]` (tap `i` multiplies
/// the input `K - 1 - i` steps back, zeros before the start) plus `bias`.
fn causal_conv(
    bx: &[f32],
    taps: &[&[f32]],
    bias: Option<&[f32]>,
    len: usize,
    dim: usize,
) -> Vec<f32> {
    let k = taps.len();
    let mut conv = vec![0f32; len * dim];
    for t in 0..len {
        let out = &mut conv[t * dim..(t + 1) * dim];
        if let Some(bias) = bias {
            out.copy_from_slice(bias);
        }
        for (i, tap) in taps.iter().enumerate() {
            let Some(src) = (t + i + 1).checked_sub(k) else {
                continue;
            };
            for ((o, w), x) in out
                .iter_mut()
                .zip(tap.iter())
                .zip(&bx[src * dim..(src + 1) * dim])
            {
                *o += w * x;
            }
        }
    }
    conv
}

/// The one shape both passes of the short convolution take for `bcx`: `[batch, len, 3 * dim]`.
fn assert_conv_input(bcx: &[f32], ConvShape { batch, len, dim }: ConvShape) {
    assert_eq!(
        bcx.len(),
        batch * len * 3 * dim,
        "short conv: input is not [B, L, 3D]"
    );
}

/// LFM2's gated short convolution from a zero state: `C ∘ conv(B ∘ X ∘ mask)` per row, with
/// `bcx [batch, len, 3 * dim]`, `mask [batch, len]` (0 at padding), `taps [K][dim]`.
///
/// # Panics
/// When the slices do not match `shape` (a bug in the caller).
pub(crate) fn short_conv_forward(
    bcx: &[f32],
    mask: Option<&[f32]>,
    taps: &[&[f32]],
    bias: Option<&[f32]>,
    shape: ConvShape,
) -> Vec<f32> {
    let ConvShape { batch, len, dim } = shape;
    assert_conv_input(bcx, shape);
    assert!(
        mask.is_none_or(|m| m.len() == batch * len),
        "short conv: mask is not [B, L]"
    );
    let mut y = vec![0f32; batch * len * dim];
    if y.is_empty() {
        return y;
    }
    y.par_chunks_mut(len * dim)
        .zip(bcx.par_chunks(len * 3 * dim))
        .enumerate()
        .for_each(|(b, (y, bcx))| {
            let m = mask.map(|m| &m[b * len..(b + 1) * len]);
            let conv = causal_conv(&gated_input(bcx, m, len, dim), taps, bias, len, dim);
            for t in 0..len {
                let c = &bcx[t * 3 * dim + dim..t * 3 * dim + 2 * dim];
                for ((y, c), v) in y[t * dim..(t + 1) * dim]
                    .iter_mut()
                    .zip(c)
                    .zip(&conv[t * dim..(t + 1) * dim])
                {
                    *y = c * v;
                }
            }
        });
    y
}

/// The input gradient `d bcx [batch, len, 3 * dim]` of [`short_conv_forward`] given
/// `dy [batch, len, dim]`; the frozen taps and bias get none.
///
/// # Panics
/// When the slices do not match `shape` (a bug in the caller).
pub(crate) fn short_conv_backward(
    bcx: &[f32],
    mask: Option<&[f32]>,
    taps: &[&[f32]],
    bias: Option<&[f32]>,
    dy: &[f32],
    shape: ConvShape,
) -> Vec<f32> {
    let ConvShape { batch, len, dim } = shape;
    assert_conv_input(bcx, shape);
    assert_eq!(
        dy.len(),
        batch * len * dim,
        "short conv: gradient is not [B, L, D]"
    );
    let k = taps.len();
    let mut d = vec![0f32; bcx.len()];
    if d.is_empty() {
        return d;
    }
    d.par_chunks_mut(len * 3 * dim)
        .zip(bcx.par_chunks(len * 3 * dim).zip(dy.par_chunks(len * dim)))
        .enumerate()
        .for_each(|(b, (d, (bcx, dy)))| {
            let m = mask.map(|m| &m[b * len..(b + 1) * len]);
            let conv = causal_conv(&gated_input(bcx, m, len, dim), taps, bias, len, dim);
            // dconv = dy ∘ C; dC = dy ∘ conv
            let mut dconv = vec![0f32; len * dim];
            for t in 0..len {
                let row = t * 3 * dim;
                for j in 0..dim {
                    let g = dy[t * dim + j];
                    dconv[t * dim + j] = g * bcx[row + dim + j];
                    d[row + dim + j] = g * conv[t * dim + j];
                }
            }
            // d(bx)[s] = sum_i tap_i ∘ dconv[s + K - 1 - i]; then through B ∘ X ∘ mask.
            let mut dbx = vec![0f32; dim];
            for s in 0..len {
                dbx.iter_mut().for_each(|v| *v = 0.0);
                for (i, tap) in taps.iter().enumerate() {
                    let t = s + k - 1 - i;
                    if t >= len {
                        continue;
                    }
                    for ((o, w), g) in dbx
                        .iter_mut()
                        .zip(tap.iter())
                        .zip(&dconv[t * dim..(t + 1) * dim])
                    {
                        *o += w * g;
                    }
                }
                let keep = m.map_or(1.0, |m| m[s]);
                let row = s * 3 * dim;
                for j in 0..dim {
                    let g = dbx[j] * keep;
                    d[row + j] = g * bcx[row + 2 * dim + j];
                    d[row + 2 * dim + j] = g * bcx[row + j];
                }
            }
        });
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 200.0
                    - 2.5
            })
            .collect()
    }

    /// Central differences of `f` in f64 against an analytic gradient of `sum(f(x) ∘ g)`.
    fn check_grad(x: &[f32], analytic: &[f32], f: impl Fn(&[f64]) -> f64) {
        let mut xs: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        for i in 0..x.len() {
            let h = 1e-5;
            let orig = xs[i];
            xs[i] = orig + h;
            let up = f(&xs);
            xs[i] = orig - h;
            let down = f(&xs);
            xs[i] = orig;
            let numeric = (up - down) / (2.0 * h);
            let a = f64::from(analytic[i]);
            assert!(
                (a - numeric).abs() < 1e-3 * (1.0 + numeric.abs()),
                "[{i}]: {a} vs {numeric}"
            );
        }
    }

    #[test]
    fn rms_norm_gradient_matches_finite_differences() {
        let d = 12;
        let (x, w, g) = (data(3 * d, 1), data(d, 2), data(3 * d, 3));
        let eps = 1e-5;
        let y = rms_norm_forward(&x, &w, eps);
        let inv = inv_rms(&x[..d], eps);
        assert!((y[1] - x[1] * inv * w[1]).abs() < 1e-6);
        let dx = rms_norm_backward(&x, &w, &g, eps);
        check_grad(&x, &dx, |xs| {
            xs.chunks(d)
                .zip(g.chunks(d))
                .map(|(x, g)| {
                    let ms: f64 = x.iter().map(|v| v * v).sum::<f64>() / d as f64;
                    let inv = 1.0 / (ms + f64::from(eps)).sqrt();
                    x.iter()
                        .zip(g)
                        .zip(&w)
                        .map(|((x, g), w)| x * inv * f64::from(*w) * f64::from(*g))
                        .sum::<f64>()
                })
                .sum()
        });
    }

    #[test]
    fn short_conv_gradient_matches_finite_differences() {
        let shape = ConvShape {
            batch: 2,
            len: 5,
            dim: 3,
        };
        let bcx = data(2 * 5 * 9, 7);
        let mask: Vec<f32> = (0..10).map(|i| if i == 5 { 0.0 } else { 1.0 }).collect();
        let tap_data = data(9, 8);
        let taps: Vec<&[f32]> = tap_data.chunks(3).collect();
        let bias = data(3, 9);
        let dy = data(2 * 5 * 3, 10);
        let reference = |x: &[f64]| -> Vec<f64> {
            let mut out = vec![0f64; 30];
            for b in 0..2 {
                for t in 0..5 {
                    for j in 0..3 {
                        let mut v = f64::from(bias[j]);
                        for (i, tap) in taps.iter().enumerate() {
                            if t + i + 1 >= 3 {
                                let s = t + i + 1 - 3;
                                let row = (b * 5 + s) * 9;
                                v += f64::from(tap[j])
                                    * x[row + j]
                                    * x[row + 6 + j]
                                    * f64::from(mask[b * 5 + s]);
                            }
                        }
                        out[(b * 5 + t) * 3 + j] = x[(b * 5 + t) * 9 + 3 + j] * v;
                    }
                }
            }
            out
        };
        let y = short_conv_forward(&bcx, Some(&mask), &taps, Some(&bias), shape);
        let x64: Vec<f64> = bcx.iter().map(|&v| f64::from(v)).collect();
        for (a, b) in y.iter().zip(reference(&x64)) {
            assert!((f64::from(*a) - b).abs() < 1e-5);
        }
        let d = short_conv_backward(&bcx, Some(&mask), &taps, Some(&bias), &dy, shape);
        check_grad(&bcx, &d, |x| {
            reference(x)
                .iter()
                .zip(&dy)
                .map(|(y, g)| y * f64::from(*g))
                .sum()
        });
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        let (x, g) = (data(3 * 8, 11), data(3 * 8, 12));
        let y = softmax_forward(&x, 8);
        let dx = softmax_backward(&y, &g, 8);
        check_grad(&x, &dx, |xs| {
            xs.chunks(8)
                .zip(g.chunks(8))
                .map(|(x, g)| {
                    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = x.iter().map(|v| (v - max).exp()).sum();
                    x.iter()
                        .zip(g)
                        .map(|(v, g)| (v - max).exp() / z * f64::from(*g))
                        .sum::<f64>()
                })
                .sum()
        });
    }

    #[test]
    fn swiglu_gradients_match_finite_differences() {
        let (g, u, dh) = (data(40, 4), data(40, 5), data(40, 6));
        let h = swiglu_forward(&g, &u);
        let silu = |x: f64| x / (1.0 + (-x).exp());
        assert!((f64::from(h[7]) - silu(f64::from(g[7])) * f64::from(u[7])).abs() < 1e-5);
        let (dg, du) = swiglu_backward(&g, &u, &dh);
        check_grad(&g, &dg, |gs| {
            gs.iter()
                .zip(&u)
                .zip(&dh)
                .map(|((g, u), d)| silu(*g) * f64::from(*u) * f64::from(*d))
                .sum()
        });
        check_grad(&u, &du, |us| {
            us.iter()
                .zip(&g)
                .zip(&dh)
                .map(|((u, g), d)| silu(f64::from(*g)) * u * f64::from(*d))
                .sum()
        });
    }
}
