//! Linear weights stored pre-packed for the CPU f32 product, and the product itself.
//!
//! Every forward of a `Linear` multiplies activations `x [m, k]` by a frozen weight `w [n, k]`.
//! A general GEMM (the `gemm` crate) repacks `w` into its kernel's panel layout on every call: at
//! the prefill shapes of LFM2-VL-450M that packing was a fifth of the profile, and the 4608-deep
//! FFN down-projection ran at 155 GFLOP/s on a 2-core AVX-512 Xeon. Packing once, when the model
//! is loaded, leaves nothing to rearrange per call (the kernel broadcasts the activation straight
//! from its rows); with a register-blocked AVX-512 kernel that shape runs at about 260 GFLOP/s.
//! The AVX2 + FMA kernel (BLIS's 6x16 block) matches the `gemm` crate on 2 Zen 3 cores (both at
//! 75-90% of the FMA peak on one thread and on two) but does not beat it, so weights are packed
//! for it only on request ([`Kernel::for_this_cpu`]); it reads its tile's rows interleaved (an
//! 8-way L1 keeps too few `k`-strided rows) and its panels on 64-byte boundaries (a 16-float group
//! is then one cache line, not two).
//!
//! Layout: the weight's `n` output rows are cut into panels of [`PANEL`] rows; panel `p` holds
//! `w[p * PANEL + j][kk]` at `p * k * PANEL + kk * PANEL + j`, zero beyond `n`. A kernel tile then
//! reads one contiguous run of `PANEL` floats per `kk`, and a one-row product (a decode step)
//! streams the weight front to back, as the dense layout did.
//!
//! The packed form replaces the dense one (it is not a copy beside it), so loading a model costs
//! no extra memory; [`PackedWeight::to_dense`] rebuilds `[n, k]` for the rare readers that need it.

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// Output rows per panel: four 16-lane AVX-512 vectors.
pub(crate) const PANEL: usize = 64;
/// Lanes of one AVX-512 f32 vector.
const LANES: usize = 16;
/// Vectors per panel row.
const VECTORS: usize = PANEL / LANES;
/// Activation rows per kernel tile: 6 x 4 vector accumulators, the 4 weight vectors and a
/// broadcast fit the 32 AVX-512 registers, and each depth step issues 10 loads for 24 FMAs
/// (12 rows x 2 vectors needs 14; measured 10-15% slower at the LFM2 prefill shapes).
const TILE_ROWS: usize = 6;
/// Depth of one pass over a tile (a 512 x 64 weight block, 128 KiB, stays in L2 while every
/// row block of the activation streams past it); 256 and 768 measured within noise of it.
const DEPTH_BLOCK: usize = 512;
/// Panels a thread finishes before moving on, so their output rows stay in L2 across depth passes.
const PANEL_GROUP: usize = 4;
/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;
/// Which kernel computes the tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512F intrinsics; only chosen where the CPU has them.
    Avx512,
    /// AVX2 + FMA intrinsics (BLIS's Haswell 6x16 register block); only chosen where the CPU
    /// has both.
    Avx2,
    /// Plain Rust the compiler vectorises for the build target; any CPU.
    Portable,
}

impl Kernel {
    /// The kernel loading should pack weights for, or `None` to keep them dense (for the `gemm`
    /// crate, which on AVX2 CPUs measured as fast as [`Kernel::Avx2`]: on 2 quiet Zen 3 cores,
    /// `packed::tests::gflops`, both reach 76-92% of the measured 2-core FMA peak, the AVX2
    /// kernel up to 10% ahead at some LFM2-VL-450M prefill shapes and 4-9% behind at the vision
    /// shapes).
    ///
    /// `VLMPIPE_PACKED_GEMM=off` keeps weights dense, `=portable` packs them for the portable
    /// kernel (to test this path on any CPU), `=avx2` for the AVX2 kernel where the CPU has
    /// AVX2 + FMA; by default they are packed where AVX-512F exists.
    pub fn for_this_cpu() -> Option<Kernel> {
        match std::env::var("VLMPIPE_PACKED_GEMM").as_deref() {
            Ok("off") | Ok("0") => None,
            Ok("portable") => Some(Kernel::Portable),
            Ok("avx2") => Kernel::avx2_available().then_some(Kernel::Avx2),
            _ => Kernel::avx512_available().then_some(Kernel::Avx512),
        }
    }

    /// `true` when this CPU runs `self`.
    pub fn available(self) -> bool {
        match self {
            Kernel::Avx512 => Kernel::avx512_available(),
            Kernel::Avx2 => Kernel::avx2_available(),
            Kernel::Portable => true,
        }
    }

    /// `true` when this CPU can run [`Kernel::Avx2`].
    pub fn avx2_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// `true` when this CPU can run [`Kernel::Avx512`].
    pub fn avx512_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// A `[n, k]` weight in the panel layout described in the module docs.
#[derive(Clone)]
pub(crate) struct PackedWeight {
    n: usize,
    k: usize,
    data: Aligned,
    kernel: Kernel,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeight")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("kernel", &self.kernel)
            .finish()
    }
}

impl PackedWeight {
    /// Packs the row-major `w [n, k]` for `kernel`.
    ///
    /// # Panics
    /// When `w.len() != n * k`, or this CPU cannot run `kernel`; both are bugs in the caller.
    pub(crate) fn pack(w: &[f32], n: usize, k: usize, kernel: Kernel) -> Self {
        assert_eq!(w.len(), n * k, "pack: weight is not [n, k]");
        assert!(kernel.available(), "pack: this CPU cannot run {kernel:?}");
        let panels = n.div_ceil(PANEL);
        let mut data = Aligned::zeros(panels * k * PANEL);
        if k > 0 {
            data.as_mut_slice()
                .par_chunks_mut(k * PANEL)
                .enumerate()
                .for_each(|(p, panel)| {
                    let rows = PANEL.min(n - p * PANEL);
                    // Blocks of depth keep the panel's source rows' reads in cache lines being used.
                    for k0 in (0..k).step_by(64) {
                        let len = 64.min(k - k0);
                        for j in 0..rows {
                            let src = &w[(p * PANEL + j) * k + k0..][..len];
                            for (d, &v) in src.iter().enumerate() {
                                panel[(k0 + d) * PANEL + j] = v;
                            }
                        }
                    }
                });
        }
        Self { n, k, data, kernel }
    }

