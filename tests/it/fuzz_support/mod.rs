//! The body of the `check` fuzz target, shared by the fuzz crate (`fuzz/fuzz_targets/check.rs`
//! includes this file with `#[path]`) and by `dsl_fuzz`, which replays the target's corpus: one
//! copy, outside the shipped library. It uses only `vlmpipe`'s public API.

/// Checks arbitrary bytes as a pipeline file, through [`vlmpipe::plan::load_pipeline`] as
/// `vlmpipe check` does: the body of the fuzz target (`fuzz/fuzz_targets/check.rs`) and of the
/// test that replays its corpus (`tests/it/dsl_fuzz.rs`).
///
/// The bytes go to `dir/fuzz.vp` after [`confine`], so nothing outside `dir` is read. Panics
/// (what the fuzzer looks for) when a diagnostic points outside its file or when parsing costs
/// more than [`PARSE_WORK_PER_BYTE`] times the input.
pub fn check_bytes(dir: &std::path::Path, data: &[u8]) {
    let data = confine(data);
    if let Ok(text) = std::str::from_utf8(&data) {
        let (_, _, stats) =
            vlmpipe::dsl::parser::parse_file_with_stats(vlmpipe::dsl::FileId(0), text);
        assert!(
            stats.pest_bytes <= PARSE_WORK_PER_BYTE * text.len() + 4096,
            "parsing {} bytes cost {} bytes of work",
            text.len(),
            stats.pest_bytes
        );
    }
    let path = dir.join("fuzz.vp");
    std::fs::write(&path, &data).expect("the fuzz input is written");
    let result = vlmpipe::plan::load_pipeline(&path, &[]);
    let _ = vlmpipe::plan::render_diagnostics(&result, true);
    let _ = vlmpipe::plan::render_json(&result);
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
        let _ = vlmpipe::plan::graph::render_text(plan);
    }
}

/// The most parsing work [`check_bytes`] allows per input byte (see
/// [`vlmpipe::dsl::parser::ParseStats`]).
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
