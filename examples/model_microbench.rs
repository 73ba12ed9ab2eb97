//! Scratch timings of candle CPU kernels at LFM2-VL-450M vision shapes.
use candle_core::{D, Device, Tensor};
use std::time::Instant;
fn time<F: FnMut() -> candle_core::Result<Tensor>>(
    name: &str,
    mut f: F,
) -> candle_core::Result<()> {
    f()?;
    let t = Instant::now();
    for _ in 0..5 {
        f()?;
    }
    println!("{name}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3 / 5.0);
    Ok(())
}
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1024, 768), &dev)?;
    let w = Tensor::randn(0f32, 1.0, (3072, 768), &dev)?;
    let wt = w.t()?.contiguous()?;
    if std::env::args().any(|a| a == "gemv") {
        let v1 = Tensor::randn(0f32, 1.0, (1, 1024), &dev)?;
        let wd = Tensor::randn(0f32, 1.0, (4608, 1024), &dev)?;
        let wdt = wd.t()?.contiguous()?;
        time("gemv 1x1024 @ 4608x1024.t", || v1.matmul(&wd.t()?))?;
        time("gemv 1x1024 @ [1024,4608] contiguous", || v1.matmul(&wdt))?;
        let x273 = Tensor::randn(0f32, 1.0, (273, 1024), &dev)?;
        time("prefill 273x1024 @ 4608x1024.t", || x273.matmul(&wd.t()?))?;
        time("prefill 273x1024 @ [1024,4608]", || x273.matmul(&wdt))?;
        return Ok(());
    }
    time("x @ w.t() (strided)", || x.matmul(&w.t()?))?;
    time("x @ wt (contiguous)", || x.matmul(&wt))?;
    let h = Tensor::randn(0f32, 1.0, (1024, 3072), &dev)?;
    time("gelu tanh 1024x3072", || h.gelu())?;
    time("gelu erf 1024x3072", || h.gelu_erf())?;
    let q = Tensor::randn(0f32, 1.0, (12, 1024, 64), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (12, 1024, 64), &dev)?;
    time("scores q@k.t", || q.matmul(&k.t()?))?;
    let s = q.matmul(&k.t()?)?;
    time("softmax", || candle_nn::ops::softmax_last_dim(&s))?;
    time("p@v", || s.matmul(&k))?;
    let lw = Tensor::ones(768, candle_core::DType::F32, &dev)?;
    let lb = Tensor::zeros(768, candle_core::DType::F32, &dev)?;
    time("layer_norm", || {
        candle_nn::ops::layer_norm(&x, &lw, &lb, 1e-6)
    })?;
    let v1 = Tensor::randn(0f32, 1.0, (1, 1024), &dev)?;
    let wd = Tensor::randn(0f32, 1.0, (4608, 1024), &dev)?;
    time("gemv 1x1024 @ 4608x1024.t", || v1.matmul(&wd.t()?))?;
    let emb = Tensor::randn(0f32, 1.0, (65536, 1024), &dev)?;
    time("lm head gemv", || v1.matmul(&emb.t()?))?;
    let wdt = wd.t()?.contiguous()?;
    time("gemv 1x1024 @ [1024,4608] contiguous", || v1.matmul(&wdt))?;
    let x273 = Tensor::randn(0f32, 1.0, (273, 1024), &dev)?;
    time("prefill 273x1024 @ 4608x1024.t", || x273.matmul(&wd.t()?))?;
    time("prefill 273x1024 @ [1024,4608]", || x273.matmul(&wdt))?;
    let _ = D::Minus1;
    Ok(())
}
