//! `vlmpipe check` on arbitrary bytes: no panic, no diagnostic outside its file, parsing work
//! linear in the input, and nothing read outside a temporary folder.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("a temporary folder"));
    vlmpipe::testing::check_bytes(dir.path(), data);
});
