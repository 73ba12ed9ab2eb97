//! Helpers shared by unit and integration tests: locating the `../shared` data folder.

use std::path::PathBuf;

/// The `shared/` folder beside the checkout (or `VLMPIPE_SHARED`), if present.
///
/// Tests that need real photos, the real tokenizer or the transformers references call this and
/// skip with a message when it returns `None`, so the suite still passes on a bare clone.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("VLMPIPE_SHARED") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    };
    dir.is_dir().then_some(dir)
}

/// Like [`shared_dir`] joined with `rel`, printing why the calling test is skipped when absent.
pub fn shared_path(rel: &str) -> Option<PathBuf> {
    let Some(dir) = shared_dir() else {
        eprintln!("skipping: ../shared not found (set VLMPIPE_SHARED to the shared data folder)");
        return None;
    };
    let path = dir.join(rel);
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "skipping: {} not found (set VLMPIPE_SHARED to the shared data folder)",
            path.display()
        );
        None
    }
}

/// The device model tests run on: `VLMPIPE_TEST_DEVICE` (any `--device` spelling), the CPU when
/// unset. A GPU machine runs the parity suite with, e.g.,
/// `VLMPIPE_TEST_DEVICE=cuda cargo test --features cuda --test it reference_model`.
///
/// Panics with the reason when the variable names a device this build or machine cannot open:
/// a test asked to run on a GPU must not quietly pass on the CPU.
pub fn test_device() -> candle_core::Device {
    let Some(choice) = std::env::var("VLMPIPE_TEST_DEVICE")
        .ok()
        .filter(|s| !s.trim().is_empty())
    else {
        return candle_core::Device::Cpu;
    };
    let resolved = choice
        .parse::<crate::model::DeviceChoice>()
        .map_err(|e| e.to_string())
        .and_then(|c| c.resolve().map_err(|e| e.to_string()));
    match resolved {
        Ok(device) => device,
        Err(e) => panic!("VLMPIPE_TEST_DEVICE={choice}: {e}"),
    }
}

/// The largest absolute difference between two tensors of the same shape, as f32; panics on a
/// shape mismatch or a failed op (a test helper).
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let diff = (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.to_dtype(candle_core::DType::F32))
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>());
    diff.unwrap_or_else(|e| panic!("max_abs_diff: {e}"))
}

/// Checks arbitrary bytes as a pipeline file, through [`crate::plan::load_pipeline`] as
/// `vlmpipe check` does: the body of the fuzz target (`fuzz/fuzz_targets/check.rs`) and of the
/// test that replays its corpus (`tests/it/dsl_fuzz.rs`).
///
/// The bytes go to `dir/fuzz.vp` after [`confine`], so nothing outside `dir` is read. Panics
/// (what the fuzzer looks for) when a diagnostic points outside its file or when parsing costs
/// more than [`PARSE_WORK_PER_BYTE`] times the input.
pub fn check_bytes(dir: &std::path::Path, data: &[u8]) {
    let data = confine(data);
    if let Ok(text) = std::str::from_utf8(&data) {
        let (_, _, stats) = crate::dsl::parser::parse_file_with_stats(crate::dsl::FileId(0), text);
        assert!(
            stats.pest_bytes <= PARSE_WORK_PER_BYTE * text.len() + 4096,
            "parsing {} bytes cost {} bytes of work",
            text.len(),
            stats.pest_bytes
        );
    }
    let path = dir.join("fuzz.vp");
    std::fs::write(&path, &data).expect("the fuzz input is written");
    let result = crate::plan::load_pipeline(&path, &[]);
    let _ = crate::plan::render_diagnostics(&result, true);
    let _ = crate::plan::render_json(&result);
    for d in &result.diagnostics {
        assert!(!d.message.is_empty(), "{d:?}");
        for label in &d.labels {
            let file = result.sources.get(label.span.file).expect("a known file");
            assert!(label.span.start <= label.span.end, "{d:?}");
            assert!(label.span.end as usize <= file.text.len(), "{d:?}");
        }
    }
    if let Some(plan) = &result.plan {
        for node in &plan.nodes {
            let _ = node.canonical_params();
        }
        let _ = crate::plan::graph::render_text(plan);
    }
}

/// The most parsing work [`check_bytes`] allows per input byte (see
/// [`crate::dsl::parser::ParseStats`]).
pub const PARSE_WORK_PER_BYTE: usize = 3;

/// `data` with every path it could name made relative and downward: `~` and `..` are broken up,
/// and a `/` that could start a string's value (only blanks or `\` since a `"`) becomes `_`.
pub fn confine(data: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(data.len());
    let mut string_start = false;
    for &b in data {
        let b = match b {
            b'~' => b'_',
            b'/' if string_start => b'_',
            b'.' if out.last() == Some(&b'.') => b'_',
            b => b,
        };
        string_start = match b {
            b'"' => true,
            // An escape may hide a newline and drop itself (`"\<newline>/etc"` is `/etc`).
            b' ' | b'\t' | b'\r' | b'\n' | b'\\' => string_start,
            _ => false,
        };
        out.push(b);
    }
    out
}
