use mimalloc::MiMalloc;

// candle allocates fresh pages for every large tensor with the system allocator; mimalloc
// reuses them (measured: an attention score pass went from 48 to 22 ms).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

fn main() -> std::process::ExitCode {
    // 2 MiB pages for the allocator's OS memory (where the kernel allows them on request, as with
    // THP `madvise`): a prefill allocates and frees tens of MB of activations per layer, and with
    // 4 KiB pages every first touch of them faults. Measured 3-8% off vision and prefill.
    // SAFETY: sets a process-wide allocator option before any other thread exists.
    unsafe {
        libmimalloc_sys::mi_option_set_enabled(libmimalloc_sys::mi_option_large_os_pages, true)
    };
    // Training re-allocates the same activations every step (see the function).
    vlmpipe::train::keep_freed_pages();
    vlmpipe::cli::main()
}
