//! The pipeline language end to end: valid pipelines give the expected plan, malformed ones give
//! the exact diagnostics (line:column, message, hint).

use std::path::{Path, PathBuf};

use vlmpipe::plan::{CheckResult, load_pipeline, render_diagnostics};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dsl")
        .join(rel)
}

fn check_ok(rel: &str) -> CheckResult {
    let result = load_pipeline(&fixture(rel), &[]);
    assert!(
        result.diagnostics.is_empty(),
        "{rel}:\n{}",
        render_diagnostics(&result, false)
    );
    result
}

#[test]
fn valid_pipelines_check_cleanly() {
    for rel in ["valid/cats_vs_dogs.vp", "valid/car_makers.vp", "valid/human_actions.vp"] {
        let result = check_ok(rel);
        let plan = result.plan.expect("plan");
        eprintln!("{}", vlmpipe::plan::graph::render_text(&plan));
    }
}

/// One line per diagnostic: `file:line:col severity[code] message | hint`.
fn summarize(result: &CheckResult) -> Vec<String> {
    result
        .diagnostics
        .iter()
        .map(|d| {
            let at = match d.primary_span() {
                Some(span) => {
                    let (line, col) = result.sources.line_col(span);
                    let file = result
                        .sources
                        .path(span.file)
                        .and_then(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    format!("{file}:{line}:{col}")
                }
                None => "-".to_owned(),
            };
            let severity = if d.is_error() { "error" } else { "warning" };
            match &d.hint {
                Some(h) => format!("{at} {severity}[{}] {} | {h}", d.code, d.message),
                None => format!("{at} {severity}[{}] {}", d.code, d.message),
            }
        })
        .collect()
}

#[test]
#[ignore = "prints the diagnostics of every error fixture, for writing the table"]
fn dump_error_fixtures() {
    let mut entries: Vec<_> = std::fs::read_dir(fixture("errors"))
        .expect("fixtures")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "vp"))
        .collect();
    entries.sort();
    for path in entries {
        let result = load_pipeline(&path, &[]);
        println!("== {}", path.file_name().unwrap().to_string_lossy());
        for line in summarize(&result) {
            println!("{line}");
        }
    }
}

#[test]
#[ignore = "prints rendered diagnostics"]
fn dump_rendered() {
    for rel in ["errors/duplicate_name_across_import.vp", "errors/template_error.vp", "errors/multiple_errors.vp"] {
        let result = load_pipeline(&fixture(rel), &[]);
        println!("{}", render_diagnostics(&result, false));
    }
}

