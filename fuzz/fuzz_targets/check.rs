//! `vlmpipe check` on arbitrary bytes: no panic, no diagnostic outside its file, parsing work
//! linear in the input, and nothing read outside a temporary folder.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

// One copy of the target's body, shared with the test that replays the corpus.
#[path = "../../tests/it/fuzz_support/mod.rs"]
mod fuzz_support;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("a temporary folder"));
    fuzz_support::check_bytes(dir.path(), data);
});