    /// Packs `n` rows of `k` floats, row `r` read at `w[r * stride..][..k]` (one head's keys in
    /// a `[rows, heads * head_dim]` matrix), on the calling thread: attention packs one small
    /// operand per head inside tasks that are already parallel.
    ///
    /// # Panics
    /// When `w` is too short for the rows, or this CPU cannot run `kernel` (bugs in the caller).
    pub(crate) fn pack_strided(
        w: &[f32],
        n: usize,
        k: usize,
        stride: usize,
        kernel: Kernel,
    ) -> Self {
        assert!(kernel.available(), "pack: this CPU cannot run {kernel:?}");
        assert!(
            n == 0 || w.len() >= (n - 1) * stride + k,
            "pack: rows run past the slice"
        );
        let mut data = Aligned::zeros(n.div_ceil(PANEL) * k * PANEL);
        let dst = data.as_mut_slice();
        for r in 0..n {
            let panel = (r / PANEL) * k * PANEL + r % PANEL;
            for (kk, &v) in w[r * stride..][..k].iter().enumerate() {
                dst[panel + kk * PANEL] = v;
            }
        }
        Self { n, k, data, kernel }
    }

    /// Packs the transpose of `rows` rows of `width` floats read `stride` apart (one head's
    /// values): the weight `[width, rows]` whose product with `p [m, rows]` is `p · v`. Each
    /// source row becomes one depth step of the panels, copied whole.
    ///
    /// # Panics
    /// As [`Self::pack_strided`].
    pub(crate) fn pack_transposed_strided(
        v: &[f32],
        rows: usize,
        width: usize,
        stride: usize,
        kernel: Kernel,
    ) -> Self {
        assert!(kernel.available(), "pack: this CPU cannot run {kernel:?}");
        assert!(
            rows == 0 || v.len() >= (rows - 1) * stride + width,
            "pack: rows run past the slice"
        );
        let mut data = Aligned::zeros(width.div_ceil(PANEL) * rows * PANEL);
        let dst = data.as_mut_slice();
        for kk in 0..rows {
            for (p, chunk) in v[kk * stride..][..width].chunks(PANEL).enumerate() {
                dst[(p * rows + kk) * PANEL..][..chunk.len()].copy_from_slice(chunk);
            }
        }
        Self {
            n: width,
            k: rows,
            data,
            kernel,
        }
    }

