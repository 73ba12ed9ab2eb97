//! One query row per head attending over a key/value cache: the attention of a decode step.
//!
//! Why not candle's batched matmuls (scores `q kᵀ`, then `probs v`) there: for one query row
//! they are two tiny products through the `gemm` crate's dispatch per layer, each reading the
//! cache through a strided view, and in `perf` of a Q8_0 decode step at the LFM2-VL-450M shapes
//! they were about a twentieth of the step, beside products that now run at the weights' read
//! bandwidth (BENCHMARKS.md, "Q8_0 decode at the read bandwidth"). Here each key/value head is
//! read once, in place, for all the query heads that share it.

use rayon::prelude::*;

use super::exp::fast_exp;

/// Where one batch row's keys (or values) lie in a cache buffer: `kv_heads` heads of `len`
/// rows of `head_dim` floats, head `g` starting at `g * head_stride`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CacheLayout {
    pub(crate) kv_heads: usize,
    pub(crate) len: usize,
    pub(crate) head_dim: usize,
    pub(crate) head_stride: usize,
}

/// `softmax(scale * q kᵀ) v` for one batch row: `q` is `[heads, head_dim]` (query head `h` uses
/// key/value head `h / (heads / kv_heads)`), `k` and `v` as `layout` says; returns
/// `[heads, head_dim]`. The softmax subtracts the row maximum, as candle's does.
pub(crate) fn attend(q: &[f32], k: &[f32], v: &[f32], layout: CacheLayout, scale: f32) -> Vec<f32> {
    let CacheLayout {
        kv_heads,
        len,
        head_dim: hd,
        head_stride,
    } = layout;
    let heads = q.len() / hd.max(1);
    assert!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads) && q.len() == heads * hd,
        "attention step: {heads} query heads of {hd} over {kv_heads} key/value heads"
    );
    let last = (kv_heads - 1) * head_stride + len * hd;
    assert!(
        k.len() >= last && v.len() >= last,
        "attention step: cache shorter than its layout"
    );
    let groups = heads / kv_heads;
    // The query scaled first, as the candle path multiplies `q` before its product.
    let q: Vec<f32> = q.iter().map(|x| x * scale).collect();
    let mut out = vec![0f32; heads * hd];
    out.par_chunks_mut(groups * hd)
        .zip(q.par_chunks(groups * hd))
        .enumerate()
        .for_each(|(g, (out, q))| {
            let k = &k[g * head_stride..g * head_stride + len * hd];
            let v = &v[g * head_stride..g * head_stride + len * hd];
            let mut scores = vec![0f32; len];
            for (out, q) in out.chunks_exact_mut(hd).zip(q.chunks_exact(hd)) {
                head(q, k, v, &mut scores, out);
            }
        });
    out
}

/// One (already scaled) query head against its key/value head's `len` rows.
fn head(q: &[f32], k: &[f32], v: &[f32], scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { head_avx2(q, k, v, scores, out) };
    }
    head_portable(q, k, v, scores, out);
}

/// The portable loop compiled for AVX2, which LLVM vectorises (eight-lane partial sums).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn head_avx2(q: &[f32], k: &[f32], v: &[f32], scores: &mut [f32], out: &mut [f32]) {
    head_portable(q, k, v, scores, out);
}

#[inline(always)]
fn head_portable(q: &[f32], k: &[f32], v: &[f32], scores: &mut [f32], out: &mut [f32]) {
    let hd = q.len();
    let mut max = f32::NEG_INFINITY;
    for (s, k) in scores.iter_mut().zip(k.chunks_exact(hd)) {
        *s = dot(q, k);
        max = max.max(*s);
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = fast_exp(*s - max);
        sum += *s;
    }
    out.fill(0.0);
    for (&p, v) in scores.iter().zip(v.chunks_exact(hd)) {
        let p = p / sum;
        for (o, &x) in out.iter_mut().zip(v) {
            *o += p * x;
        }
    }
}

/// A dot product in eight partial sums (so the compiler can keep them in one vector).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_rest) = a.as_chunks::<8>();
    let (b8, b_rest) = b.as_chunks::<8>();
    for (a, b) in a8.iter().zip(b8) {
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (a, b) in a_rest.iter().zip(b_rest) {
        s += a * b;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a plain f64 evaluation of the formula, over a cache whose heads sit further apart
    /// than their rows (spare capacity), with grouped query heads.
    #[test]
    fn equals_the_formula_over_a_strided_cache() {
        let (heads, kv_heads, hd, len, capacity) = (6, 3, 12, 5, 9);
        let val = |i: usize| ((i * 37 % 101) as f32 / 50.0) - 1.0;
        let q: Vec<f32> = (0..heads * hd).map(val).collect();
        let k: Vec<f32> = (0..kv_heads * capacity * hd).map(|i| val(i + 7)).collect();
        let v: Vec<f32> = (0..kv_heads * capacity * hd).map(|i| val(i + 11)).collect();
        let layout = CacheLayout {
            kv_heads,
            len,
            head_dim: hd,
            head_stride: capacity * hd,
        };
        let scale = 0.3;
        let got = attend(&q, &k, &v, layout, scale);
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            let row = |m: &[f32], t: usize| {
                m[g * capacity * hd + t * hd..][..hd]
                    .iter()
                    .map(|&x| f64::from(x))
                    .collect::<Vec<_>>()
            };
            let qh: Vec<f64> = q[h * hd..][..hd].iter().map(|&x| f64::from(x)).collect();
            let s: Vec<f64> = (0..len)
                .map(|t| row(&k, t).iter().zip(&qh).map(|(a, b)| a * b).sum::<f64>() * 0.3)
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let want: f64 = (0..len).map(|t| e[t] / z * row(&v, t)[d]).sum();
                let got = f64::from(got[h * hd + d]);
                assert!(
                    (got - want).abs() < 1e-5,
                    "head {h} dim {d}: {got} vs {want}"
                );
            }
        }
    }
}
