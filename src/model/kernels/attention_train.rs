//! The decoder's grouped-query attention for training, forward and backward, on slices.
//!
//! Through candle's autograd one attention layer is about twenty graph nodes (RoPE's halves,
//! negation, concatenation and products, head transposes and copies, the scale, `q kᵀ`, the mask,
//! softmax, `p v`), each a pass that allocates its output and, backward, a zero-filled gradient it
//! adds into. Here RoPE, the scale, both products, the mask and the softmax are one pass forward
//! and one backward, with no head transposes: queries, keys and values are read in the
//! projections' `[rows, heads * head_dim]` layout and the gradients written in it.
//!
//! Work is split into one task per (sequence, key/value head): the task owns that head's keys and
//! values, runs every query head sharing them, and so sums the grouped heads' `dk`, `dv` without
//! any reduction across tasks (and in a fixed order: a step's gradients are the same bits on
//! every run). Query rows go in blocks of [`BLOCK_ROWS`]; a block reads only the keys some row of
//! it can see (the causal mask's upper triangle is never computed).
//!
//! The forward can keep the probabilities (`[batch, heads, q_rows, kv_rows]`, 4.7 MB per layer
//! at LFM2-VL-450M's 270 tokens) for the backward, which then reruns no `q kᵀ` and no softmax;
//! given none, the backward recomputes them task by task (the same bits). `model::autograd`
//! keeps them up to a bound per layer (measured: BENCHMARKS.md, "LoRA training step").
//!
//! Measured against the candle chain it replaces, one layer at the 450M training shapes forward
//! and backward: 7.0 ms against 28.3 ms
//! (`autograd::tests::fused_attention_against_the_candle_chain`).
//!
//! The forward's two products run on the packed AVX-512 kernel where weights are packed
//! ([`Kernel::for_this_cpu`]), each task packing its keys and values once, as inference's
//! [`super::cpu::attention_with`] does; the backward's four products on the `gemm` crate, one
//! thread per task.

use rayon::prelude::*;

use super::backward::profile;
use super::cpu::{MatMut, MatRef, gemm, softmax_in_place};
use super::packed::{Kernel, PackedWeight};

/// Query rows per block: a block's scores (`64 x kv_rows`) stay in L2 with its operands.
const BLOCK_ROWS: usize = 64;

