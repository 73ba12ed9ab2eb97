//! A few activation rows (a decode step) by k-quant blocks on the CPU: each row quantized once
//! to the blocks' dot-product partner (Q8_K), then candle's own block dot
//! (`GgmlType::vec_dot`, its AVX2/NEON kernels) per output, parallel over outputs with rayon.
//!
//! Why not `QMatMul` there: on x86 candle 0.11 multiplies Q4_K through tiles it repacks at the
//! first product (f32 scales and mins beside the nibbles, a third more bytes than the Q4_K
//! blocks, held beside them), so a decode step reads more than the weights' floor; its Q6_K
//! product runs on its own thread pool, which spins beside rayon's threads on a 2-core machine.
//! Here every step reads the compact blocks once (measured in BENCHMARKS.md, "Quantized
//! models"). Q8_0 goes through [`crate::model::kernels::q8`] instead.

use candle_core::quantized::GgmlDType;
use candle_core::quantized::k_quants::{BlockQ4K, BlockQ5K, BlockQ6K, GgmlType};
use rayon::prelude::*;

/// At most this many activation rows take this path (one decode step has one).
pub(crate) const MAX_ROWS: usize = 4;

/// Whether [`matvec`] takes blocks of this type.
pub(crate) fn supported(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K)
}

/// `x [m, k] @ W^T` for `W [n, k]` held as `dtype` blocks (`bytes`, as candle stores them):
/// a new `[m, n]` buffer, or `None` when these blocks cannot be read here (the caller then
/// uses `QMatMul`).
pub(crate) fn matvec(
    dtype: GgmlDType,
    bytes: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    match dtype {
        GgmlDType::Q4K => matvec_as::<BlockQ4K>(bytes, x, m, k, n),
        GgmlDType::Q5K => matvec_as::<BlockQ5K>(bytes, x, m, k, n),
        GgmlDType::Q6K => matvec_as::<BlockQ6K>(bytes, x, m, k, n),
        _ => None,
    }
}

/// Outputs a rayon task computes: enough to amortise a task, small enough to share a 1024-row
/// projection between two cores.
const OUTPUTS_PER_TASK: usize = 64;

fn matvec_as<T: GgmlType>(
    bytes: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    let size = std::mem::size_of::<T>();
    if m == 0
        || x.len() != m * k
        || !k.is_multiple_of(T::BLCK_SIZE)
        || T::BLCK_SIZE != T::VecDotType::BLCK_SIZE
        || bytes.len() != n * (k / T::BLCK_SIZE) * size
        || bytes.as_ptr().align_offset(std::mem::align_of::<T>()) != 0
    {
        return None;
    }
    // SAFETY: candle's CPU storage of a `T` tensor is a `Vec<T>` viewed as bytes (alignment and
    // length checked above); `T` is a `repr(C)` block of plain numbers, valid for any bits.
    let w = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) };
    let kb = k / T::BLCK_SIZE;
    let mut a = vec![T::VecDotType::zeros(); m * kb];
    for (row, blocks) in x.chunks_exact(k).zip(a.chunks_exact_mut(kb)) {
        T::VecDotType::from_float(row, blocks);
    }
    let mut out = vec![0f32; m * n];
    for (a, y) in a.chunks_exact(kb).zip(out.chunks_exact_mut(n)) {
        y.par_chunks_mut(OUTPUTS_PER_TASK)
            .zip(w.par_chunks(OUTPUTS_PER_TASK * kb))
            .for_each(|(y, w)| {
                for (y, w) in y.iter_mut().zip(w.chunks_exact(kb)) {
                    *y = T::vec_dot(k, w, a);
                }
            });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Each output is candle's block dot of the quantized row, bit for bit, and within the
    /// block rounding of `QMatMul` (whose x86 Q4_K tiles sum in another order).
    #[test]
    fn equals_candles_block_dot() {
        for (dtype, m, n, k) in [
            (GgmlDType::Q4K, 1, 130, 512),
            (GgmlDType::Q6K, 1, 65, 256),
            (GgmlDType::Q5K, 2, 64, 256),
            (GgmlDType::Q4K, 3, 1024, 1024),
        ] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = matvec(dtype, &q.data().unwrap(), &xs, m, k, n).expect("taken");
            let q = std::sync::Arc::new(q);
            let want = crate::model::quant::qmatmul_values(&q, &x);
            let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * scale, "{dtype:?}: {g} vs {w}");
            }
            // The first output again, through the block dot directly.
            let bytes = q.data().unwrap();
            let first = match dtype {
                GgmlDType::Q4K => dot_first::<BlockQ4K>(&bytes, &xs[..k], k),
                GgmlDType::Q5K => dot_first::<BlockQ5K>(&bytes, &xs[..k], k),
                _ => dot_first::<BlockQ6K>(&bytes, &xs[..k], k),
            };
            assert_eq!(got[0].to_bits(), first.to_bits(), "{dtype:?}");
        }
        assert!(matvec(GgmlDType::Q8_0, &[], &[0.0; 32], 1, 32, 0).is_none());
    }

    fn dot_first<T: GgmlType>(bytes: &[u8], x: &[f32], k: usize) -> f32 {
        let kb = k / T::BLCK_SIZE;
        // SAFETY: as in `matvec_as` (a test over candle's own storage).
        let w = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), kb) };
        let mut a = vec![T::VecDotType::zeros(); kb];
        T::VecDotType::from_float(x, &mut a);
        T::vec_dot(k, w, &a)
    }
}
