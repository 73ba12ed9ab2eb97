//! Quantized products over many rows (prefill, the vision tower) on the CPU: each panel of
//! weight rows is dequantized to f32 and multiplied by the `gemm` crate's f32 kernel.
//!
//! Why not candle's `QMatMul` there: on the CPU it quantizes the activations and runs one block
//! dot product per (row, output) pair without tiling, which measured 4-5x slower than the f32
//! GEMM at the LFM2-VL-450M prefill and vision shapes (BENCHMARKS.md, "Quantized models").
//! Why not an int8 GEMM of our own: on AVX2 (no VNNI) the int8 block dot needs
//! `sign`+`maddubs`+`madd` per 32 products and a float scale per block, the same issue rate
//! as f32 FMA per multiply-add, so its ceiling is the f32 GEMM's speed while its activations
//! lose precision; dequantizing a 64-row panel costs about 1/m of the panel's product, under 1% at
//! prefill's m of 270 and more. A one-row product (a decode step) stays on `QMatMul`, which
//! reads the weights once in their small form; [`prefer_panels`] holds the measured crossover.
//!
//! The result is the exact f32 product with the dequantized weight (what `QMatMul` approximates
//! with 8-bit activations).

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{
    BlockQ4_0, BlockQ4K, BlockQ5_0, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType,
};
use rayon::prelude::*;

use crate::model::kernels::cpu::{MatMut, MatRef, gemm};

/// From this many activation rows on, a CPU product by Q8_0 blocks dequantizes panels instead
/// of using `QMatMul`. Measured at the 4608x1024 FFN shape on 2 shared AVX2 cores
/// (`prefill::tests::crossover`): at 32 rows `QMatMul` 78 ms against 116, at 64 rows 148
/// against 114, at 270 rows 650 against 289 (the f32 GEMM 248).
pub(crate) const PREFILL_MIN_ROWS: usize = 64;

/// Whether a product of `rows` activation rows by `dtype` blocks takes the panel path. Only
/// Q8_0: candle's Q4_K product already ran as fast as the panels at 270 rows (265 ms against
/// 274), and the other types (the Q6_K head, fallbacks) multiply one row at a time.
pub(crate) fn prefer_panels(dtype: GgmlDType, rows: usize) -> bool {
    dtype == GgmlDType::Q8_0 && rows >= PREFILL_MIN_ROWS
}

/// Weight rows dequantized and multiplied together: 64 rows of 4608 f32 are 1.2 MB, one core's
/// share of L3, and the `gemm` crate's packing of `x` is amortised over 64 outputs.
const PANEL_ROWS: usize = 64;

/// Whether [`dequantized_matmul`] takes blocks of this type.
pub(crate) fn supported(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q8_0
            | GgmlDType::Q4_0
            | GgmlDType::Q5_0
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
    )
}

/// Rows `rows` of a `[_, k]` matrix of `T` blocks (`bytes`, as candle stores them) into `out`.
fn dequantize_rows_as<T: GgmlType>(
    bytes: &[u8],
    k: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) -> bool {
    let size = std::mem::size_of::<T>();
    if !bytes
        .as_ptr()
        .align_offset(std::mem::align_of::<T>())
        .eq(&0)
        || !bytes.len().is_multiple_of(size)
        || !k.is_multiple_of(T::BLCK_SIZE)
    {
        return false;
    }
    // SAFETY: candle's CPU storage of a `T` tensor is a `Vec<T>` viewed as bytes (alignment and
    // length checked above); `T` is a `repr(C)` block of plain numbers, valid for any bits.
    let blocks =
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) };
    let per_row = k / T::BLCK_SIZE;
    let Some(panel) = blocks.get(rows.start * per_row..rows.end * per_row) else {
        return false;
    };
    T::to_float(panel, out);
    true
}

fn dequantize_rows(
    dtype: GgmlDType,
    bytes: &[u8],
    k: usize,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) -> bool {
    match dtype {
        GgmlDType::Q8_0 => dequantize_rows_as::<BlockQ8_0>(bytes, k, rows, out),
        GgmlDType::Q4_0 => dequantize_rows_as::<BlockQ4_0>(bytes, k, rows, out),
        GgmlDType::Q5_0 => dequantize_rows_as::<BlockQ5_0>(bytes, k, rows, out),
        GgmlDType::Q4K => dequantize_rows_as::<BlockQ4K>(bytes, k, rows, out),
        GgmlDType::Q5K => dequantize_rows_as::<BlockQ5K>(bytes, k, rows, out),
        GgmlDType::Q6K => dequantize_rows_as::<BlockQ6K>(bytes, k, rows, out),
        _ => false,
    }
}

/// `x [m, k] @ W^T` for `W [n, k]` held as `dtype` blocks (`bytes`): a new `[m, n]` buffer, or
/// `None` when these blocks cannot be read here (the caller then uses `QMatMul`).
pub(crate) fn dequantized_matmul(
    dtype: GgmlDType,
    bytes: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    if !supported(dtype) || x.len() != m * k || m == 0 {
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
            if !dequantize_rows(dtype, bytes, k, start..start + rows, &mut w) {
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
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn weight(n: usize, k: usize, dtype: GgmlDType) -> QTensor {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, dtype).unwrap()
    }

    /// The panel product equals `x @ dequantize(W)^T` within f32 rounding, for every block type
    /// it takes and for widths that are not whole panels.
    #[test]
    fn equals_the_product_with_the_dequantized_weight() {
        for (dtype, n, k) in [
            (GgmlDType::Q8_0, 200, 96),
            (GgmlDType::Q4K, 130, 512),
            (GgmlDType::Q6K, 64, 256),
            (GgmlDType::Q5_0, 70, 64),
            (GgmlDType::Q4_0, 3, 32),
            (GgmlDType::Q5K, 65, 256),
        ] {
            let q = weight(n, k, dtype);
            let m = 9;
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let want = x
                .matmul(&q.dequantize(&Device::Cpu).unwrap().t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = dequantized_matmul(dtype, &q.data().unwrap(), &xs, m, k, n)
                .unwrap_or_else(|| panic!("{dtype:?} not taken"));
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{dtype:?} [{}, {}]: {g} vs {w}",
                    i / n,
                    i % n
                );
            }
        }
        assert!(dequantized_matmul(GgmlDType::Q2K, &[], &[0.0; 4], 1, 4, 1).is_none());
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
                    std::hint::black_box(dequantized_matmul(dtype, &bytes, &xs, m, k, n));
                }
                let ours = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
                let t = std::time::Instant::now();
                let w = vec![0.5f32; n * k];
                for _ in 0..reps {
                    std::hint::black_box(crate::model::kernels::cpu::linear(
                        &xs, m, k, &w, n, None,
                    ));
                }
                let f32_ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
                eprintln!(
                    "{dtype:?} m={m}: QMatMul {candle:.2} ms, dequantized panels {ours:.2} ms, f32 \
                     gemm {f32_ms:.2} ms"
                );
            }
        }
    }
}