/// Shape of one training attention call. Queries are `[batch, q_rows, heads * head_dim]`, keys
/// and values `[batch, kv_rows, kv_heads * head_dim]`; query row `i` sits at position
/// `kv_rows - q_rows + i` of its sequence (the decoder's last layer computes only the tail).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Shape {
    pub batch: usize,
    pub q_rows: usize,
    pub kv_rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q · k` before the mask and the softmax.
    pub scale: f32,
}

impl Shape {
    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn check(&self, q: &[f32], k: &[f32], v: &[f32], rope: &Rope<'_>, mask: Option<&[f32]>) {
        let Shape {
            batch: b,
            q_rows: l,
            kv_rows: t,
            head_dim: hd,
            ..
        } = *self;
        assert!(
            self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
            "attention: bad head counts"
        );
        assert!(
            hd.is_multiple_of(2),
            "attention: RoPE needs an even head dim"
        );
        assert!(l <= t, "attention: more queries than keys");
        assert_eq!(q.len(), b * l * self.q_width(), "attention: q shape");
        assert_eq!(k.len(), b * t * self.kv_width(), "attention: k shape");
        assert_eq!(v.len(), b * t * self.kv_width(), "attention: v shape");
        assert_eq!(rope.cos.len(), b * t * hd / 2, "attention: cos shape");
        assert_eq!(rope.sin.len(), b * t * hd / 2, "attention: sin shape");
        if let Some(mask) = mask {
            assert_eq!(mask.len(), b * l * t, "attention: mask shape");
        }
    }
}

/// RoPE tables `[batch, kv_rows, head_dim / 2]` (rotate-half layout: element `i` of a head turns
/// with element `i + head_dim / 2`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

/// `scale * rope(x)` for `rows` head vectors read `stride` apart, into `[rows, hd]`; `cos`/`sin`
/// hold the rows' `hd / 2` angles one after another. Written as candle's composite form
/// (`x * cos + rotate_half(x) * sin`, then the scale), so the values are its bits.
fn rope_rows(
    x: &[f32],
    rows: usize,
    hd: usize,
    stride: usize,
    cos: &[f32],
    sin: &[f32],
    scale: f32,
) -> Vec<f32> {
    let half = hd / 2;
    let mut out = vec![0f32; rows * hd];
    for (r, dst) in out.chunks_exact_mut(hd).enumerate() {
        let src = &x[r * stride..][..hd];
        let (c, s) = (&cos[r * half..][..half], &sin[r * half..][..half]);
        let (lo, hi) = dst.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (src[i], src[i + half]);
            lo[i] = (x1 * c[i] + -x2 * s[i]) * scale;
            hi[i] = (x2 * c[i] + x1 * s[i]) * scale;
        }
    }
    out
}

/// The gradient through [`rope_rows`] (without its scale: the caller folds it in): each pair
/// turns back by its angle. Writes `[rows, hd]` rows `stride` apart into `dst`.
fn rope_rows_backward(
    dy: &[f32],
    hd: usize,
    cos: &[f32],
    sin: &[f32],
    dst: &mut [f32],
    stride: usize,
) {
    let half = hd / 2;
    for (r, g) in dy.chunks_exact(hd).enumerate() {
        let (c, s) = (&cos[r * half..][..half], &sin[r * half..][..half]);
        let out = &mut dst[r * stride..][..hd];
        for i in 0..half {
            let (g1, g2) = (g[i], g[i + half]);
            out[i] = g1 * c[i] + g2 * s[i];
            out[i + half] = g2 * c[i] - g1 * s[i];
        }
    }
}

/// Keys each query row sees: one past its last key whose mask is not `-inf` (all `kv_rows`
/// without a mask). Keys past it get probability 0 and are never multiplied.
fn visible_keys(mask: Option<&[f32]>, s: &Shape) -> Vec<usize> {
    let (rows, t) = (s.batch * s.q_rows, s.kv_rows);
    match mask {
        None => vec![t; rows],
        Some(mask) => mask
            .chunks_exact(t)
            .map(|row| {
                row.iter()
                    .rposition(|&m| m != f32::NEG_INFINITY)
                    .map_or(0, |j| j + 1)
            })
            .collect(),
    }
}

/// Query-row blocks `(first row, rows, keys the block reads)` of one sequence.
fn blocks(visible: &[usize]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    visible.chunks(BLOCK_ROWS).enumerate().map(|(i, vis)| {
        (
            i * BLOCK_ROWS,
            vis.len(),
            vis.iter().copied().max().unwrap_or(0),
        )
    })
}

/// Rows `row0..row0 + rows`, keys `0..keys` of a `[_, t]` row-major matrix.
fn block_view(data: &[f32], row0: usize, rows: usize, keys: usize, t: usize) -> MatRef<'_> {
    MatRef {
        data,
        offset: row0 * t,
        rows,
        cols: keys,
        row_stride: t,
        col_stride: 1,
    }
}

/// What one task (sequence `b`, key/value head `g`) multiplies: its keys after RoPE `[t, hd]`
/// and its query heads' scaled queries after RoPE, `[l, hd]` each.
struct TaskInputs {
    b: usize,
    g: usize,
    keys: Vec<f32>,
    queries: Vec<Vec<f32>>,
}

impl TaskInputs {
    fn new(q: &[f32], k: &[f32], rope: &Rope<'_>, s: &Shape, task: usize) -> Self {
        let (l, t, hd) = (s.q_rows, s.kv_rows, s.head_dim);
        let (qw, kvw, half) = (s.q_width(), s.kv_width(), hd / 2);
        let (b, g) = (task / s.kv_heads, task % s.kv_heads);
        let (cos, sin) = (&rope.cos[b * t * half..], &rope.sin[b * t * half..]);
        let keys = rope_rows(&k[b * t * kvw + g * hd..], t, hd, kvw, cos, sin, 1.0);
        let (past, q_b) = ((t - l) * half, &q[b * l * qw..]);
        let queries = (0..s.groups())
            .map(|j| {
                let h = g * s.groups() + j;
                let (cos, sin) = (&cos[past..], &sin[past..]);
                rope_rows(&q_b[h * hd..], l, hd, qw, cos, sin, s.scale)
            })
            .collect();
        Self {
            b,
            g,
            keys,
            queries,
        }
    }

    /// The task's probabilities `[groups, l, t]` into `probs`, which must hold zeros: only each
    /// row block's visible keys are written.
    fn probabilities(
        &self,
        mask: Option<&[f32]>,
        visible: &[usize],
        s: &Shape,
        kernel: Option<Kernel>,
        probs: &mut [f32],
    ) {
        let (l, t, hd) = (s.q_rows, s.kv_rows, s.head_dim);
        let packed = kernel.map(|kernel| PackedWeight::pack_strided(&self.keys, t, hd, hd, kernel));
        for (qs, probs) in self.queries.iter().zip(probs.chunks_mut(l * t)) {
            for (row0, rows, keys) in blocks(visible) {
                if keys == 0 {
                    continue;
                }
                let scores = &mut probs[row0 * t..][..(rows - 1) * t + keys];
                match &packed {
                    Some(kp) => kp.matmul_serial(&qs[row0 * hd..], rows, hd, keys, hd, scores, t),
                    None => gemm(
                        MatMut::new(scores, 0, t),
                        MatRef::row_major(qs, l, hd).rows(row0, rows),
                        MatRef::row_major(&self.keys, t, hd).rows(0, keys).t(),
                        1.0,
                        false,
                        1,
                    ),
                }
                for (i, row) in scores.chunks_mut(t).enumerate() {
                    let (row, vis) = (&mut row[..keys], visible[row0 + i]);
                    if let Some(mask) = mask {
                        let m = &mask[(self.b * l + row0 + i) * t..][..keys];
                        row.iter_mut().zip(m).for_each(|(x, m)| *x += m);
                    }
                    softmax_in_place(&mut row[..vis]);
                    row[vis..].fill(0.0);
                }
            }
        }
    }
}

/// `softmax(scale · rope(q) rope(k)ᵀ + mask) · v` per query head, each reading key/value head
/// `h / (heads / kv_heads)`; `mask` is additive `[batch, q_rows, kv_rows]` (`-inf` hides a key).
/// Returns the output `[batch, q_rows, heads * head_dim]` and, with `keep_probs`, the
/// probabilities `[batch, heads, q_rows, kv_rows]` for [`backward`] (else it recomputes them).
/// `kernel`: where the two products run (`None`: the `gemm` crate).
///
/// # Panics
/// When the slices do not match `s` (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rope: Rope<'_>,
    mask: Option<&[f32]>,
    s: Shape,
    kernel: Option<Kernel>,
    keep_probs: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    s.check(q, k, v, &rope, mask);
    if s.q_rows == 0 {
        return (Vec::new(), keep_probs.then(Vec::new));
    }
    profile::time("attention fwd", || {
        forward_inner(q, k, v, rope, mask, s, kernel, keep_probs)
    })
}

#[allow(clippy::too_many_arguments)]
fn forward_inner(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rope: Rope<'_>,
    mask: Option<&[f32]>,
    s: Shape,
    kernel: Option<Kernel>,
    keep_probs: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let (l, t, hd) = (s.q_rows, s.kv_rows, s.head_dim);
    let (qw, kvw, groups) = (s.q_width(), s.kv_width(), s.groups());
    let visible = visible_keys(mask, &s);
    let task_len = groups * l * t;
    // Kept: one buffer the tasks fill in place; else each task's own, dropped when it ends.
    let mut kept = keep_probs.then(|| vec![0f32; s.batch * s.heads * l * t]);
    let run = |task: usize, probs: &mut [f32]| -> Vec<f32> {
        let inputs = TaskInputs::new(q, k, &rope, &s, task);
        let (b, g) = (inputs.b, inputs.g);
        let visible = &visible[b * l..][..l];
        inputs.probabilities(mask, visible, &s, kernel, probs);
        let v_b = &v[b * t * kvw..][..t * kvw];
        let packed = kernel.map(|kernel| {
            PackedWeight::pack_transposed_strided(&v_b[g * hd..], t, hd, kvw, kernel)
        });
        let v_g = MatRef::row_major(v_b, t, kvw).cols(g * hd, hd);
        let mut out = vec![0f32; groups * l * hd];
        for (probs, out) in probs.chunks(l * t).zip(out.chunks_mut(l * hd)) {
            for (row0, rows, keys) in blocks(visible) {
                if keys == 0 {
                    continue;
                }
                let p = &probs[row0 * t..][..(rows - 1) * t + keys];
                match &packed {
                    Some(vp) => vp.matmul_serial(p, rows, t, hd, keys, &mut out[row0 * hd..], hd),
                    None => gemm(
                        MatMut::new(out, row0 * hd, hd),
                        block_view(p, 0, rows, keys, t),
                        v_g.rows(0, keys),
                        1.0,
                        false,
                        1,
                    ),
                }
            }
        }
        out
    };
    let pieces: Vec<Vec<f32>> = match kept.as_mut() {
        Some(kept) => kept
            .par_chunks_mut(task_len)
            .enumerate()
            .map(|(task, probs)| run(task, probs))
            .collect(),
        None => (0..s.batch * s.kv_heads)
            .into_par_iter()
            .map(|task| run(task, &mut vec![0f32; task_len]))
            .collect(),
    };
    let mut out = vec![0f32; s.batch * l * qw];
    for (task, piece) in pieces.iter().enumerate() {
        let (b, g) = (task / s.kv_heads, task % s.kv_heads);
        for (j, head) in piece.chunks_exact(l * hd).enumerate() {
            let h = g * groups + j;
            for (i, src) in head.chunks_exact(hd).enumerate() {
                out[(b * l + i) * qw + h * hd..][..hd].copy_from_slice(src);
            }
        }
    }
    (out, kept)
}

/// Gradients `(dq, dk, dv)` of [`forward`] for the output gradient `d_out`, in the inputs'
/// layouts (`dk`, `dv` summed over the query heads sharing each key/value head), from the
/// probabilities `forward` kept, or recomputed on `kernel` when `probs` is `None`.
///
/// # Panics
/// When the slices do not match `s` (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rope: Rope<'_>,
    mask: Option<&[f32]>,
    probs: Option<&[f32]>,
    d_out: &[f32],
    s: Shape,
    kernel: Option<Kernel>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    s.check(q, k, v, &rope, mask);
    if let Some(probs) = probs {
        assert_eq!(
            probs.len(),
            s.batch * s.heads * s.q_rows * s.kv_rows,
            "attention: probabilities shape"
        );
    }
    assert_eq!(d_out.len(), q.len(), "attention: output gradient shape");
    if s.q_rows == 0 {
        return (Vec::new(), vec![0.0; k.len()], vec![0.0; v.len()]);
    }
    profile::time("attention bwd", || {
        backward_inner(q, k, v, rope, mask, probs, d_out, s, kernel)
    })
}

#[allow(clippy::too_many_arguments)]
fn backward_inner(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    rope: Rope<'_>,
    mask: Option<&[f32]>,
    probs: Option<&[f32]>,
    d_out: &[f32],
    s: Shape,
    kernel: Option<Kernel>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (l, t, hd) = (s.q_rows, s.kv_rows, s.head_dim);
    let (qw, kvw, groups) = (s.q_width(), s.kv_width(), s.groups());
    let half = hd / 2;
    let past = t - l;
    let visible = visible_keys(mask, &s);
    let task_len = groups * l * t;
    // Per task: `dq` of its query heads `[groups, l, hd]`, then `dk`, `dv` of its head `[t, hd]`,
    // `dq` and `dk` still in RoPE'd coordinates.
    let pieces: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..s.batch * s.kv_heads)
        .into_par_iter()
        .map(|task| {
            let inputs = TaskInputs::new(q, k, &rope, &s, task);
            let (b, g) = (inputs.b, inputs.g);
            let visible = &visible[b * l..][..l];
            let recomputed;
            let probs = match probs {
                Some(probs) => &probs[task * task_len..][..task_len],
                None => {
                    let mut p = vec![0f32; task_len];
                    inputs.probabilities(mask, visible, &s, kernel, &mut p);
                    recomputed = p;
                    &recomputed[..]
                }
            };
            let d_out_b = MatRef::row_major(&d_out[b * l * qw..][..l * qw], l, qw);
            let v_g = MatRef::row_major(&v[b * t * kvw..][..t * kvw], t, kvw).cols(g * hd, hd);
            let kr = MatRef::row_major(&inputs.keys, t, hd);
            let (mut dq, mut dk, mut dv) = (
                vec![0f32; groups * l * hd],
                vec![0f32; t * hd],
                vec![0f32; t * hd],
            );
            // The softmax's input gradient of one head, rows `keys` wide, `t` apart.
            let mut ds = vec![0f32; l * t];
            for (j, (qs, p_h)) in inputs.queries.iter().zip(probs.chunks(l * t)).enumerate() {
                let d_o = d_out_b.cols((g * groups + j) * hd, hd);
                for (row0, rows, keys) in blocks(visible) {
                    if keys == 0 {
                        continue;
                    }
                    let strided = |data| block_view(data, row0, rows, keys, t);
                    // dP = dO · vᵀ
                    gemm(
                        MatMut::new(&mut ds, row0 * t, t),
                        d_o.rows(row0, rows),
                        v_g.rows(0, keys).t(),
                        1.0,
                        false,
                        1,
                    );
                    // dS = P ∘ (dP − Σ dP ∘ P), row by row.
                    for i in 0..rows {
                        let at = (row0 + i) * t;
                        let (p, d) = (&p_h[at..][..keys], &mut ds[at..][..keys]);
                        let dot: f32 = p.iter().zip(d.iter()).map(|(p, d)| p * d).sum();
                        d.iter_mut().zip(p).for_each(|(d, p)| *d = p * (*d - dot));
                    }
                    // dV += Pᵀ · dO
                    gemm(
                        MatMut::new(&mut dv, 0, hd),
                        strided(p_h).t(),
                        d_o.rows(row0, rows),
                        1.0,
                        true,
                        1,
                    );
                    // dK' += dSᵀ · (scale · q')
                    gemm(
                        MatMut::new(&mut dk, 0, hd),
                        strided(&ds).t(),
                        MatRef::row_major(qs, l, hd).rows(row0, rows),
                        1.0,
                        true,
                        1,
                    );
                    // dQ' = scale · dS · k'
                    gemm(
                        MatMut::new(&mut dq, (j * l + row0) * hd, hd),
                        strided(&ds),
                        kr.rows(0, keys),
                        s.scale,
                        false,
                        1,
                    );
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; s.batch * l * qw];
    let mut dk = vec![0f32; s.batch * t * kvw];
    let mut dv = vec![0f32; s.batch * t * kvw];
    for (task, (dq_g, dk_g, dv_g)) in pieces.iter().enumerate() {
        let (b, g) = (task / s.kv_heads, task % s.kv_heads);
        let (cos, sin) = (&rope.cos[b * t * half..], &rope.sin[b * t * half..]);
        for (j, head) in dq_g.chunks_exact(l * hd).enumerate() {
            let h = g * groups + j;
            let dst = &mut dq[b * l * qw + h * hd..];
            rope_rows_backward(head, hd, &cos[past * half..], &sin[past * half..], dst, qw);
        }
        rope_rows_backward(dk_g, hd, cos, sin, &mut dk[b * t * kvw + g * hd..], kvw);
        for (i, src) in dv_g.chunks_exact(hd).enumerate() {
            dv[(b * t + i) * kvw + g * hd..][..hd].copy_from_slice(src);
        }
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::test_values;

    /// The forward in f64 from the definition, head by head.
    fn reference(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        cos: &[f64],
        sin: &[f64],
        mask: Option<&[f32]>,
        s: Shape,
    ) -> Vec<f64> {
        let Shape {
            batch,
            q_rows: l,
            kv_rows: t,
            heads,
            head_dim: hd,
            ..
        } = s;
        let (qw, kvw, half) = (s.q_width(), s.kv_width(), hd / 2);
        let rope = |x: &[f64], pos: usize, b: usize| -> Vec<f64> {
            let at = (b * t + pos) * half;
            (0..hd)
                .map(|i| {
                    let (c, sn) = (cos[at + i % half], sin[at + i % half]);
                    if i < half {
                        x[i] * c - x[i + half] * sn
                    } else {
                        x[i] * c + x[i - half] * sn
                    }
                })
                .collect()
        };
        let mut out = vec![0f64; batch * l * qw];
        for b in 0..batch {
            for h in 0..heads {
                let g = h / s.groups();
                for i in 0..l {
                    let qi = rope(&q[(b * l + i) * qw + h * hd..][..hd], t - l + i, b);
                    let scores: Vec<f64> = (0..t)
                        .map(|j| {
                            let kj = rope(&k[(b * t + j) * kvw + g * hd..][..hd], j, b);
                            let dot: f64 = qi.iter().zip(&kj).map(|(a, b)| a * b).sum();
                            dot * s.scale as f64
                                + mask.map_or(0.0, |m| m[(b * l + i) * t + j] as f64)
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for (j, e) in e.iter().enumerate() {
                        for d in 0..hd {
                            out[(b * l + i) * qw + h * hd + d] +=
                                e / sum * v[(b * t + j) * kvw + g * hd + d];
                        }
                    }
                }
            }
        }
        out
    }

    /// Causal over `t` keys for the last `l` queries, padding keys hidden (a padding query still
    /// sees itself), as the decoder's mask.
    fn decoder_mask(batch: usize, l: usize, t: usize, padded: &[Vec<usize>]) -> Vec<f32> {
        let mut mask = vec![0f32; batch * l * t];
        for b in 0..batch {
            for i in 0..l {
                let qpos = t - l + i;
                for j in 0..t {
                    if j != qpos && (j > qpos || padded[b].contains(&j)) {
                        mask[(b * l + i) * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        mask
    }

    struct Case {
        s: Shape,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        cos: Vec<f32>,
        sin: Vec<f32>,
        mask: Option<Vec<f32>>,
    }

    fn case(
        batch: usize,
        l: usize,
        t: usize,
        heads: usize,
        kv_heads: usize,
        hd: usize,
        masked: bool,
    ) -> Case {
        let s = Shape {
            batch,
            q_rows: l,
            kv_rows: t,
            heads,
            kv_heads,
            head_dim: hd,
            scale: (hd as f32).powf(-0.5),
        };
        let angles: Vec<f32> = (0..batch * t * hd / 2)
            .map(|i| {
                let (pos, f) = ((i / (hd / 2)) % t, i % (hd / 2));
                pos as f32 * 10f32.powf(-(f as f32) / (hd / 2) as f32)
            })
            .collect();
        // Row 0 pads its first two positions, row 1 (if any) one in the middle.
        let padded: Vec<Vec<usize>> = (0..batch)
            .map(|b| if b == 0 { vec![0, 1] } else { vec![t / 2] })
            .collect();
        Case {
            s,
            q: test_values(batch * l * heads * hd, 1)
                .iter()
                .map(|x| 2.0 * x)
                .collect(),
            k: test_values(batch * t * kv_heads * hd, 2)
                .iter()
                .map(|x| 2.0 * x)
                .collect(),
            v: test_values(batch * t * kv_heads * hd, 3),
            cos: angles.iter().map(|a| a.cos()).collect(),
            sin: angles.iter().map(|a| a.sin()).collect(),
            mask: masked.then(|| decoder_mask(batch, l, t, &padded)),
        }
    }

    fn wide(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&x| x as f64).collect()
    }

    fn max_diff(a: &[f32], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(&a, b)| (a as f64 - b).abs())
            .fold(0.0, f64::max)
    }

    fn kernels() -> Vec<Option<Kernel>> {
        [Some(Kernel::Avx512), Some(Kernel::Portable), None]
            .into_iter()
            .filter(|k| k.is_none_or(Kernel::available))
            .collect()
    }

    /// Forward against the f64 definition, and each gradient against central differences of
    /// it (the loss `Σ out ∘ w`), at grouped and ungrouped heads, padded rows, a query tail and
    /// rows that are not a multiple of the block.
    #[test]
    fn forward_and_gradients_match_the_definition() {
        let cases = [
            case(2, 5, 7, 4, 2, 8, true),
            case(1, 6, 6, 3, 3, 4, false),
            case(2, 3, 9, 4, 1, 6, true),
        ];
        for c in &cases {
            let s = c.s;
            let rope = Rope {
                cos: &c.cos,
                sin: &c.sin,
            };
            let mask = c.mask.as_deref();
            let (cos, sin) = (wide(&c.cos), wide(&c.sin));
            let (q, k, v) = (wide(&c.q), wide(&c.k), wide(&c.v));
            let w = test_values(c.q.len(), 4);
            let want = reference(&q, &k, &v, &cos, &sin, mask, s);
            for kernel in kernels() {
                let (out, probs) = forward(&c.q, &c.k, &c.v, rope, mask, s, kernel, true);
                assert!(max_diff(&out, &want) < 1e-5, "{s:?} {kernel:?}");
                let (dq, dk, dv) = backward(
                    &c.q,
                    &c.k,
                    &c.v,
                    rope,
                    mask,
                    probs.as_deref(),
                    &w,
                    s,
                    kernel,
                );
                // Recomputing the probabilities gives the same bits as keeping them.
                let (out2, none) = forward(&c.q, &c.k, &c.v, rope, mask, s, kernel, false);
                assert!(none.is_none() && out2 == out);
                let again = backward(&c.q, &c.k, &c.v, rope, mask, None, &w, s, kernel);
                assert!(again == (dq.clone(), dk.clone(), dv.clone()));
                let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                    reference(q, k, v, &cos, &sin, mask, s)
                        .iter()
                        .zip(&w)
                        .map(|(o, &w)| o * w as f64)
                        .sum()
                };
                let eps = 1e-6;
                for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
                    let base = [&q, &k, &v][which];
                    let numeric: Vec<f64> = (0..base.len())
                        .map(|i| {
                            let mut inputs = [q.clone(), k.clone(), v.clone()];
                            inputs[which][i] += eps;
                            let up = loss(&inputs[0], &inputs[1], &inputs[2]);
                            inputs[which][i] -= 2.0 * eps;
                            let down = loss(&inputs[0], &inputs[1], &inputs[2]);
                            (up - down) / (2.0 * eps)
                        })
                        .collect();
                    let err = max_diff(grad, &numeric);
                    assert!(err < 1e-4, "{s:?} {kernel:?} input {which}: {err}");
                }
            }
        }
    }

    /// Rows past one block, causal blocks reading fewer keys, and the packed and `gemm` paths
    /// agreeing with the definition on both.
    #[test]
    fn blocks_past_the_first_match_the_definition() {
        let c = case(1, 70, 75, 4, 2, 16, true);
        let s = c.s;
        let rope = Rope {
            cos: &c.cos,
            sin: &c.sin,
        };
        let want = reference(
            &wide(&c.q),
            &wide(&c.k),
            &wide(&c.v),
            &wide(&c.cos),
            &wide(&c.sin),
            c.mask.as_deref(),
            s,
        );
        let w = test_values(c.q.len(), 5);
        let (cos, sin) = (wide(&c.cos), wide(&c.sin));
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let out = reference(q, k, v, &cos, &sin, c.mask.as_deref(), s);
            out.iter().zip(&w).map(|(o, &w)| o * w as f64).sum()
        };
        let inputs = [wide(&c.q), wide(&c.k), wide(&c.v)];
        for kernel in kernels() {
            let mask = c.mask.as_deref();
            let (out, probs) = forward(&c.q, &c.k, &c.v, rope, mask, s, kernel, true);
            assert!(max_diff(&out, &want) < 1e-5, "{kernel:?}");
            let (dq, dk, dv) = backward(
                &c.q,
                &c.k,
                &c.v,
                rope,
                mask,
                probs.as_deref(),
                &w,
                s,
                kernel,
            );
            let again = backward(&c.q, &c.k, &c.v, rope, mask, None, &w, s, kernel);
            assert!(again == (dq.clone(), dk.clone(), dv.clone()));
            // Too many inputs for a difference per element: the derivative along a few
            // directions instead.
            for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
                for seed in 0..2 {
                    let dir = wide(&test_values(grad.len(), 10 + seed));
                    let along: f64 = grad.iter().zip(&dir).map(|(&g, d)| g as f64 * d).sum();
                    let eps = 1e-6;
                    let shifted = |sign: f64| {
                        let mut x = inputs.clone();
                        x[which]
                            .iter_mut()
                            .zip(&dir)
                            .for_each(|(x, d)| *x += sign * eps * d);
                        loss(&x[0], &x[1], &x[2])
                    };
                    let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps);
                    let err = (along - numeric).abs();
                    assert!(
                        err < 1e-3 * numeric.abs().max(1.0),
                        "{kernel:?} input {which}: {along} vs {numeric}"
                    );
                }
            }
        }
    }
}