    /// `y = x · w[..n_out, ..depth]ᵀ` on the calling thread: `m` input rows of `depth` floats
    /// read `x_stride` apart, `m` output rows of `n_out` floats written `ldc` apart (overwritten,
    /// not accumulated). For products inside tasks that are already parallel (attention's
    /// per-head blocks); a causal block uses only the first `n_out` keys (`depth` values).
    ///
    /// # Panics
    /// When `n_out` or `depth` exceed the weight, or `x`/`y` are too short (bugs in the caller).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul_serial(
        &self,
        x: &[f32],
        m: usize,
        x_stride: usize,
        n_out: usize,
        depth: usize,
        y: &mut [f32],
        ldc: usize,
    ) {
        assert!(
            n_out <= self.n && depth <= self.k,
            "matmul_serial: past the weight"
        );
        if m == 0 || n_out == 0 {
            return;
        }
        assert!(
            x.len() >= (m - 1) * x_stride + depth,
            "matmul_serial: input too short"
        );
        assert!(
            y.len() >= (m - 1) * ldc + n_out,
            "matmul_serial: output too short"
        );
        if depth == 0 {
            for row in y.chunks_mut(ldc.max(1)).take(m) {
                row[..n_out].fill(0.0);
            }
            return;
        }
        let k = self.k;
        for k0 in (0..depth).step_by(DEPTH_BLOCK) {
            let d = DEPTH_BLOCK.min(depth - k0);
            for p in 0..n_out.div_ceil(PANEL) {
                let cols = PANEL.min(n_out - p * PANEL);
                let w = &self.data.as_slice()[p * k * PANEL + k0 * PANEL..][..d * PANEL];
                for b in 0..m.div_ceil(TILE_ROWS) {
                    let rows = TILE_ROWS.min(m - b * TILE_ROWS);
                    let rows_in = Rows {
                        x: &x[b * TILE_ROWS * x_stride + k0..][..(rows - 1) * x_stride + d],
                        stride: x_stride,
                        step: 1,
                    };
                    let out = &mut y[b * TILE_ROWS * ldc + p * PANEL..][..(rows - 1) * ldc + cols];
                    let tile = Tile {
                        c: out.as_mut_ptr(),
                        ldc,
                        rows,
                        cols,
                        start: if k0 == 0 {
                            Start::Zero
                        } else {
                            Start::Accumulate
                        },
                    };
                    // SAFETY: `rows_in` holds `rows` rows of `d` steps and `w` `d * PANEL`
                    // floats (sliced above); the tile's `rows x cols` outputs lie inside `out`,
                    // borrowed mutably here, and were written by the first depth pass before a
                    // later one accumulates; the kernel was checked available when packing.
                    unsafe { run_kernel(self.kernel, &rows_in, w, d, &tile) };
                }
            }
        }
    }

    /// Output features.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// The kernel the panels were packed for.
    pub(crate) fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Panel `q` of the transposed weight, packed for the same kernel: `wᵀ` rows
    /// `q * PANEL..` (input features of `w`) over all `n` as depth, so `dy [m, n]` times it is
    /// columns `q * PANEL..` of `dy @ w` ([`super::packed_grad`]). Each 64 x 64 block of the
    /// panels is transposed once; the result is one panel (`PANEL * n` floats).
    ///
    /// # Panics
    /// When `q * PANEL >= k` (a bug in the caller).
    pub(crate) fn transposed_panel(&self, q: usize) -> Self {
        let (n, k) = (self.n, self.k);
        assert!(
            q * PANEL < k,
            "transposed panel {q} of a weight with {k} columns"
        );
        let cols = PANEL.min(k - q * PANEL);
        let mut data = Aligned::zeros(n * PANEL);
        let dst = data.as_mut_slice();
        let src = self.data.as_slice();
        for p in 0..n.div_ceil(PANEL) {
            let rows = PANEL.min(n - p * PANEL);
            // In panel `p`, column `kk` of `w` holds its 64 rows contiguously at `kk * PANEL`;
            // they become rows `p * PANEL..` of the result, 64 floats each.
            let block = &src[(p * k + q * PANEL) * PANEL..][..cols * PANEL];
            let out = &mut dst[p * PANEL * PANEL..][..rows * PANEL];
            #[cfg(target_arch = "x86_64")]
            if self.kernel == Kernel::Avx512 && rows == PANEL && cols == PANEL {
                // SAFETY: packed for `Avx512`, so the CPU has AVX-512F; both blocks are 64 x 64.
                unsafe { transpose_64_avx512(block, out) };
                continue;
            }
            for (c, column) in block.chunks_exact(PANEL).enumerate() {
                for (j, &v) in column[..rows].iter().enumerate() {
                    out[j * PANEL + c] = v;
                }
            }
        }
        Self {
            n: cols,
            k: n,
            data,
            kernel: self.kernel,
        }
    }

    /// The packed floats (module docs' layout), for kernels that read the panels directly.
    pub(crate) fn panels(&self) -> &[f32] {
        self.data.as_slice()
    }

    /// The row-major `[n, k]` weight again.
    pub(crate) fn to_dense(&self) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let mut w = vec![0f32; n * k];
        if k == 0 {
            return w;
        }
        w.par_chunks_mut(k).enumerate().for_each(|(row, dst)| {
            let (p, j) = (row / PANEL, row % PANEL);
            let panel = &self.data.as_slice()[p * k * PANEL..][..k * PANEL];
            for (kk, v) in dst.iter_mut().enumerate() {
                *v = panel[kk * PANEL + j];
            }
        });
        w
    }

    /// Rows `ids` of the `[n, k]` weight, back to back (an embedding lookup in a tied table).
    ///
    /// # Panics
    /// When an id is `n` or more (callers check ids against [`PackedWeight::n`] first).
    pub(crate) fn gather_rows(&self, ids: &[u32]) -> Vec<f32> {
        let k = self.k;
        let mut out = Vec::with_capacity(ids.len() * k);
        for &id in ids {
            let id = id as usize;
            assert!(id < self.n, "gather_rows: row {id} of {}", self.n);
            let panel = &self.data.as_slice()[(id / PANEL) * k * PANEL..][..k * PANEL];
            out.extend(panel.iter().skip(id % PANEL).step_by(PANEL));
        }
        out
    }

    /// `x [m, k] @ w^T (+ bias [n])` as a new row-major `[m, n]`.
    ///
    /// # Panics
    /// On operands of the wrong length (a bug in the caller, never user input).
    pub(crate) fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "packed matmul: input is not [m, k]");
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "packed matmul: bias is not [n]");
        }
        if m == 0 || n == 0 || k == 0 {
            return match bias {
                Some(b) => b.repeat(m),
                None => vec![0.0; m * n],
            };
        }
        let mut out = Vec::with_capacity(m * n);
        let dst = OutPtr(out.spare_capacity_mut().as_mut_ptr());
        let panels = n.div_ceil(PANEL);
        let blocks = m.div_ceil(TILE_ROWS);
        // The AVX2 kernel reads its rows interleaved (step `s` of row `r` at `s * TILE_ROWS + r`,
        // zeros past `m`): read in place, the rows' same-offset lines compete for the same
        // sets of an 8-way L1 whenever `k` is a multiple of 1024.
        let interleaved = (self.kernel == Kernel::Avx2).then(|| {
            let mut xt = Aligned::zeros(blocks * TILE_ROWS * k);
            xt.as_mut_slice()
                .par_chunks_mut(TILE_ROWS * k)
                .zip(x.par_chunks(TILE_ROWS * k))
                .for_each(|(dst, src)| {
                    for (r, row) in src.chunks_exact(k).enumerate() {
                        for (s, &v) in row.iter().enumerate() {
                            dst[s * TILE_ROWS + r] = v;
                        }
                    }
                });
            xt
        });
        let x_in = match &interleaved {
            Some(xt) => Input::Interleaved(xt.as_slice()),
            None => Input::RowMajor(x),
        };
        let threads = if m * n * k < PARALLEL_MIN_MACS {
            1
        } else {
            rayon::current_num_threads().max(1)
        };
        let job = |t: usize| {
            // Threads own disjoint output tiles: panel ranges when there are enough panels,
            // row-block ranges otherwise.
            let (p_range, b_range) = if panels >= threads {
                (share(panels, threads, t), 0..blocks)
            } else {
                (0..panels, share(blocks, threads, t))
            };
            // SAFETY: `x` is the row-major `[m, k]` input, `self.data` the packed `[n, k]` weight,
            // `dst` has room for `m * n` outputs, and the ranges of different `t` never overlap,
            // so no output element is written twice concurrently.
            unsafe { self.tiles(x_in, m, bias, &dst, p_range, b_range) }
        };
        if threads == 1 {
            job(0);
        } else {
            (0..threads).into_par_iter().for_each(job);
        }
        // SAFETY: the tiles of every (panel, row block) pair were stored above; the first depth
        // pass of each writes every element of its tile without reading it.
        unsafe { out.set_len(m * n) };
        out
    }

    /// Computes the output tiles of panels `p_range` x row blocks `b_range`.
    ///
    /// # Safety
    /// `x` must be the `[m, k]` input, `dst` must have room for `m * n` floats, and no other
    /// thread may write the same tiles.
    unsafe fn tiles(
        &self,
        x: Input<'_>,
        m: usize,
        bias: Option<&[f32]>,
        dst: &OutPtr,
        p_range: std::ops::Range<usize>,
        b_range: std::ops::Range<usize>,
    ) {
        let (n, k) = (self.n, self.k);
        let mut group = p_range.start;
        while group < p_range.end {
            let group_end = (group + PANEL_GROUP).min(p_range.end);
            for k0 in (0..k).step_by(DEPTH_BLOCK) {
                let depth = DEPTH_BLOCK.min(k - k0);
                for p in group..group_end {
                    let cols = PANEL.min(n - p * PANEL);
                    let w = &self.data.as_slice()[p * k * PANEL + k0 * PANEL..][..depth * PANEL];
                    for b in b_range.clone() {
                        let rows = TILE_ROWS.min(m - b * TILE_ROWS);
                        // Rows `b * TILE_ROWS..` from column `k0`. Read in place for the
                        // AVX-512 kernel: its broadcasts stream the tile's rows (packing them
                        // measured no faster on a 12-way L1).
                        let rows_in = match x {
                            Input::RowMajor(x) => Rows {
                                x: &x[b * TILE_ROWS * k + k0..][..(rows - 1) * k + depth],
                                stride: k,
                                step: 1,
                            },
                            Input::Interleaved(xt) => Rows {
                                x: &xt[(b * k + k0) * TILE_ROWS..][..depth * TILE_ROWS],
                                stride: 1,
                                step: TILE_ROWS,
                            },
                        };
                        let start = match (k0, bias) {
                            (0, Some(bias)) => Start::Bias(&bias[p * PANEL..][..cols]),
                            (0, None) => Start::Zero,
                            _ => Start::Accumulate,
                        };
                        let tile = Tile {
                            // SAFETY: (the offset) the tile's first element `(b * TILE_ROWS, p * PANEL)`
                            // lies inside the `[m, n]` output.
                            c: unsafe { dst.0.add(b * TILE_ROWS * n + p * PANEL) }.cast(),
                            ldc: n,
                            rows,
                            cols,
                            start,
                        };
                        // SAFETY: `rows_in` and `w` hold `depth` steps of `rows` and `PANEL` floats, and
                        // the tile's `rows x cols` outputs are inside `dst`, owned by this thread.
                        unsafe { run_kernel(self.kernel, &rows_in, w, depth, &tile) };
                    }
                }
            }
            group = group_end;
        }
    }
}

