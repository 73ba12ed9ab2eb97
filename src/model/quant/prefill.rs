//! Q8_0 products on CPUs without AVX-512 VNNI: over many rows (prefill, the vision tower) each
//! panel of weight rows is dequantized to f32 and multiplied by the `gemm` crate's f32 kernel
//! ([`grouped_dequantized_matmul`]); fewer rows (decode) go through our integer kernel
//! ([`int8_matmul`]). With AVX-512 VNNI, `kernels::q8_vnni` takes every row count instead
//! (`vpdpbusd` does 4 multiply-adds a lane in one instruction, so there the integer product
//! beats the f32 GEMM this path feeds); these two stay reachable there through
//! `VLMPIPE_QUANT_PRODUCT=int8|panels`, to compare.
//!
//! Why not candle's `QMatMul` there: on the CPU it quantizes the activations and runs one block
//! dot product per (row, output) pair without tiling, which measured 4-5x slower than the f32
//! GEMM at the LFM2-VL-450M prefill and vision shapes (BENCHMARKS.md, "Quantized models").
//! Why not the integer kernel there too: on AVX2 (no VNNI) its block dot needs
//! `sign`+`maddubs`+`madd`+`cvt` and a scaled FMA per 32 products, about the f32 GEMM's issue
//! rate per multiply-add, and it measured no faster than the panels at those shapes
//! ([`PANEL_MIN_ROWS`]); dequantizing a 64-row panel costs about 1/m of the panel's product.
//!
//! The panels give the exact f32 product with the dequantized weight (what `QMatMul`
//! approximates with 8-bit activations); the integer kernel gives `QMatMul`'s values.

use rayon::prelude::*;

use crate::model::kernels::cpu::{MatMut, MatRef, gemm};
use crate::model::kernels::q8;

/// Which CPU product multiplies activations by Q8_0 blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// Activations quantized to Q8_0, integer block dots ([`int8_matmul`]): `QMatMul`'s values.
    Int8,
    /// Weight panels dequantized into the f32 GEMM ([`grouped_dequantized_matmul`]).
    Panels,
}

/// From this many activation rows on, a CPU product by Q8_0 blocks dequantizes panels instead
/// of running the integer kernel. On 2 loaded AVX2 cores (BENCHMARKS.md, "Quantized models")
/// the integer kernel ran the vision tower (768 rows) 1.60x the f32 time against the panels'
/// 1.31x, and the 178-row LM prefill 1.11x against 1.29x (within that load's noise); decode
/// (one row) is where it wins, so the crossover found before (64 rows) stays.
pub(crate) const PANEL_MIN_ROWS: usize = 64;

/// The path for a product of `rows` activation rows by Q8_0 blocks.
pub(crate) fn choose_path(rows: usize) -> Path {
    if rows >= PANEL_MIN_ROWS {
        Path::Panels
    } else {
        Path::Int8
    }
}

/// `x [m, k] @ W^T` for Q8_0 weight rows `w` ([`q8::Grouped`]), the activation rows quantized
/// to Q8_0 first: what `QMatMul` computes, bit for bit, by [`q8::matmul`]. `None` when `x` is
/// not `m` rows of `w`'s width.
pub(crate) fn int8_matmul(w: &q8::Grouped, x: &[f32], m: usize) -> Option<Vec<f32>> {
    let k = w.kb() * q8::QK8_0;
    if x.len() != m * k {
        return None;
    }
    let a = q8::quantize_rows(x, k);
    Some(q8::matmul(w, &a, m))
}

/// Weight rows dequantized and multiplied together: 64 rows of 4608 f32 are 1.2 MB, one core's
/// share of L3, and the `gemm` crate's packing of `x` is amortised over 64 outputs.
const PANEL_ROWS: usize = 64;

/// `x [m, k] @ W^T` for Q8_0 weight rows `W [n, k]` ([`q8::Grouped`]), a 64-row panel of `W`
/// dequantized to f32 at a time: a new `[m, n]` buffer, or `None` when `x` is not `m` rows
/// of `W`'s width.
pub(crate) fn grouped_dequantized_matmul(w: &q8::Grouped, x: &[f32], m: usize) -> Option<Vec<f32>> {
    let (k, n) = (w.kb() * q8::QK8_0, w.n());
    panel_matmul(x, m, k, n, |rows, out| {
        w.dequantize_rows(rows, out);
        true
    })
}

