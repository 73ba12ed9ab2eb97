//! vlmpipe: declarative pipelines that turn small local vision-language models into image classifiers.
//!
//! Data flow (see ARCHITECTURE.md): pipeline file → [`dsl`] (parse) → [`plan`] (checked, typed DAG)
//! → [`exec`] + [`cache`] → [`stages`] (data, prompt, model, …), with [`model`] holding LFM2-VL itself.

pub mod cache;
pub mod cli;
pub mod decode;
pub mod dsl;
pub(crate) mod dtype;
pub mod exec;
pub(crate) mod file_error;
pub mod gguf;
pub mod hub;
pub mod model;
pub mod plan;
pub(crate) mod read_limits;
pub mod read_policy;
pub(crate) mod rng;
pub mod runner;
pub mod slurm;
pub mod stages;
pub mod train;

/// Sets the process-wide options of mimalloc, the global allocator of the `vlmpipe` binary (and
/// of `examples/train_bench.rs`, so both time the same settings), and of candle's CPU worker
/// threads. Call first thing in `main`, before any other thread exists; where mimalloc is not the
/// allocator its options change nothing in use.
pub fn tune_process() {
    // 2 MiB pages for the allocator's OS memory (where the kernel allows them on request, as with
    // THP `madvise`): a prefill allocates and frees tens of MB of activations per layer, and with
    // 4 KiB pages every first touch of them faults. Measured 3-8% off vision and prefill.
    // SAFETY: a plain store of an allocator option, made before other threads allocate.
    unsafe {
        libmimalloc_sys::mi_option_set_enabled(libmimalloc_sys::mi_option_large_os_pages, true)
    };
    // Training re-allocates the same activations every step (see the function).
    train::keep_freed_pages();
    model::ops::park_candle_workers_when_idle();
}
