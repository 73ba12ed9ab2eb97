//! How the tiled products split their work over rayon's threads, shared by [`super::q8_vnni`],
//! [`super::q4k_vnni`] and [`super::q6k_vnni`] (and the output pointer of the other quantized
//! kernels).

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

/// The output buffer, shared by tasks that write disjoint elements.
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every kernel's tasks write disjoint elements through the pointer (each says where).
unsafe impl Sync for OutPtr {}

/// Calls `task(tiles, rows)` once for every block of `tiles_per_task` weight tiles by
/// `rows_per_task` activation rows, covering `0..tiles` x `0..m`. Consecutive tasks share their
/// weight tiles, so rayon's contiguous splits keep a core on the same tiles.
pub(crate) fn for_each_block(
    tiles: usize,
    m: usize,
    tiles_per_task: usize,
    rows_per_task: usize,
    task: impl Fn(Range<usize>, Range<usize>) + Sync,
) {
    let tile_groups = tiles.div_ceil(tiles_per_task);
    let row_chunks = m.div_ceil(rows_per_task);
    (0..tile_groups * row_chunks).into_par_iter().for_each(|i| {
        let (group, chunk) = (i / row_chunks, i % row_chunks);
        let t0 = group * tiles_per_task;
        let r0 = chunk * rows_per_task;
        task(
            t0..tiles.min(t0 + tiles_per_task),
            r0..m.min(r0 + rows_per_task),
        );
    });
}

/// A one-row product (a decode step): one task per thread, each taking the next `chunk` whole
/// tiles from a shared counter and calling `task(tiles)` on them, until every tile of
/// `0..tiles` is taken once. Each thread then reads its chunks as one forward stream.
pub(crate) fn for_each_chunk(tiles: usize, chunk: usize, task: impl Fn(Range<usize>) + Sync) {
    let chunks = tiles.div_ceil(chunk);
    let next = AtomicUsize::new(0);
    (0..rayon::current_num_threads().min(chunks))
        .into_par_iter()
        .for_each(|_| {
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= chunks {
                    break;
                }
                let t0 = c * chunk;
                task(t0..tiles.min(t0 + chunk));
            }
        });
}