/// `dst[j * 64 + c] = src[c * 64 + j]` for a whole 64 x 64 block, as 16 x 16 register transposes:
/// the scalar loop's strided stores made [`PackedWeight::transposed_panel`] 3.7% of a training
/// step's CPU time (`perf`, 450M shapes), about twice the time it takes to read the weight.
///
/// # Safety
/// The CPU must have AVX-512F; both slices must hold 64 x 64 floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_64_avx512(src: &[f32], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(src.len() >= PANEL * PANEL && dst.len() >= PANEL * PANEL);
    for bc in (0..PANEL).step_by(LANES) {
        for bj in (0..PANEL).step_by(LANES) {
            // SAFETY: rows `bc..bc + 16` of `src` and `bj..bj + 16` of `dst` from column `bj`/`bc`
            // lie inside the 64 x 64 blocks asserted above.
            unsafe {
                let r: [__m512; 16] = std::array::from_fn(|i| {
                    _mm512_loadu_ps(src.as_ptr().add((bc + i) * PANEL + bj))
                });
                // Pairs of rows interleaved, then pairs of pairs, then 128-bit lanes twice: the
                // textbook 16 x 16 transpose (unpack, shuffle, two rounds of shuffle_f32x4).
                let t: [__m512; 16] = std::array::from_fn(|i| {
                    let (a, b) = (r[(i / 2) * 2], r[(i / 2) * 2 + 1]);
                    if i % 2 == 0 {
                        _mm512_unpacklo_ps(a, b)
                    } else {
                        _mm512_unpackhi_ps(a, b)
                    }
                });
                let u: [__m512; 16] = std::array::from_fn(|i| {
                    let base = (i / 4) * 4;
                    let (a, b) = match i % 4 {
                        0 | 1 => (t[base], t[base + 2]),
                        _ => (t[base + 1], t[base + 3]),
                    };
                    if i % 2 == 0 {
                        _mm512_shuffle_ps::<0x44>(a, b)
                    } else {
                        _mm512_shuffle_ps::<0xEE>(a, b)
                    }
                });
                let v: [__m512; 16] = std::array::from_fn(|i| {
                    let half = (i / 8) * 8;
                    let (a, b) = (u[half + i % 4], u[half + 4 + i % 4]);
                    if i % 8 < 4 {
                        _mm512_shuffle_f32x4::<0x88>(a, b)
                    } else {
                        _mm512_shuffle_f32x4::<0xDD>(a, b)
                    }
                });
                for i in 0..16 {
                    let (a, b) = (v[i % 8], v[8 + i % 8]);
                    let row = if i < 8 {
                        _mm512_shuffle_f32x4::<0x88>(a, b)
                    } else {
                        _mm512_shuffle_f32x4::<0xDD>(a, b)
                    };
                    _mm512_storeu_ps(dst.as_mut_ptr().add((bj + i) * PANEL + bc), row);
                }
            }
        }
    }
}

/// Floats on 64-byte boundaries: a panel row of 16 floats (the AVX2 kernel's load pair, or
/// one AVX-512 load) is then one cache line, not two; `Vec<f32>` is only 16-byte aligned.
#[derive(Clone)]
struct Aligned {
    lines: Vec<Line>,
    len: usize,
}

/// One cache line of floats.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

