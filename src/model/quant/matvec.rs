//! A few activation rows (a decode step) by k-quant blocks on the CPU: each row quantized once
//! to the blocks' dot-product partner (Q8_K), then candle's own block dot
//! (`GgmlType::vec_dot`, its AVX2/NEON kernels) per output, parallel over outputs with rayon.
//!
//! Why not `QMatMul` there: on x86 candle 0.11 multiplies Q4_K through tiles it repacks at the
//! first product (f32 scales and mins beside the nibbles, a third more bytes than the Q4_K
//! blocks, held beside them), so a decode step reads more than the weights' floor; its Q6_K
//! product runs on its own thread pool, which spins beside rayon's threads on a 2-core machine.
//! Here every step reads the compact blocks once (measured in BENCHMARKS.md, "Quantized
//! models"). On the CPU, Q8_0 goes through [`crate::model::kernels::q8`] and Q4_K through
//! [`crate::model::kernels::q4k`] instead, so this path takes Q5_K and Q6_K (the `--quant q4_k`
//! LM head) where the CPU lacks AVX-512 VNNI (with it, Q6_K goes through
//! [`crate::model::kernels::q6k_vnni`]), and Q4_K only where a caller hands it candle's blocks.

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

    /// Random k-quant blocks of `n x k` (`block_bytes` each) with finite f16 scales at the
    /// given byte offsets, as candle's storage (aligned).
    fn random_blocks(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> QTensor {
        let block_bytes = dtype.type_size();
        let mut s = seed | 1;
        let mut bytes: Vec<u8> = (0..n * k / 256 * block_bytes)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        let scale_at: &[usize] = match dtype {
            GgmlDType::Q4K => &[0, 2],
            _ => &[block_bytes - 2],
        };
        let d = half::f16::from_f32(0.002).to_le_bytes();
        for block in bytes.chunks_exact_mut(block_bytes) {
            for &at in scale_at {
                block[at..at + 2].copy_from_slice(&d);
            }
        }
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &bytes,
            vec![n, k],
            &Device::Cpu,
        )
        .unwrap()
    }

    /// One decode step's products at the LFM2-VL-450M shapes with `--quant q4_k` (16 layers'
    /// Q4_K projections; the Q6_K LM head apart), through candle's block dot (`matvec`, the
    /// path before `kernels::q4k`) and through the regrouped kernel, taking turns with a
    /// 2-thread read of the same bytes (the floor). Prints best and mean of 12 rounds (a
    /// measurement: `--release -- --ignored --nocapture`).
    #[test]
    #[ignore = "measurement"]
    fn decode_step_products_against_the_read_floor() {
        use crate::model::kernels::q4k;
        let (h, ff, kv) = (1024, 4608, 512);
        let mut shapes = Vec::new();
        for layer in 0..16 {
            if [2, 5, 8, 10, 12, 14].contains(&layer) {
                shapes.extend([(h, h), (kv, h), (kv, h), (h, h)]);
            } else {
                shapes.extend([(3 * h, h), (h, h)]);
            }
            shapes.extend([(ff, h), (ff, h), (h, ff)]);
        }
        let weights: Vec<_> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(n, k))| random_blocks(GgmlDType::Q4K, n, k, 7 + i as u64))
            .collect();
        let grouped: Vec<_> = weights
            .iter()
            .zip(&shapes)
            .map(|(q, &(n, k))| q4k::Grouped::from_ggml(&q.data().unwrap(), n, k / 256))
            .collect();
        let head = random_blocks(GgmlDType::Q6K, 65536, h, 3);
        let xs: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(_, k))| {
                (0..k)
                    .map(|j| ((i * 31 + j * 17) % 97) as f32 / 48.0 - 1.0)
                    .collect()
            })
            .collect();
        let q4k_bytes: usize = weights.iter().map(|q| q.storage_size_in_bytes()).sum();
        let head_bytes = head.storage_size_in_bytes();
        let read = |data: &[u8]| {
            data.par_chunks(1 << 16)
                .map(|c| {
                    c.chunks_exact(8).fold(0u64, |a, w| {
                        a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap()))
                    })
                })
                .reduce(|| 0, u64::wrapping_add)
        };
        // A named timing and what it runs.
        type Variant<'a> = (&'a str, Box<dyn Fn() + Sync + 'a>);
        let variants: [Variant; 6] = [
            (
                "Q4_K floor (2-thread read of candle's blocks)",
                Box::new(|| {
                    for q in &weights {
                        std::hint::black_box(read(&q.data().unwrap()));
                    }
                }),
            ),
            (
                "Q4_K floor (2-thread read of the regrouped blocks)",
                Box::new(|| {
                    for g in &grouped {
                        std::hint::black_box(read(g.bytes()));
                    }
                }),
            ),
            (
                "Q4_K candle block dot (before)",
                Box::new(|| {
                    for ((q, x), &(n, k)) in weights.iter().zip(&xs).zip(&shapes) {
                        std::hint::black_box(matvec(
                            GgmlDType::Q4K,
                            &q.data().unwrap(),
                            x,
                            1,
                            k,
                            n,
                        ));
                    }
                }),
            ),
            (
                "Q4_K regrouped kernel",
                Box::new(|| {
                    for (g, x) in grouped.iter().zip(&xs) {
                        let a = q4k::quantize_rows(x, x.len());
                        std::hint::black_box(q4k::matmul(g, &a, 1));
                    }
                }),
            ),
            (
                "Q6_K head floor (2-thread read of candle's blocks)",
                Box::new(|| {
                    std::hint::black_box(read(&head.data().unwrap()));
                }),
            ),
            (
                "Q6_K head candle block dot",
                Box::new(|| {
                    let x = &xs[0];
                    std::hint::black_box(matvec(
                        GgmlDType::Q6K,
                        &head.data().unwrap(),
                        x,
                        1,
                        h,
                        65536,
                    ));
                }),
            ),
        ];
        let mut times = vec![Vec::new(); variants.len()];
        crate::model::ops::on_compute_threads(|| {
            for _ in 0..12 {
                for ((_, run), times) in variants.iter().zip(&mut times) {
                    let t = std::time::Instant::now();
                    run();
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        });
        eprintln!(
            "Q4_K bytes {:.1} MiB, Q6_K head {:.1} MiB",
            q4k_bytes as f64 / (1 << 20) as f64,
            head_bytes as f64 / (1 << 20) as f64
        );
        for ((name, _), t) in variants.iter().zip(&times) {
            let best = t.iter().copied().fold(f64::MAX, f64::min);
            let mean = t.iter().sum::<f64>() / t.len() as f64;
            eprintln!("{name}: best {best:.2} ms, mean {mean:.2} ms");
        }
    }
}