/// `x [m, k] @ W^T`, `W [n, k]`'s rows dequantized by `dequantize(rows, out)` a panel at a time
/// (`false`: these rows cannot be read, so neither can the product). A closure, so that another
/// block layout can take this path the day one measures faster here than `QMatMul` (k-quants
/// do not yet: `tests::crossover`).
fn panel_matmul(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    dequantize: impl Fn(std::ops::Range<usize>, &mut [f32]) -> bool + Sync,
) -> Option<Vec<f32>> {
    if x.len() != m * k || m == 0 {
        return None;
    }
    let panels: Vec<(usize, usize)> = (0..n)
        .step_by(PANEL_ROWS)
        .map(|start| (start, PANEL_ROWS.min(n - start)))
        .collect();
    let lhs = MatRef::row_major(x, m, k);
    let products: Vec<Option<Vec<f32>>> = panels
        .par_iter()
        .map(|&(start, rows)| {
            let mut w = vec![0f32; rows * k];
            if !dequantize(start..start + rows, &mut w) {
                return None;
            }
            let mut y = vec![0f32; m * rows];
            let rhs = MatRef::row_major(&w, rows, k).t();
            // One thread a panel: rayon already spreads the panels over the cores.
            gemm(MatMut::new(&mut y, 0, rows), lhs, rhs, 1.0, false, 1);
            Some(y)
        })
        .collect();
    let mut out = vec![0f32; m * n];
    for (&(start, rows), y) in panels.iter().zip(products) {
        let y = y?;
        for (dst, src) in out.chunks_exact_mut(n).zip(y.chunks_exact(rows)) {
            dst[start..start + rows].copy_from_slice(src);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{BlockQ4K, GgmlType};
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn weight(n: usize, k: usize, dtype: GgmlDType) -> QTensor {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, dtype).unwrap()
    }

    /// The panel product equals `x @ dequantize(W)^T` within f32 rounding, for widths that are
    /// not whole panels or groups.
    #[test]
    fn equals_the_product_with_the_dequantized_weight() {
        for (m, n, k) in [(9, 200, 96), (70, 77, 96), (1, 3, 32), (65, 64, 256)] {
            let q = weight(n, k, GgmlDType::Q8_0);
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let want = x
                .matmul(&q.dequantize(&Device::Cpu).unwrap().t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bytes = q.data().unwrap();
            let grouped = q8::Grouped::from_blocks(q8::view_blocks(&bytes).unwrap(), n, k / 32);
            let got = grouped_dequantized_matmul(&grouped, &xs, m).expect("rows of its width");
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "[{}, {}]: {g} vs {w}",
                    i / n,
                    i % n
                );
            }
            assert!(grouped_dequantized_matmul(&grouped, &xs[1..], m).is_none());
        }
    }

    /// The integer kernel computes exactly ggml's values, candle's Q8_0 block dot over the
    /// activation quantized to Q8_0 blocks, for one row (decode) and for row and column counts
    /// that are not whole tiles. (`QMatMul` itself is no reference on an AVX-512 VNNI CPU: there
    /// candle 0.11 repacks larger Q8_0 weights and quantizes activations to Q8_K blocks instead.)
    #[test]
    fn int8_product_equals_the_block_dot_bitwise() {
        use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
        for (m, n, k) in [
            (1, 1024, 1024),
            (1, 70, 96),
            (3, 33, 64),
            (7, 130, 256),
            (66, 45, 160),
        ] {
            let q = weight(n, k, GgmlDType::Q8_0);
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bytes = q.data().unwrap();
            let blocks = q8::view_blocks(&bytes).unwrap().to_vec();
            // candle's own blocks, for its block dot.
            let mut theirs = vec![BlockQ8_0::zeros(); n * k / 32];
            assert_eq!(bytes.len(), theirs.len() * std::mem::size_of::<BlockQ8_0>());
            // SAFETY: candle's `BlockQ8_0` is `repr(C)`, 34 bytes (an f16 and 32 i8, no
            // padding), so ggml's bytes are valid values of it; the lengths are equal.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    theirs.as_mut_ptr().cast::<u8>(),
                    bytes.len(),
                )
            };
            let want: Vec<f32> = xs
                .chunks_exact(k)
                .flat_map(|row| {
                    let mut xq = vec![BlockQ8_0::zeros(); k / 32];
                    BlockQ8_0::from_float(row, &mut xq);
                    let theirs = &theirs;
                    (0..n)
                        .map(move |j| BlockQ8_0::vec_dot(k, &theirs[j * (k / 32)..][..k / 32], &xq))
                })
                .collect();
            let grouped = q8::Grouped::from_blocks(&blocks, n, k / 32);
            let got = int8_matmul(&grouped, &xs, m).expect("rows of the weight's width");
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(g, w)| g.to_bits() != w.to_bits())
                .count();
            assert_eq!(
                differ, 0,
                "[{m}, {k}] x [{n}, {k}]: {differ} outputs differ"
            );
        }
        let one = q8::Grouped::from_blocks(&q8::quantize_rows(&[1.0; 32], 32), 1, 1);
        assert!(int8_matmul(&one, &[0.0; 64], 1).is_none());
    }

    /// Where the panel path starts paying off against `QMatMul`: prints both per row count at a
    /// 450M FFN shape (a measurement, run with `--ignored --nocapture` in the test profile).
    #[test]
    #[ignore = "measurement"]
    fn crossover() {
        let (n, k) = (4608, 1024);
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            let q = weight(n, k, dtype);
            let bytes = q.data().unwrap().into_owned();
            let grouped = (dtype == GgmlDType::Q8_0).then(|| {
                let blocks = q8::view_blocks(&bytes).unwrap();
                q8::Grouped::from_blocks(blocks, n, k / 32)
            });
            let mm = QMatMul::from_qtensor(q).unwrap();
            for m in [1, 2, 4, 8, 16, 32, 64, 270] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let reps = (64 / m).max(2);
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(mm.forward(&x).unwrap());
                }
                let candle = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(match &grouped {
                        Some(g) => grouped_dequantized_matmul(g, &xs, m),
                        None => panel_matmul(&xs, m, k, n, |rows, out| {
                            // SAFETY: candle stores Q4_K as `Vec<BlockQ4K>` (a test-only view).
                            let blocks: &[BlockQ4K] = unsafe {
                                std::slice::from_raw_parts(bytes.as_ptr().cast(), n * k / 256)
                            };
                            BlockQ4K::to_float(
                                &blocks[rows.start * k / 256..rows.end * k / 256],
                                out,
                            );
                            true
                        }),
                    });
                }
                let ours = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
                let int8_ms = if let Some(grouped) = &grouped {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        std::hint::black_box(int8_matmul(grouped, &xs, m));
                    }
                    t.elapsed().as_secs_f64() * 1e3 / reps as f64
                } else {
                    // Q4_K: the regrouped kernel (`kernels::q4k`), activations quantized in.
                    let g = crate::model::kernels::q4k::Grouped::from_ggml(&bytes, n, k / 256);
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        let a = crate::model::kernels::q4k::quantize_rows(&xs, k);
                        std::hint::black_box(crate::model::kernels::q4k::matmul(&g, &a, m));
                    }
                    t.elapsed().as_secs_f64() * 1e3 / reps as f64
                };
                let t = std::time::Instant::now();
                let w = vec![0.5f32; n * k];
                for _ in 0..reps {
                    std::hint::black_box(crate::model::kernels::cpu::linear(
                        &xs, m, k, &w, n, None,
                    ));
                }
                let f32_ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
                eprintln!(
                    "{dtype:?} m={m}: QMatMul {candle:.2} ms, int8 (Q4_K: q4k) {int8_ms:.2} ms, dequantized \
                     panels {ours:.2} ms, f32 gemm {f32_ms:.2} ms"
                );
            }
        }
    }
}