impl Aligned {
    /// `len` zeros.
    fn zeros(len: usize) -> Self {
        Self {
            lines: vec![Line([0.0; 16]); len.div_ceil(16)],
            len,
        }
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: `Line` is `repr(C)` over `[f32; 16]` with no padding (64 bytes exactly), so
        // the lines hold `16 * lines.len() >= len` consecutive initialised floats.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`, with the unique borrow of the lines.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// Part `t` of `0..len` cut into `parts` near-equal contiguous ranges.
fn share(len: usize, parts: usize, t: usize) -> std::ops::Range<usize> {
    let base = len / parts;
    let extra = len % parts;
    let start = t * base + t.min(extra);
    start..start + base + usize::from(t < extra)
}

/// The input of [`PackedWeight::matmul`] as the kernel reads it.
#[derive(Clone, Copy)]
enum Input<'a> {
    /// The row-major `[m, k]` input.
    RowMajor(&'a [f32]),
    /// Blocks of [`TILE_ROWS`] rows, each `[k, TILE_ROWS]` (zeros past `m`).
    Interleaved(&'a [f32]),
}

/// The output buffer, shared by the threads that each write their own tiles.
struct OutPtr(*mut MaybeUninit<f32>);
// SAFETY: threads write disjoint tiles through the pointer (see `PackedWeight::matmul`).
unsafe impl Sync for OutPtr {}

/// The input rows of a tile: row `r`, step `s` is `x[r * stride + s * step]`.
struct Rows<'a> {
    x: &'a [f32],
    stride: usize,
    step: usize,
}

/// What a tile's accumulators start from.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// The first depth pass without a bias.
    Zero,
    /// The first depth pass: every row starts at the bias (`cols` values).
    Bias(&'a [f32]),
    /// A later depth pass: the tile's current values.
    Accumulate,
}

/// One `rows x cols` output tile at `c` with row stride `ldc`.
struct Tile<'a> {
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    start: Start<'a>,
}

/// Dispatches to the kernel instance for `tile.rows` rows.
///
/// # Safety
/// `x` holds `tile.rows` rows of `depth` steps, `w` holds `depth * PANEL` floats, the tile's
/// `rows x cols` elements are writable (and initialised unless the start is `Zero` or `Bias`), and
/// `kernel` is supported by this CPU.
unsafe fn run_kernel(kernel: Kernel, x: &Rows<'_>, w: &[f32], depth: usize, tile: &Tile<'_>) {
    macro_rules! rows {
        ($kern:ident) => {
            match tile.rows {
                1 => $kern::<1>(x, w, depth, tile),
                2 => $kern::<2>(x, w, depth, tile),
                3 => $kern::<3>(x, w, depth, tile),
                4 => $kern::<4>(x, w, depth, tile),
                5 => $kern::<5>(x, w, depth, tile),
                _ => $kern::<6>(x, w, depth, tile),
            }
        };
    }
    debug_assert!(tile.rows >= 1 && tile.rows <= TILE_ROWS && tile.cols <= PANEL);
    debug_assert!(
        depth > 0
            && x.x.len() > (tile.rows - 1) * x.stride + (depth - 1) * x.step
            && w.len() >= depth * PANEL
    );
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded from the caller, which chose this kernel only with AVX-512F present.
        Kernel::Avx512 => unsafe { rows!(kernel_avx512) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded from the caller, which chose this kernel only with AVX2 + FMA present.
        Kernel::Avx2 => unsafe { rows!(kernel_avx2) },
        #[cfg(not(target_arch = "x86_64"))]
        Kernel::Avx512 | Kernel::Avx2 => {
            unreachable!("x86 packing is refused on this architecture")
        }
        // SAFETY: forwarded from the caller.
        Kernel::Portable => unsafe { rows!(kernel_portable) },
    }
}

/// `R` rows x 64 columns, accumulated over `depth` steps, in plain Rust.
///
/// # Safety
/// As [`run_kernel`], with `tile.rows == R`.
unsafe fn kernel_portable<const R: usize>(x: &Rows<'_>, w: &[f32], depth: usize, tile: &Tile<'_>) {
    let cols = tile.cols;
    let mut acc = [[0f32; PANEL]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        match tile.start {
            Start::Zero => {}
            Start::Bias(bias) => row[..cols].copy_from_slice(bias),
            // SAFETY: the tile's row `r` has `cols` initialised elements at `c + r * ldc`.
            Start::Accumulate => row[..cols].copy_from_slice(unsafe {
                std::slice::from_raw_parts(tile.c.add(r * tile.ldc), cols)
            }),
        }
    }
    for (step, ws) in w.chunks_exact(PANEL).take(depth).enumerate() {
        for (r, row) in acc.iter_mut().enumerate() {
            let a = x.x[r * x.stride + step * x.step];
            for (c, &b) in row.iter_mut().zip(ws) {
                *c += a * b;
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: the tile's row `r` has `cols` writable elements at `c + r * ldc`, owned by the
        // calling thread.
        let out = unsafe { std::slice::from_raw_parts_mut(tile.c.add(r * tile.ldc), cols) };
        out.copy_from_slice(&row[..cols]);
    }
}

/// `R` rows x 64 columns, accumulated over `depth` steps, with AVX-512F: each step loads the
/// panel's four weight vectors once and multiplies them by each row's broadcast input.
///
/// # Safety
/// As [`run_kernel`], with `tile.rows == R` and AVX-512F present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512<const R: usize>(x: &Rows<'_>, w: &[f32], depth: usize, tile: &Tile<'_>) {
    use std::arch::x86_64::*;
    // Lanes of vector `v` that lie inside the tile's `cols` columns.
    let masks: [__mmask16; VECTORS] =
        std::array::from_fn(|v| match tile.cols.saturating_sub(v * LANES) {
            0 => 0,
            n @ 1..LANES => ((1u32 << n) - 1) as __mmask16,
            _ => 0xffff,
        });
    let (xp, ldx, wp) = (x.x.as_ptr(), x.stride, w.as_ptr());
    // SAFETY: (every access below) masked loads and stores touch only the tile's `cols`
    // columns of rows `0..R`, which the caller guarantees; the caller sized `x` to `R` rows and
    // `w` to `depth` steps.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); VECTORS]; R];
        match tile.start {
            Start::Zero => {}
            Start::Bias(bias) => {
                let b: [__m512; VECTORS] = std::array::from_fn(|v| {
                    _mm512_maskz_loadu_ps(masks[v], bias.as_ptr().add((v * LANES).min(bias.len())))
                });
                acc = [b; R];
            }
            Start::Accumulate => {
                for (r, row_acc) in acc.iter_mut().enumerate() {
                    let row = tile.c.add(r * tile.ldc);
                    for (v, a) in row_acc.iter_mut().enumerate() {
                        *a = _mm512_maskz_loadu_ps(masks[v], row.add(v * LANES));
                    }
                }
            }
        }
        for step in 0..depth {
            let ws: [__m512; VECTORS] =
                std::array::from_fn(|v| _mm512_loadu_ps(wp.add(step * PANEL + v * LANES)));
            for (r, row_acc) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*xp.add(r * ldx + step * x.step));
                for (acc_v, &w_v) in row_acc.iter_mut().zip(&ws) {
                    *acc_v = _mm512_fmadd_ps(a, w_v, *acc_v);
                }
            }
        }
        for (r, row_acc) in acc.iter().enumerate() {
            let row = tile.c.add(r * tile.ldc);
            for (v, &a) in row_acc.iter().enumerate() {
                _mm512_mask_storeu_ps(row.add(v * LANES), masks[v], a);
            }
        }
    }
}