/// Every malformed fixture with its exact diagnostics: `file:line:col severity[code] message | hint`.
const ERROR_CASES: &[(&str, &[&str])] = &[
    (
        "bad_keep_word.vp",
        &[
            "bad_keep_word.vp:4:10 error[bad-value] expected `all` or `rgb_only` for `keep`, found `rgb_onyl` | did you mean `rgb_only`?",
        ],
    ),
    (
        "bad_repo.vp",
        &[
            "bad_repo.vp:1:18 error[bad-value] expected a hub repository `owner/name`, found `LFM2-VL-450M` | e.g. `hf(\"microsoft/cats_vs_dogs\")`",
        ],
    ),
    (
        "bad_split_member.vp",
        &[
            "bad_split_member.vp:6:50 error[unknown-reference] split `pets_split` has no member `tset` | did you mean `test`?",
        ],
    ),
    (
        "block_for_value_decl.vp",
        &[
            "block_for_value_decl.vp:1:13 error[wrong-type] `model` declarations take `= value`, found a block | write `model small = hf(\"LiquidAI/LFM2-VL-450M\")`",
        ],
    ),
    (
        "cycle.vp",
        &[
            "cycle.vp:3:27 error[cycle] dependency cycle: `first` → `second` → `first` | a stage cannot depend, directly or not, on its own output",
        ],
    ),
    (
        "duplicate_field.vp",
        &[
            "duplicate_field.vp:3:3 error[duplicate-field] field `user` is set twice in prompt `vet`",
        ],
    ),
    (
        "duplicate_name.vp",
        &[
            "duplicate_name.vp:3:7 error[duplicate-name] duplicate name `small` | every declaration needs its own name, across imported files too",
        ],
    ),
    (
        "duplicate_name_across_import.vp",
        &[
            "duplicate_name_across_import.vp:2:7 error[duplicate-name] duplicate name `small` | every declaration needs its own name, across imported files too",
        ],
    ),
    (
        "eval_labels_mismatch.vp",
        &[
            "eval_labels_mismatch.vp:5:68 error[label-mapping] the label mapping of dataset `pets` maps to `horse`, not in labels `animals`",
            "eval_labels_mismatch.vp:5:68 error[label-mapping] the label mapping of dataset `pets` misses `dog` of labels `animals`",
        ],
    ),
    (
        "grammar_wrong_type.vp",
        &[
            "grammar_wrong_type.vp:2:25 error[wrong-type] expected a label list for `one_of`, found prompt `vet`",
        ],
    ),
    (
        "import_chain_error.vp",
        &[
            "broken.vp:3:46 error[syntax] expected a value, found `}`",
        ],
    ),
    (
        "import_cycle_a.vp",
        &[
            "import_cycle_b.vp:1:8 error[import-cycle] import cycle: `import_cycle_a.vp` → `import_cycle_b.vp` → `import_cycle_a.vp` | move the shared declarations into a third file that both import",
        ],
    ),
    (
        "import_cycle_b.vp",
        &[
            "import_cycle_a.vp:1:8 error[import-cycle] import cycle: `import_cycle_b.vp` → `import_cycle_a.vp` → `import_cycle_b.vp` | move the shared declarations into a third file that both import",
        ],
    ),
    (
        "import_not_found.vp",
        &[
            "import_not_found.vp:1:8 error[import-not-found] imported file `lib/missing.vp` not found | imports are relative to the importing file; looked for `<fixtures>/errors/lib/missing.vp`",
        ],
    ),
    (
        "int_out_of_range.vp",
        &[
            "int_out_of_range.vp:1:21 error[bad-value] integer `99999999999999999999` is out of range | integers must fit in 64 bits",
        ],
    ),
    (
        "label_mapping_missing.vp",
        &[
            "label_mapping_missing.vp:4:11 error[label-mapping] the label mapping misses `bird` of labels `animals` | map a column value to every label, or remove the label from the list",
        ],
    ),
    (
        "label_mapping_unknown_label.vp",
        &[
            "label_mapping_unknown_label.vp:4:38 error[label-mapping] label `dgo` is not in labels `animals`",
            "label_mapping_unknown_label.vp:4:11 error[label-mapping] the label mapping misses `dog` of labels `animals` | map a column value to every label, or remove the label from the list",
        ],
    ),
    (
        "lora_r_zero.vp",
        &[
            "lora_r_zero.vp:6:14 error[bad-value] `r` must be at least 1, found 0",
        ],
    ),
    (
        "lora_target_typo.vp",
        &[
            "lora_target_typo.vp:6:31 warning[bad-value] lora target `o_proj` matches no module of LFM2-VL | did you mean `out_proj`?",
        ],
    ),
    (
        "missing_field.vp",
        &[
            "missing_field.vp:4:6 error[missing-field] missing field `prompt` in eval `baseline` | add `prompt = ...` to the block",
        ],
    ),
    (
        "multiple_errors.vp",
        &[
            "multiple_errors.vp:4:1 error[syntax] expected `)` or `,`, found `prompt` | `prompt` starts a new declaration: is a bracket or block above left open?",
            "multiple_errors.vp:5:22 error[unknown-reference] unknown reference `pets`",
            "multiple_errors.vp:6:70 error[unknown-reference] unknown reference `animls` | did you mean `animals`?",
        ],
    ),
    (
        "negative_sample.vp",
        &[
            "negative_sample.vp:5:52 error[bad-value] `n` must be at least 1, found -5",
        ],
    ),
    (
        "report_compare_model.vp",
        &[
            "report_compare_model.vp:2:29 error[wrong-type] expected an eval for `compare`, found model `small`",
        ],
    ),
    (
        "split_ratios.vp",
        &[
            "split_ratios.vp:2:20 error[split-ratios] split ratios of `pets_split` sum to 0.9, expected 1 | ratios are fractions of the data (test: 0.1, train: 0.8)",
        ],
    ),
    (
        "split_without_member.vp",
        &[
            "split_without_member.vp:6:39 error[wrong-type] expected data (a dataset, a split member such as `s.train`, `sample(...)` or `shuffle(...)`) for `data`, found split `pets_split` | name one of its members: `pets_split.test` or `pets_split.train`",
        ],
    ),
    (
        "syntax_missing_comma.vp",
        &[
            "syntax_missing_comma.vp:1:42 error[syntax] expected `)` or `,`, found `revision`",
        ],
    ),
    (
        "syntax_missing_equals.vp",
        &[
            "syntax_missing_equals.vp:2:13 error[syntax] expected `=` or `{`, found `hf`",
        ],
    ),
    (
        "syntax_misspelled_keyword.vp",
        &[
            "syntax_misspelled_keyword.vp:2:1 error[syntax] expected a declaration (`dataset`, `model`, `eval`, ...), found `modle`",
        ],
    ),
    (
        "syntax_unclosed_block.vp",
        &[
            "syntax_unclosed_block.vp:4:1 error[syntax] expected a field name or `}`, found end of file",
        ],
    ),
    (
        "syntax_unterminated_string.vp",
        &[
            "syntax_unterminated_string.vp:1:26 error[syntax] expected a value or `]`, found an unterminated string | strings end on the line they start; use `\"\"\"` for text over several lines",
        ],
    ),
    (
        "temperature_negative.vp",
        &[
            "temperature_negative.vp:5:91 error[bad-value] `temperature` must be at least 0, found -0.5",
        ],
    ),
    (
        "template_error.vp",
        &[
            "template_error.vp:5:5 error[template] template `user` does not compile: unexpected end of input, expected end of block | templates use minijinja (jinja2) syntax: `{{ value }}`, `{% for x in xs %}...{% endfor %}`",
        ],
    ),
    (
        "unknown_argument.vp",
        &[
            "unknown_argument.vp:5:56 error[unknown-field] unknown argument `sed` to `sample` | did you mean `seed`?",
        ],
    ),
    (
        "unknown_field.vp",
        &[
            "unknown_field.vp:6:3 error[unknown-field] unknown field `lr8` in finetune `tuned` | did you mean `lr`?",
        ],
    ),
    (
        "unknown_reference.vp",
        &[
            "unknown_reference.vp:5:25 error[unknown-reference] unknown reference `smal` | did you mean `small`?",
        ],
    ),
    (
        "unknown_source.vp",
        &[
            "unknown_source.vp:2:12 error[wrong-type] expected a data source (`hf(...)`, `parquet(...)`, `folder(...)`, `csv(...)`, `jsonl(...)` or `synthetic(...)`) for `source`, found `hugging(...)`",
        ],
    ),
    (
        "wrong_type_prompt_as_model.vp",
        &[
            "wrong_type_prompt_as_model.vp:5:25 error[wrong-type] expected a model (a `model` or a `finetune`) for `model`, found prompt `vet`",
        ],
    ),
    (
        "wrong_type_string_for_int.vp",
        &[
            "wrong_type_string_for_int.vp:7:20 error[wrong-type] expected an integer for `max_new_tokens`, found a string",
        ],
    ),
];

#[test]
fn error_fixtures_report_exact_positions_messages_and_hints() {
    let dir = fixture("errors");
    let prefix = format!("{}/", fixture("").display().to_string().trim_end_matches('/'));
    let mut failures = Vec::new();
    for (file, expected) in ERROR_CASES {
        let result = load_pipeline(&dir.join(file), &[]);
        assert!(result.plan.is_none() || result.diagnostics.iter().all(|d| !d.is_error()), "{file}: a plan despite errors");
        let actual: Vec<String> = summarize(&result)
            .into_iter()
            .map(|l| l.replace(&prefix, "<fixtures>/"))
            .collect();
        if actual != *expected {
            failures.push(format!("{file}:\n  expected {expected:#?}\n  actual {actual:#?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every fixture in the folder is in the table (a new file cannot be silently skipped).
    let on_disk = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(Result::ok).filter(|e| e.path().extension().is_some_and(|x| x == "vp")).count())
        .unwrap_or(0);
    assert_eq!(on_disk, ERROR_CASES.len());
}