/// `R` rows x 64 columns, accumulated over `depth` steps, with AVX2 + FMA. The 64 columns are
/// four groups of 16 (two 8-lane vectors) done one after another: `R x 2` accumulators, the
/// group's two weight vectors and a broadcast fit the 16 ymm registers (BLIS's Haswell 6x16
/// block); the tile's input rows stay in L1 across the four groups.
///
/// # Safety
/// As [`run_kernel`], with `tile.rows == R` and AVX2 + FMA present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2<const R: usize>(x: &Rows<'_>, w: &[f32], depth: usize, tile: &Tile<'_>) {
    use std::arch::x86_64::*;
    const GROUP: usize = 16;
    let (xp, ldx, wp) = (x.x.as_ptr(), x.stride, w.as_ptr());
    let lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for c0 in (0..tile.cols).step_by(GROUP) {
        // Lanes of the group's two vectors inside the tile's `cols` columns (all-ones lanes load
        // and store, the rest stay untouched).
        let masks: [__m256i; 2] = std::array::from_fn(|v| {
            let live = (tile.cols - c0).saturating_sub(v * 8).min(8) as i32;
            _mm256_cmpgt_epi32(_mm256_set1_epi32(live), lane_ids)
        });
        // SAFETY: (every access below) masked loads and stores touch only the tile's `cols`
        // columns of rows `0..R`, which the caller guarantees; weight loads stay inside the
        // `depth * PANEL` floats of `w`, and input reads inside the `R` rows of `x`.
        unsafe {
            // Masked moves only for a group past the tile's edge: AMD cores run masked stores
            // as slow microcode.
            let full = tile.cols - c0 >= GROUP;
            let load = |p: *const f32, v: usize| {
                if full {
                    _mm256_loadu_ps(p)
                } else {
                    _mm256_maskload_ps(p, masks[v])
                }
            };
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            match tile.start {
                Start::Zero => {}
                Start::Bias(bias) => {
                    let b: [__m256; 2] = std::array::from_fn(|v| {
                        load(bias.as_ptr().add((c0 + v * 8).min(bias.len())), v)
                    });
                    acc = [b; R];
                }
                Start::Accumulate => {
                    for (r, row_acc) in acc.iter_mut().enumerate() {
                        let row = tile.c.add(r * tile.ldc + c0);
                        for (v, a) in row_acc.iter_mut().enumerate() {
                            *a = load(row.add(v * 8), v);
                        }
                    }
                }
            }
            let mut wg = wp.add(c0);
            let mut xs = xp;
            for _ in 0..depth {
                let w0 = _mm256_loadu_ps(wg);
                let w1 = _mm256_loadu_ps(wg.add(8));
                for (r, row_acc) in acc.iter_mut().enumerate() {
                    let a = _mm256_broadcast_ss(&*xs.add(r * ldx));
                    row_acc[0] = _mm256_fmadd_ps(a, w0, row_acc[0]);
                    row_acc[1] = _mm256_fmadd_ps(a, w1, row_acc[1]);
                }
                wg = wg.add(PANEL);
                xs = xs.add(x.step);
            }
            for (r, row_acc) in acc.iter().enumerate() {
                let row = tile.c.add(r * tile.ldc + c0);
                for (v, &a) in row_acc.iter().enumerate() {
                    if full {
                        _mm256_storeu_ps(row.add(v * 8), a);
                    } else {
                        _mm256_maskstore_ps(row.add(v * 8), masks[v], a);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0)
            .collect()
    }

    fn reference(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        n: usize,
        b: Option<&[f32]>,
    ) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
                out[i * n + j] = dot + b.map_or(0.0, |b| b[j] as f64);
            }
        }
        out
    }

    /// `matmul_serial` over strided operands, on a prefix of the outputs and of the depth (a
    /// causal attention block), equals the definition; so do both strided packings.
    #[test]
    fn serial_products_of_strided_packings_equal_the_definition() {
        // (m, n, k, stride, n_out, depth): tails of rows, panels and the 512-deep blocks.
        let cases = [
            (1, 1, 1, 3, 1, 1),
            (7, 70, 64, 192, 70, 64),
            (13, 130, 64, 128, 65, 40),
            (64, 64, 768, 1024, 64, 768),
            (5, 100, 600, 600, 37, 513),
        ];
        for kernel in kernels() {
            for (m, n, k, stride, n_out, depth) in cases {
                let src = values((n - 1) * stride + k, n);
                let w: Vec<f32> = (0..n)
                    .flat_map(|r| src[r * stride..][..k].to_vec())
                    .collect();
                let x = values(m * (k + 2), m);
                let xs: Vec<f32> = (0..m)
                    .flat_map(|i| x[i * (k + 2)..][..depth].to_vec())
                    .collect();
                let wd: Vec<f32> = (0..n_out)
                    .flat_map(|r| w[r * k..][..depth].to_vec())
                    .collect();
                let want = reference(&xs, m, depth, &wd, n_out, None);
                let ldc = n_out + 3;
                let check = |packed: &PackedWeight, what: &str| {
                    let mut y = vec![f32::NAN; (m - 1) * ldc + n_out];
                    packed.matmul_serial(&x, m, k + 2, n_out, depth, &mut y, ldc);
                    for i in 0..m {
                        for j in 0..n_out {
                            let (got, want) = (y[i * ldc + j] as f64, want[i * n_out + j]);
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{what} {kernel:?} {:?} ({i},{j}): {got} vs {want}",
                                (m, n, k, stride, n_out, depth)
                            );
                        }
                    }
                };
                check(
                    &PackedWeight::pack_strided(&src, n, k, stride, kernel),
                    "strided",
                );
                // `w` is the transpose of `wt [k, n]`: packing `wt`'s rows transposed gives `w`.
                let wt: Vec<f32> = (0..k)
                    .flat_map(|t| (0..n).map(|r| w[r * k + t]).collect::<Vec<_>>())
                    .collect();
                let wt_wide: Vec<f32> = wt
                    .chunks(n)
                    .flat_map(|row| [row, &[0.5; 5]].concat())
                    .collect();
                check(
                    &PackedWeight::pack_transposed_strided(&wt_wide, k, n, n + 5, kernel),
                    "transposed",
                );
            }
        }
    }

    /// Every panel of the transposed weight, full 64 x 64 blocks and partial ones, holds `wᵀ`.
    #[test]
    fn transposed_panels_hold_the_transpose() {
        for kernel in kernels() {
            for (n, k) in [(64, 64), (200, 130), (128, 256), (5, 70)] {
                let w = values(n * k, n + k);
                let packed = PackedWeight::pack(&w, n, k, kernel);
                for q in 0..k.div_ceil(PANEL) {
                    let panel = packed.transposed_panel(q);
                    let cols = PANEL.min(k - q * PANEL);
                    assert_eq!((panel.n(), panel.k()), (cols, n));
                    let dense = panel.to_dense();
                    for c in 0..cols {
                        for j in 0..n {
                            assert_eq!(
                                dense[c * n + j],
                                w[j * k + q * PANEL + c],
                                "{kernel:?} {n}x{k} q{q} ({c},{j})"
                            );
                        }
                    }
                }
            }
        }
    }

    fn kernels() -> Vec<Kernel> {
        let all = [Kernel::Portable, Kernel::Avx2, Kernel::Avx512];
        let (kernels, missing): (Vec<Kernel>, Vec<Kernel>) =
            all.into_iter().partition(|k| k.available());
        if !missing.is_empty() {
            eprintln!("this CPU cannot run {missing:?}: they are not tested");
        }
        kernels
    }

    /// Shapes that hit every tail: rows not a multiple of 6 (and fewer than 6), outputs not a
    /// multiple of 64 (and fewer), depths beyond one 512 block and not a multiple of it, one
    /// thread's worth and many panels' worth.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (1, 7, 33),
        (3, 300, 70),
        (6, 512, 64),
        (13, 513, 65),
        (7, 1100, 129),
        (29, 64, 200),
        (50, 600, 97),
        (270, 96, 260),
    ];

    #[test]
    fn products_match_a_float64_reference_for_every_kernel_and_tail() {
        for kernel in kernels() {
            for &(m, k, n) in SHAPES {
                let (x, w, b) = (values(m * k, 1), values(n * k, 2), values(n, 3));
                let packed = PackedWeight::pack(&w, n, k, kernel);
                for bias in [None, Some(b.as_slice())] {
                    let got = packed.matmul(&x, m, bias);
                    let want = reference(&x, m, k, &w, n, bias);
                    let worst = got
                        .iter()
                        .zip(&want)
                        .map(|(g, w)| (*g as f64 - w).abs())
                        .fold(0.0, f64::max);
                    // f32 rounding of `k` terms of magnitude <= 1 (a wrong tile is off by ~0.1+).
                    assert!(
                        worst < 1e-6 * k as f64 + 1e-5,
                        "{kernel:?} m={m} k={k} n={n} bias={}: off by {worst}",
                        bias.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn the_kernels_agree_to_rounding() {
        let kernels = kernels();
        if kernels.len() < 2 {
            eprintln!("skipped: this CPU runs only the portable kernel");
            return;
        }
        let (m, k, n) = (40, 700, 90);
        let (x, w) = (values(m * k, 4), values(n * k, 5));
        let a = PackedWeight::pack(&w, n, k, Kernel::Portable).matmul(&x, m, None);
        for &kernel in &kernels[1..] {
            let b = PackedWeight::pack(&w, n, k, kernel).matmul(&x, m, None);
            let worst = a
                .iter()
                .zip(&b)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-4, "portable and {kernel:?} differ by {worst}");
        }
    }

    #[test]
    fn to_dense_restores_the_weight_exactly() {
        for &(_, k, n) in SHAPES {
            let w = values(n * k, 6);
            assert_eq!(PackedWeight::pack(&w, n, k, Kernel::Portable).to_dense(), w);
        }
    }

    #[test]
    fn gathered_rows_are_the_weight_rows() {
        let (n, k) = (130, 37);
        let w = values(n * k, 7);
        let packed = PackedWeight::pack(&w, n, k, Kernel::Portable);
        let ids = [0u32, 63, 64, 129, 5, 5];
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&i| w[i as usize * k..][..k].to_vec())
            .collect();
        assert_eq!(packed.gather_rows(&ids), want);
    }

    #[test]
    fn empty_operands_give_zeros_or_the_bias() {
        let packed = PackedWeight::pack(&[], 3, 0, Kernel::Portable);
        assert_eq!(packed.matmul(&[], 2, None), vec![0.0; 6]);
        assert_eq!(
            packed.matmul(&[], 2, Some(&[1.0, 2.0, 3.0])),
            vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
        );
        assert!(packed.matmul(&[], 0, None).is_empty());
    }

    #[test]
    fn work_is_shared_without_gaps_or_overlap() {
        for len in [0, 1, 5, 32, 33] {
            for parts in 1..5 {
                let ranges: Vec<_> = (0..parts).map(|t| share(len, parts, t)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[parts - 1].end, len);
                assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
            }
        }
    }

    /// The f32 FMA peak of this machine's rayon threads in GFLOP/s, measured: every thread runs
    /// independent AVX2 FMA chains (12 of them, enough to cover the latency) at once. Nominal
    /// clocks mislead here: the 2 Zen 3 cores this was written on are listed at 2.45 GHz but
    /// run at ~3.1, so 2 x 2 FMA/cycle x 8 lanes x 2 flops x 3.1 GHz = ~198 GFLOP/s, not 157.
    /// `None` without AVX2 + FMA.
    fn measured_fma_peak() -> Option<f64> {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn chains(iters: usize) -> f32 {
            use std::arch::x86_64::*;
            // Opaque operands and count, or the compiler folds the chains away.
            let mut acc = [_mm256_set1_ps(std::hint::black_box(1.0)); 12];
            let mul = _mm256_set1_ps(std::hint::black_box(0.999_999));
            let add = _mm256_set1_ps(std::hint::black_box(1e-7));
            for _ in 0..std::hint::black_box(iters) {
                for a in &mut acc {
                    *a = _mm256_fmadd_ps(*a, mul, add);
                }
            }
            let mut out = [0f32; 8];
            // SAFETY: `out` holds 8 floats.
            unsafe {
                _mm256_storeu_ps(
                    out.as_mut_ptr(),
                    acc.iter()
                        .fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a)),
                )
            };
            out.iter().sum()
        }
        #[cfg(target_arch = "x86_64")]
        {
            if !Kernel::avx2_available() {
                return None;
            }
            // Each thread times its own chains (best of 3) and the rates add up: a thread that
            // wakes late does not count as a slow one.
            let iters = 20_000_000;
            let rates = rayon::broadcast(|_| {
                (0..3)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        // SAFETY: AVX2 + FMA were checked above.
                        std::hint::black_box(unsafe { chains(iters) });
                        (iters * 12 * 16) as f64 / t.elapsed().as_secs_f64() / 1e9
                    })
                    .fold(0.0, f64::max)
            });
            Some(rates.iter().sum())
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// Throughput of the f32 products at LFM2-VL-450M's training and prefill shapes, against the
    /// machine's FMA peak (`VLMPIPE_FMA_PEAK_GFLOPS`, else [`measured_fma_peak`] for the rayon
    /// threads there are). The implementations take turns rep by rep, so load from other
    /// processes falls on all of them, and the best rep counts; another process on one of two
    /// cores halves the two-thread numbers (that misled an earlier measurement into "45% of
    /// peak"), so run it on a quiet machine. Not a check; run it in release:
    /// `cargo test --release --lib packed::tests::gflops -- --ignored --nocapture`.
    #[test]
    #[ignore = "a benchmark; run in release with --ignored --nocapture"]
    fn gflops_at_the_lfm2_shapes() {
        use super::super::cpu::{self, MatMut, MatRef};
        use std::time::Instant;
        let peak: f64 = std::env::var("VLMPIPE_FMA_PEAK_GFLOPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .or_else(measured_fma_peak)
            .unwrap_or(f64::NAN);
        let threads = rayon::current_num_threads();
        // Best GFLOP/s of each of `fs` (each doing `macs` multiply-adds), taking turns.
        let rates = |macs: usize, fs: &mut [Box<dyn FnMut() + '_>]| -> Vec<f64> {
            let reps = (4e10 / (2.0 * macs as f64)).clamp(4.0, 30.0) as usize;
            let mut best = vec![f64::INFINITY; fs.len()];
            for rep in 0..=reps {
                for (f, b) in fs.iter_mut().zip(&mut best) {
                    let t = Instant::now();
                    f();
                    if rep > 0 {
                        *b = b.min(t.elapsed().as_secs_f64());
                    }
                }
            }
            best.iter().map(|s| 2.0 * macs as f64 / s / 1e9).collect()
        };
        let mut kernels: Vec<Kernel> = [Kernel::Avx512, Kernel::Avx2]
            .into_iter()
            .filter(|k| k.available())
            .collect();
        kernels.push(Kernel::Portable);
        println!("threads {threads}, FMA peak {peak:.0} GFLOP/s; cells: GFLOP/s (% of peak)");
        let mut header = format!("{:<16} {:<6} {:>13}", "m,k,n", "", "gemm crate");
        for kernel in &kernels {
            header += &format!(" {:>13}", format!("{kernel:?}"));
        }
        println!("{header}");
        let line = |label: String, product: &str, gflops: Vec<f64>| {
            let cells: Vec<String> = gflops
                .iter()
                .map(|g| format!("{g:6.1} ({:3.0}%)", 100.0 * g / peak))
                .collect();
            println!("{label:<16} {product:<6} {}", cells.join(" "));
        };
        let decoder = [
            (270, 1024, 4608),
            (270, 4608, 1024),
            (270, 1024, 1024),
            (270, 1024, 3072),
        ];
        let vision = [768, 1024]
            .into_iter()
            .flat_map(|m| [(m, 768, 768), (m, 768, 3072), (m, 3072, 768)]);
        for (m, k, n) in decoder.into_iter().chain(vision) {
            let macs = m * k * n;
            let (x, w, dy) = (values(m * k, 1), values(n * k, 2), values(m * n, 3));
            let packed: Vec<PackedWeight> = kernels
                .iter()
                .map(|&kernel| PackedWeight::pack(&w, n, k, kernel))
                .collect();
            // x [m, k] @ W [n, k]^T
            let mut fs: Vec<Box<dyn FnMut()>> = vec![Box::new(|| {
                std::hint::black_box(cpu::linear(&x, m, k, &w, n, None));
            })];
            for p in &packed {
                fs.push(Box::new(|| {
                    std::hint::black_box(p.matmul(&x, m, None));
                }));
            }
            line(format!("{m},{k},{n}"), "x·Wᵀ", rates(macs, &mut fs));
            if m != 270 {
                continue;
            }
            // dY [m, n] @ W [n, k]: the gradient training passes through the frozen weight.
            let mut fs: Vec<Box<dyn FnMut()>> = vec![Box::new(|| {
                let mut dx = vec![0f32; m * k];
                cpu::gemm(
                    MatMut::new(&mut dx, 0, k),
                    MatRef::row_major(&dy, m, n),
                    MatRef::row_major(&w, n, k),
                    1.0,
                    false,
                    threads,
                );
                std::hint::black_box(dx);
            })];
            for p in &packed {
                fs.push(Box::new(|| {
                    std::hint::black_box(super::super::packed_grad::dy_w(p, &dy, m));
                }));
            }
            line(String::new(), "dY·W", rates(macs, &mut fs));
        }
    }
}
