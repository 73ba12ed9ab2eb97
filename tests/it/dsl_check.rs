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
    for rel in [
        "valid/cats_vs_dogs.vp",
        "valid/car_makers.vp",
        "valid/human_actions.vp",
    ] {
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

/// Every malformed fixture with its exact diagnostics: `file:line:col severity[code] message | hint`.
const ERROR_CASES: &[(&str, &[&str])] = &[
    (
        // Issue 14 item 9: names no row defines and templates that load templates fail every
        // row at run time; check reports them where they are written.
        "template_undefined_name.vp",
        &[
            "template_undefined_name.vp:6:23 error[template] template `user` reads `lables`, which nothing defines | did you mean `labels`? a template can read `labels`, `row_id`, `image_id`, `label` or `role` (the row, its labels and the params)",
        ],
    ),
    (
        "template_include.vp",
        &[
            "template_include.vp:4:5 error[template] template `user` uses `{% include %}`, which has nothing to load | a prompt template cannot load other templates; write the text into this one (`file(\"...\")` reads a whole template from a file)",
        ],
    ),
    (
        // Issue 14 item 9: closed sets, at the value, with the valid values and a did-you-mean.
        "closed_sets.vp",
        &[
            "closed_sets.vp:2:24 error[bad-value] expected `tiny` for `preset`, found `tiny2` | did you mean `tiny`?",
            "closed_sets.vp:2:40 error[bad-value] expected `f32`, `f16` or `bf16` for `dtype`, found `bf61` | did you mean `bf16`?",
            "closed_sets.vp:4:28 error[bad-value] expected `shapes` for `kind`, found `shape` | did you mean `shapes`?",
            "closed_sets.vp:4:52 error[bad-value] expected shapes among `circle`, `square` or `triangle` for `shapes`, found `sqaure` | did you mean `square`?",
        ],
    ),
    (
        "template_file_error.vp",
        &[
            "bad.j2:2:1 error[template] template `user` does not compile: unexpected `}`, expected end of variable block | templates use minijinja (jinja2) syntax: `{{ value }}`, `{% for x in xs %}...{% endfor %}`",
        ],
    ),
    (
        "schema_file_error.vp",
        &[
            "bad.schema.json:3:61 error[bad-value] json schema `files/bad.schema.json` is not valid json: trailing comma",
        ],
    ),
    (
        "param_wrong_type.vp",
        &[
            "param_wrong_type.vp:3:35 error[wrong-type] expected an integer for `n`, found param `name` (a string)",
        ],
    ),
    (
        "unused_declaration.vp",
        &[
            "unused_declaration.vp:2:8 warning[unused] labels `unused_list` is declared but never used | use it in a stage, or remove it",
        ],
    ),
    (
        "grammar_labels_mismatch.vp",
        &[
            "grammar_labels_mismatch.vp:7:86 error[label-mapping] grammar `answer` constrains answers to labels `pets_and_more`, but the stage uses labels `animals` | use the same label list in the grammar and in `labels`",
        ],
    ),
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
        &["broken.vp:3:46 error[syntax] expected a value, found `}`"],
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
        &["lora_r_zero.vp:6:14 error[bad-value] `r` must be at least 1, found 0"],
    ),
    (
        "lora_target_typo.vp",
        &[
            "lora_target_typo.vp:6:31 warning[bad-value] lora target `o_proj` matches no module of LFM2-VL | did you mean `out_proj`?",
        ],
    ),
    (
        // Issue 13, item 7: a field another one makes moot is named where it is written.
        "finetune_moot_fields.vp",
        &[
            "finetune_moot_fields.vp:6:3 warning[no-effect] `epochs` has no effect in finetune `tuned`: `max_steps` sets the number of optimizer steps | `max_steps` replaces `epochs` (the data is cycled as needed); remove `epochs`, or remove `max_steps` to train for whole epochs",
            "finetune_moot_fields.vp:7:3 warning[no-effect] `eval_every` has no effect in finetune `tuned`: it has no `eval_data` | add `eval_data = …` to measure held-out loss, or remove `eval_every`",
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
            "multiple_errors.vp:4:1 error[syntax] expected `)` or `,`, found `prompt` | close the `(` before the next declaration",
            "multiple_errors.vp:5:22 error[unknown-reference] unknown reference `pets`",
            "multiple_errors.vp:6:70 error[unknown-reference] unknown reference `animls` | did you mean `animals`?",
        ],
    ),
    (
        "negative_sample.vp",
        &["negative_sample.vp:5:52 error[bad-value] `n` must be at least 1, found -5"],
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
        &["syntax_missing_comma.vp:1:42 error[syntax] expected `)` or `,`, found `revision`"],
    ),
    (
        "syntax_missing_equals.vp",
        &["syntax_missing_equals.vp:2:13 error[syntax] expected `=` or `{`, found `hf`"],
    ),
    (
        "syntax_misspelled_keyword.vp",
        &[
            "syntax_misspelled_keyword.vp:2:1 error[syntax] expected a declaration (`dataset`, `model`, `eval`, ...), found `modle` | did you mean `model`? (a declaration starts with its keyword)",
        ],
    ),
    (
        "syntax_unclosed_block.vp",
        &[
            "syntax_unclosed_block.vp:4:1 error[syntax] expected a field name or `}`, found end of file | close the `{` before the end of the file",
        ],
    ),
    (
        // Issue 14 item 10: the error is where the next declaration starts, and points back at
        // the `{` left open (before: `expected = or {, found parts` at 14:7, nothing at line 9).
        "syntax_unclosed_block_mid_file.vp",
        &[
            "syntax_unclosed_block_mid_file.vp:14:1 error[syntax] expected a field name or `}`, found `split` | close the `{` before the next declaration",
        ],
    ),
    (
        // Issue 14 item 10: a keyword typo gets a did-you-mean and no knock-on unknown `pets`.
        "syntax_keyword_typo.vp",
        &[
            "syntax_keyword_typo.vp:3:1 error[syntax] expected a declaration (`dataset`, `model`, `eval`, ...), found `datset` | did you mean `dataset`? (a declaration starts with its keyword)",
        ],
    ),
    (
        "syntax_non_ascii_name.vp",
        &[
            "syntax_non_ascii_name.vp:2:11 error[syntax] expected `=` or `{`, found `égories` | `catégories` is not a name: names are ASCII letters, digits and `_`, starting with a letter or `_`",
        ],
    ),
    (
        // Issue 14 item 10: an empty file (or only comments) is not a pipeline of 0 stages.
        "empty.vp",
        &[
            "empty.vp:1:1 error[no-declarations] `<fixtures>/errors/empty.vp` declares nothing | a pipeline declares its datasets, prompts, models and evals (`dataset NAME { ... }`, see README.md); is this the right file?",
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
            "wrong_type_prompt_as_model.vp:5:25 error[wrong-type] expected a model (a `model`, a `finetune` or an `export`) for `model`, found prompt `vet`",
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
    let prefix = format!(
        "{}/",
        fixture("").display().to_string().trim_end_matches('/')
    );
    let mut failures = Vec::new();
    for (file, expected) in ERROR_CASES {
        let result = load_pipeline(&dir.join(file), &[]);
        assert!(
            result.plan.is_none() || result.diagnostics.iter().all(|d| !d.is_error()),
            "{file}: a plan despite errors"
        );
        let actual: Vec<String> = summarize(&result)
            .into_iter()
            .map(|l| l.replace(&prefix, "<fixtures>/"))
            .collect();
        if actual != *expected {
            failures.push(format!(
                "{file}:\n  expected {expected:#?}\n  actual {actual:#?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every fixture in the folder is in the table (a new file cannot be silently skipped).
    let on_disk = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "vp"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(on_disk, ERROR_CASES.len());
}

mod plans {
    use super::*;
    use vlmpipe::plan::params::{
        DataSource, Dtype, GrammarSpec, JsonType, KeepFilter, MapKey, ModelSource, Scoring,
        SplitMethod,
    };
    use vlmpipe::plan::{NodeKind, NodeParams, Plan};

    fn plan(rel: &str) -> Plan {
        check_ok(rel).plan.expect("plan")
    }

    fn inputs(plan: &Plan, name: &str) -> Vec<String> {
        let node = plan
            .find(name)
            .unwrap_or_else(|| panic!("no node `{name}`"));
        node.inputs
            .iter()
            .filter_map(|id| plan.node(*id))
            .map(|n| n.name.clone())
            .collect()
    }

    #[test]
    fn cats_vs_dogs_has_the_expected_nodes_edges_and_params() {
        let plan = plan("valid/cats_vs_dogs.vp");
        assert_eq!(plan.settings.name, "cats_vs_dogs");
        assert_eq!(plan.settings.seed, 23);
        let kinds: Vec<(String, NodeKind)> = plan
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.kind()))
            .collect();
        let expected = [
            ("small", NodeKind::Model),
            ("pets", NodeKind::Dataset),
            ("pets_split", NodeKind::Split),
            ("sample(pets_split.test,100,23)", NodeKind::Sample),
            ("vet", NodeKind::Prompt),
            ("animals", NodeKind::Labels),
            ("baseline", NodeKind::Eval),
            ("tuned", NodeKind::Finetune),
            ("as_json", NodeKind::Grammar),
            ("tuned_eval", NodeKind::Eval),
            ("summary", NodeKind::Report),
        ];
        for (name, kind) in expected {
            assert!(
                kinds.contains(&(name.to_owned(), kind)),
                "missing {kind} `{name}` in {kinds:?}"
            );
        }
        assert_eq!(kinds.len(), expected.len(), "{kinds:?}");
        // Topological: every input precedes its user.
        for node in &plan.nodes {
            assert!(node.inputs.iter().all(|i| i.0 < node.id.0), "{}", node.name);
        }
        assert_eq!(
            inputs(&plan, "baseline"),
            ["small", "sample(pets_split.test,100,23)", "vet", "animals"]
        );
        assert_eq!(
            inputs(&plan, "tuned_eval"),
            [
                "tuned",
                "sample(pets_split.test,100,23)",
                "vet",
                "animals",
                "as_json"
            ]
        );
        assert_eq!(inputs(&plan, "summary"), ["baseline", "tuned_eval"]);
        assert_eq!(inputs(&plan, "pets_split"), ["pets"]);

        let Some(NodeParams::Dataset(pets)) = plan.find("pets").map(|n| &n.params) else {
            panic!("pets is not a dataset")
        };
        assert_eq!(
            pets.source,
            DataSource::Hf {
                repo: "microsoft/cats_vs_dogs".into(),
                split: "train".into(),
                revision: None,
                config: None
            }
        );
        assert_eq!(pets.keep, KeepFilter::RgbOnly);
        let mapping = pets.label.mapping.as_ref().expect("mapping");
        assert_eq!(mapping[0].key, MapKey::Int(0));
        assert_eq!(mapping[1].label, "dog");
        assert_eq!(pets.drop, ["train-00001"]);

        let Some(NodeParams::Split(split)) = plan.find("pets_split").map(|n| &n.params) else {
            panic!("pets_split is not a split")
        };
        assert_eq!(split.method, SplitMethod::Stratified);
        assert_eq!(split.seed, 42);
        assert_eq!(split.ratios.get("train"), Some(&0.9));

        let Some(NodeParams::Prompt(vet)) = plan.find("vet").map(|n| &n.params) else {
            panic!("vet is not a prompt")
        };
        assert_eq!(
            vet.system.as_deref(),
            Some(
                "You are a veterinarian specialized in analyzing pictures of cats and dogs\n\
                 You excel at identifying the type of animal from a picture."
            )
        );
        assert!(vet.user.starts_with("What animal in the following list"));

        let Some(NodeParams::Finetune(tuned)) = plan.find("tuned").map(|n| &n.params) else {
            panic!("tuned is not a finetune")
        };
        assert_eq!(tuned.base.name, "small");
        assert_eq!(tuned.data.display_name(), "pets_split.train");
        assert_eq!(tuned.lora.r, 8);
        assert_eq!(tuned.lora.alpha, 16.0);
        assert_eq!(tuned.lr, 5e-4);
        assert_eq!(tuned.grad_accum, 16);
        assert_eq!(tuned.seed, 23, "defaults to the pipeline seed");

        let Some(NodeParams::Eval(eval)) = plan.find("tuned_eval").map(|n| &n.params) else {
            panic!("tuned_eval is not an eval")
        };
        assert_eq!(eval.labels.values, ["cat", "dog"]);
        assert_eq!(eval.scoring, Scoring::Generate);
        assert_eq!(eval.max_new_tokens, 64);

        let Some(NodeParams::Grammar(g)) = plan.find("as_json").map(|n| &n.params) else {
            panic!("as_json is not a grammar")
        };
        let GrammarSpec::Json { schema } = &g.spec else {
            panic!("not json")
        };
        assert_eq!(
            schema.to_json_schema(),
            serde_json::json!({
                "type": "object",
                "properties": { "pred_class": { "enum": ["cat", "dog"] } },
                "required": ["pred_class"],
                "additionalProperties": false,
            })
        );
        assert_eq!(plan.settings.params.len(), 1);
    }

    #[test]
    fn car_makers_has_49_labels_and_shared_sample_nodes() {
        let plan = plan("valid/car_makers.vp");
        let Some(NodeParams::Labels(makers)) = plan.find("makers").map(|n| &n.params) else {
            panic!("makers is not a label list")
        };
        assert_eq!(makers.values.len(), 49);
        assert_eq!(makers.values.first().map(String::as_str), Some("AM"));
        assert!(makers.values.iter().any(|m| m == "Mercedes-Benz"));
        // Both evals read the same anonymous sample node (same source, size and seed).
        assert_eq!(inputs(&plan, "small_eval")[1], "sample(cars_test,50,1)");
        assert_eq!(inputs(&plan, "medium_eval")[1], "sample(cars_test,50,1)");
        assert_eq!(
            plan.nodes
                .iter()
                .filter(|n| n.name == "sample(cars_test,50,1)")
                .count(),
            1
        );
        let Some(NodeParams::Model(medium)) = plan.find("medium").map(|n| &n.params) else {
            panic!("medium is not a model")
        };
        assert_eq!(medium.dtype, Dtype::Bf16);
        assert_eq!(
            medium.source,
            ModelSource::Hf {
                repo: "LiquidAI/LFM2-VL-1.6B".into(),
                revision: "main".into()
            }
        );
        let Some(NodeParams::Finetune(ft)) = plan.find("small_tuned").map(|n| &n.params) else {
            panic!("small_tuned is not a finetune")
        };
        assert_eq!(ft.epochs, 3);
        assert_eq!(
            ft.eval_data.as_ref().map(|d| d.display_name()).as_deref(),
            Some("sample(cars_test,200,2)")
        );
        assert_eq!(
            inputs(&plan, "makers_report"),
            ["small_eval", "medium_eval", "tuned_eval"]
        );
    }

    #[test]
    fn human_actions_uses_imported_declarations_and_inline_grammar() {
        let plan = plan("valid/human_actions.vp");
        let Some(NodeParams::Labels(actions)) = plan.find("actions_list").map(|n| &n.params) else {
            panic!("actions_list is not a label list")
        };
        assert_eq!(actions.values.len(), 15);
        let structured = plan.find("structured").expect("structured");
        let NodeParams::Eval(eval) = &structured.params else {
            panic!("not an eval")
        };
        assert_eq!(eval.scoring, Scoring::Labels);
        let output = eval.output.as_ref().expect("inline grammar");
        assert_eq!(output.name, "structured/output");
        let Some(NodeParams::Grammar(g)) = plan.node(output.id).map(|n| &n.params) else {
            panic!("output is not a grammar")
        };
        let GrammarSpec::Json {
            schema: JsonType::Object { fields },
        } = &g.spec
        else {
            panic!("not a json object")
        };
        assert_eq!(fields.len(), 2);
        assert!(fields[1].optional);
        assert_eq!(inputs(&plan, "tuned")[1], "shuffle(actions_split.train,5)");
        assert_eq!(inputs(&plan, "actions"), ["actions_list"]);
        // Watch mode sees the imported file.
        assert!(
            plan.files
                .iter()
                .any(|f| f.ends_with("shared/actions_common.vp")),
            "{:?}",
            plan.files
        );
    }

    #[test]
    fn local_files_params_and_sources_resolve() {
        let plan = plan("valid/local_files.vp");
        assert_eq!(
            plan.settings.params.get("n"),
            Some(&vlmpipe::plan::params::ParamValue::Int(20))
        );
        let Some(NodeParams::Dataset(photos)) = plan.find("photos").map(|n| &n.params) else {
            panic!("photos is not a dataset")
        };
        let DataSource::Folder { path } = &photos.source else {
            panic!("not a folder source")
        };
        assert_eq!(path.path, "files/photos");
        assert!(path.resolved.is_dir());
        let Some(NodeParams::Dataset(toy)) = plan.find("toy").map(|n| &n.params) else {
            panic!("toy is not a dataset")
        };
        let DataSource::Synthetic {
            kind,
            n,
            seed,
            options,
        } = &toy.source
        else {
            panic!("not synthetic")
        };
        assert_eq!((kind.as_str(), *n, *seed), ("shapes", 400, 1));
        assert_eq!(
            options.get("image_size"),
            Some(&vlmpipe::plan::params::ParamValue::Int(32))
        );
        let Some(NodeParams::Prompt(vet)) = plan.find("vet").map(|n| &n.params) else {
            panic!("vet is not a prompt")
        };
        assert!(vet.user.starts_with("What animal do you see?"));
        let Some(NodeParams::Model(tiny)) = plan.find("tiny").map(|n| &n.params) else {
            panic!("tiny is not a model")
        };
        assert_eq!(
            tiny.source,
            ModelSource::Init {
                preset: "tiny".into(),
                seed: 5
            }
        );
        let Some(NodeParams::Model(pinned)) = plan.find("pinned").map(|n| &n.params) else {
            panic!("pinned is not a model")
        };
        assert_eq!(
            pinned.source,
            ModelSource::Hf {
                repo: "LiquidAI/LFM2-VL-450M".into(),
                revision: "v1".into()
            }
        );
        let Some(NodeParams::Grammar(g)) = plan.find("schema_answer").map(|n| &n.params) else {
            panic!("schema_answer is not a grammar")
        };
        assert_eq!(g.whitespace, vlmpipe::plan::params::Whitespace::Compact);
        let GrammarSpec::JsonSchema { schema, .. } = &g.spec else {
            panic!("not a json schema")
        };
        assert_eq!(schema["required"][0], "pred_class");
        let Some(NodeParams::Finetune(ft)) = plan.find("toy_tuned").map(|n| &n.params) else {
            panic!("toy_tuned is not a finetune")
        };
        assert_eq!(ft.lr, 0.001);
        assert_eq!(ft.data.display_name(), "sample(toy,20,5)");
        assert_eq!(inputs(&plan, "toy_eval")[4], "toy_eval/output");
        // Watch mode: the template, the schema and the local data folder are among the files read.
        for end in [
            "files/user.j2",
            "files/answer.schema.json",
            "files/photos",
            "local_files.vp",
        ] {
            assert!(
                plan.files.iter().any(|f| f.ends_with(end)),
                "{end} not in {:?}",
                plan.files
            );
        }
    }

    #[test]
    fn stages_are_looked_up_by_name_with_a_suggestion() {
        let plan = plan("valid/cats_vs_dogs.vp");
        assert_eq!(
            plan.lookup_stage("baseline")
                .map(|id| plan.nodes[id.0].name.as_str()),
            Ok("baseline")
        );
        assert_eq!(
            plan.lookup_stage("baselin").map_err(|e| e.to_string()),
            Err("unknown stage `baselin`: did you mean `baseline`?".to_owned())
        );
        assert_eq!(
            plan.lookup_stage("zzz").map_err(|e| e.to_string()),
            Err("unknown stage `zzz` in pipeline `cats_vs_dogs`".to_owned())
        );
    }

    #[test]
    fn inputs_of_is_the_transitive_closure_in_topological_order() {
        let plan = plan("valid/cats_vs_dogs.vp");
        let target = plan.find("baseline").expect("baseline").id;
        let names: Vec<&str> = plan
            .inputs_of(&[target])
            .into_iter()
            .filter_map(|id| plan.node(id))
            .map(|n| n.name.as_str())
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            [
                "animals",
                "baseline",
                "pets",
                "pets_split",
                "sample(pets_split.test,100,23)",
                "small",
                "vet"
            ]
        );
        assert_eq!(names.last(), Some(&"baseline"));
    }
}

mod canonical {
    use super::*;
    use vlmpipe::plan::check_source;

    const BASE: &str = r#"
pipeline p { seed = 1 }
labels animals = ["cat", "dog"]
dataset pets { source = hf("microsoft/cats_vs_dogs") label = "labels" -> { 0: "cat", 1: "dog" } }
prompt vet { user = "which animal? {{ labels }}" }
model small = hf("LiquidAI/LFM2-VL-450M")
eval e { model = small data = sample(pets, 100, seed: 3) prompt = vet labels = animals max_new_tokens = 64 }
"#;

    /// Same pipeline: reordered fields, separators, comments, number spelling, extra blank lines.
    const REFORMATTED: &str = r#"
// a comment
pipeline p {
  seed = 1   // the seed
}

labels animals = [
  "cat",
  "dog",   // trailing comma
]
dataset pets {
  label = "labels" -> { 1: "dog", 0: "cat" };
  source = hf("microsoft/cats_vs_dogs");
}
prompt vet {
  user = "which animal? {{ labels }}"
}
model small = hf( "LiquidAI/LFM2-VL-450M" )
eval e {
  max_new_tokens = 64
  labels = animals, prompt = vet
  data = sample(pets, 100, seed: 3)
  model = small
}
"#;

    fn canonical(text: &str) -> Vec<(String, serde_json::Value)> {
        let result = check_source(Path::new("mem.vp"), text, &[]);
        assert!(
            result.diagnostics.is_empty(),
            "{}",
            render_diagnostics(&result, false)
        );
        let plan = result.plan.expect("plan");
        let mut out: Vec<_> = plan
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.canonical_params()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn formatting_and_comments_do_not_change_canonical_params() {
        assert_eq!(canonical(BASE), canonical(REFORMATTED));
    }

    #[test]
    fn a_value_change_changes_only_the_affected_nodes() {
        let base = canonical(BASE);
        let changed = canonical(&BASE.replace("max_new_tokens = 64", "max_new_tokens = 32"));
        let differing: Vec<&str> = base
            .iter()
            .zip(&changed)
            .filter(|(a, b)| a != b)
            .map(|(a, _)| a.0.as_str())
            .collect();
        assert_eq!(differing, ["e"]);
        let text = serde_json::to_string(&changed.iter().find(|n| n.0 == "e").map(|n| &n.1))
            .unwrap_or_default();
        assert!(text.contains("\"max_new_tokens\":32"), "{text}");
    }

    #[test]
    fn canonical_keys_are_sorted() {
        for (_, value) in canonical(BASE) {
            let text = value.to_string();
            if let Some(obj) = value.as_object() {
                let keys: Vec<&String> = obj.keys().collect();
                let mut sorted = keys.clone();
                sorted.sort();
                assert_eq!(keys, sorted, "{text}");
            }
        }
    }
}

mod overrides {
    use super::*;
    use vlmpipe::plan::params::ParamValue;

    fn set(name: &str, value: &str) -> Vec<(String, String)> {
        vec![(name.to_owned(), value.to_owned())]
    }

    #[test]
    fn set_overrides_a_param_and_renames_the_sample_node() {
        let result = load_pipeline(&fixture("valid/cats_vs_dogs.vp"), &set("n_eval", "10"));
        let plan = result.plan.expect("plan");
        assert_eq!(
            plan.settings.params.get("n_eval"),
            Some(&ParamValue::Int(10))
        );
        assert!(plan.find("sample(pets_split.test,10,23)").is_some());
        assert!(plan.find("sample(pets_split.test,100,23)").is_none());
    }

    #[test]
    fn set_with_the_wrong_type_is_an_error_pointing_at_the_param() {
        let result = load_pipeline(&fixture("valid/cats_vs_dogs.vp"), &set("n_eval", "many"));
        assert!(result.plan.is_none());
        let lines = summarize(&result);
        assert_eq!(
            lines,
            [
                "cats_vs_dogs.vp:4:7 error[bad-override] cannot set param `n_eval` to `many`: expected an integer"
            ]
        );
    }

    #[test]
    fn set_of_an_unknown_param_suggests_the_closest() {
        let result = load_pipeline(&fixture("valid/cats_vs_dogs.vp"), &set("n_evl", "5"));
        assert_eq!(
            summarize(&result),
            [
                "- error[bad-override] unknown param `n_evl` in `--set n_evl=5` | did you mean `n_eval`?"
            ]
        );
    }
}

mod rendering {
    use super::*;
    use vlmpipe::plan::{graph, render_json};

    #[test]
    fn human_rendering_shows_message_hint_location_line_and_underline() {
        // A relative path keeps the expected text machine-independent (tests run in the crate root).
        let result = load_pipeline(
            Path::new("tests/fixtures/dsl/errors/duplicate_name_across_import.vp"),
            &[],
        );
        let text = render_diagnostics(&result, false);
        let expected = "\
error[duplicate-name]: duplicate name `small`
  hint: every declaration needs its own name, across imported files too
  --> tests/fixtures/dsl/errors/duplicate_name_across_import.vp:2:7
  |
2 | model small = hf(\"LiquidAI/LFM2-VL-1.6B\")
  |       ^^^^^ declared again here
  --> tests/fixtures/dsl/errors/lib/common.vp:3:7
  |
3 | model small = hf(\"LiquidAI/LFM2-VL-450M\")
  |       ----- first declared here
";
        assert_eq!(text, expected);
        assert!(render_diagnostics(&result, true).contains("\x1b["));
    }

    #[test]
    fn an_unclosed_block_points_at_its_opening_brace() {
        let result = load_pipeline(
            Path::new("tests/fixtures/dsl/errors/syntax_unclosed_block.vp"),
            &[],
        );
        let text = render_diagnostics(&result, false);
        let expected = "\
error[syntax]: expected a field name or `}`, found end of file
  hint: close the `{` before the end of the file
  --> tests/fixtures/dsl/errors/syntax_unclosed_block.vp:4:1
  |
4 | 
  | ^
  --> tests/fixtures/dsl/errors/syntax_unclosed_block.vp:2:15
  |
2 | eval baseline {
  |               - this `{` is never closed
";
        assert_eq!(text, expected);
    }

    #[test]
    fn an_unclosed_block_mid_file_points_at_its_opening_brace() {
        // Issue 14 item 10: the secondary label sits on the `{` of line 9.
        let result = load_pipeline(
            Path::new("tests/fixtures/dsl/errors/syntax_unclosed_block_mid_file.vp"),
            &[],
        );
        let text = render_diagnostics(&result, false);
        let expected = "\
error[syntax]: expected a field name or `}`, found `split`
  hint: close the `{` before the next declaration
   --> tests/fixtures/dsl/errors/syntax_unclosed_block_mid_file.vp:14:1
   |
14 | split parts = stratified(pets, train: 0.8, test: 0.2)
   | ^^^^^
  --> tests/fixtures/dsl/errors/syntax_unclosed_block_mid_file.vp:9:12
  |
9 | prompt ask {
  |            - this `{` is never closed
";
        assert_eq!(text, expected);
    }

    #[test]
    fn json_rendering_has_code_positions_and_hint() {
        let result = load_pipeline(
            Path::new("tests/fixtures/dsl/errors/unknown_reference.vp"),
            &[],
        );
        let json = render_json(&result);
        assert_eq!(
            json,
            serde_json::json!([{
                "code": "unknown-reference",
                "severity": "error",
                "message": "unknown reference `smal`",
                "hint": "did you mean `small`?",
                "labels": [{
                    "file": "tests/fixtures/dsl/errors/unknown_reference.vp",
                    "line": 5, "column": 25, "end_line": 5, "end_column": 29,
                    "message": "not declared in this file or its imports",
                    "primary": true,
                }],
            }])
        );
    }

    #[test]
    fn graph_renders_as_text_dot_and_mermaid() {
        let plan = check_ok("valid/cats_vs_dogs.vp").plan.expect("plan");
        let text = graph::render_text(&plan);
        assert!(
            text.starts_with(
                "pipeline cats_vs_dogs (seed 23)\n  report summary\n    eval baseline\n"
            ),
            "{text}"
        );
        assert!(text.contains("split pets_split (see above)"), "{text}");
        let id = |name: &str| plan.find(name).map(|n| n.id.0).unwrap_or(usize::MAX);
        let dot = graph::render_dot(&plan);
        assert!(dot.starts_with("digraph \"cats_vs_dogs\" {"), "{dot}");
        assert!(
            dot.contains(&format!("n{} -> n{};", id("pets"), id("pets_split"))),
            "{dot}"
        );
        let mermaid = graph::render_mermaid(&plan);
        assert!(mermaid.starts_with("flowchart LR\n"), "{mermaid}");
        assert!(
            mermaid.contains(&format!("n{} --> n{}", id("tuned"), id("tuned_eval"))),
            "{mermaid}"
        );
        assert!(mermaid.contains("[\"summary (report)\"]"), "{mermaid}");
    }
}

#[test]
fn a_missing_pipeline_file_is_a_diagnostic_not_a_panic() {
    let result = load_pipeline(&fixture("no/such/pipeline.vp"), &[]);
    assert!(result.plan.is_none());
    assert_eq!(result.diagnostics.len(), 1);
    assert!(
        result.diagnostics[0]
            .message
            .starts_with("cannot read pipeline `"),
        "{:?}",
        result.diagnostics
    );
    assert!(
        result.diagnostics[0]
            .message
            .ends_with("pipeline.vp`: no such file")
    );
}

#[test]
fn a_file_imported_twice_is_loaded_once() {
    let result = check_ok("valid/diamond.vp");
    let base_count = result
        .sources
        .files()
        .filter(|(_, f)| f.path.ends_with("base.vp"))
        .count();
    assert_eq!(base_count, 1);
    assert!(result.plan.is_some());
}

/// Every pipeline shipped in `pipelines/` and `examples/` checks without errors (none may exist yet).
#[test]
fn shipped_pipelines_check_without_errors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["pipelines", "examples"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for path in entries.filter_map(Result::ok).map(|e| e.path()) {
            if path.extension().is_some_and(|e| e == "vp") {
                let result = load_pipeline(&path, &[]);
                assert!(
                    !result.has_errors(),
                    "{}:\n{}",
                    path.display(),
                    render_diagnostics(&result, false)
                );
            }
        }
    }
}

/// Issue 13, item 7: no shipped pipeline sets a field that another one makes moot (README's
/// `--set` examples must change what they say they change).
#[test]
fn shipped_pipelines_set_no_moot_field() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["pipelines", "examples"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for path in entries.filter_map(Result::ok).map(|e| e.path()) {
            if path.extension().is_some_and(|e| e == "vp") {
                let result = load_pipeline(&path, &[]);
                let moot: Vec<String> = summarize(&result)
                    .into_iter()
                    .filter(|l| l.contains("[no-effect]"))
                    .collect();
                assert!(moot.is_empty(), "{}: {moot:#?}", path.display());
            }
        }
    }
}

#[test]
fn folder_and_synthetic_datasets_need_no_label_field() {
    let text = r#"
labels animals = ["cat", "dog"]
dataset photos { source = folder("photos")  labels = animals }
dataset shapes { source = synthetic(kind: "shapes", n: 10, seed: 1) }
dataset table { source = parquet("t") }
"#;
    let result = vlmpipe::plan::check_source(std::path::Path::new("p.vp"), text, &[]);
    let errors: Vec<String> = result
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.message.clone())
        .collect();
    // Only the Parquet dataset, whose rows don't name their class, must say where the label is.
    assert_eq!(errors, ["missing field `label` in dataset `table`"]);
}

#[test]
fn regex_lark_and_schema_grammars_are_compiled_at_check_time() {
    let text = r#"grammar ok = regex("[0-9]{3}")
grammar bad_regex = regex("[a")
grammar bad_lark = lark("start: missing_rule")
grammar bad_schema = json_schema({ type: "object", properties: { a: { type: "integer", minimum: 5, maximum: 1 } }, required: ["a"] })
"#;
    let result = vlmpipe::plan::check_source(std::path::Path::new("g.vp"), text, &[]);
    let errors: Vec<(String, usize)> = result
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| {
            let line = d
                .labels
                .first()
                .map(|l| text[..l.span.start as usize].lines().count())
                .unwrap_or(0);
            (d.message.clone(), line)
        })
        .collect();
    assert_eq!(errors.len(), 3, "{errors:#?}");
    for ((message, line), expected_line) in errors.iter().zip([2, 3, 4]) {
        assert!(
            message.starts_with("this grammar cannot be compiled"),
            "{message}"
        );
        assert_eq!(*line, expected_line, "{message}");
    }
}

/// Issue 14 item 8: a file that is plainly not a pipeline is refused at once, saying what it
/// looks like, instead of a syntax error at 1:1 (a 5 MB CSV used to print nothing for minutes).
#[test]
fn regression_issue14_files_that_are_not_pipelines_are_refused_with_a_hint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let hint = "pass the pipeline file (`.vp` text); data files are named inside it, e.g. `source = csv(\"pets.csv\")`";
    let mut csv = String::from("image,label\n");
    for i in 0..20_000 {
        csv.push_str(&format!("photos/{i}.jpg,cat\n"));
    }
    let cases: [(&str, Vec<u8>, String); 4] = [
        (
            "pets.csv",
            csv.into_bytes(),
            "its first line looks like a table header (`image,label`)".to_owned(),
        ),
        (
            "pets.tsv",
            b"// exported\nimage\tlabel\nphotos/1.jpg\tcat\n".to_vec(),
            "its first line looks like a table header (`image\tlabel`)".to_owned(),
        ),
        (
            "photo.png",
            b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec(),
            "it is binary (a NUL byte at offset 8)".to_owned(),
        ),
        (
            "latin1.vp",
            b"labels l = [\"caf\xe9\"]\n".to_vec(),
            "it is not utf-8 text (an invalid byte at offset 16)".to_owned(),
        ),
    ];
    for (name, bytes, reason) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        let result = load_pipeline(&path, &[]);
        let lines: Vec<String> = result
            .diagnostics
            .iter()
            .map(|d| {
                format!(
                    "{}: {} | {}",
                    d.code,
                    d.message,
                    d.hint.as_deref().unwrap_or("")
                )
            })
            .collect();
        assert_eq!(
            lines,
            [format!(
                "not-a-pipeline: `{}` is not a pipeline file: {reason} | {hint}",
                path.display()
            )],
            "{name}"
        );
    }
    // Imported, the same refusal points at the import.
    std::fs::write(dir.path().join("main.vp"), "import \"pets.csv\"\n").expect("write");
    let result = load_pipeline(&dir.path().join("main.vp"), &[]);
    assert_eq!(
        summarize(&result),
        [format!(
            "main.vp:1:8 error[not-a-pipeline] imported file `pets.csv` is not a pipeline file: its first line looks like a table header (`image,label`) | {hint}"
        )]
    );
}

/// A pipeline whose first line has commas is still a pipeline.
#[test]
fn declarations_with_commas_on_their_first_line_are_not_tables() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("one_line.vp");
    std::fs::write(
        &path,
        "labels animals = [\"cat\", \"dog\"]\nsplit s = stratified(d, train: 0.5, test: 0.5)\n",
    )
    .expect("write");
    let result = load_pipeline(&path, &[]);
    assert!(
        result
            .diagnostics
            .iter()
            .all(|d| d.code.as_str() != "not-a-pipeline"),
        "{}",
        render_diagnostics(&result, false)
    );
}

/// The presets check accepts are the ones the model stage builds, and no others.
#[test]
fn checked_presets_are_the_model_stages_presets() {
    use vlmpipe::stages::model::Preset;
    for name in vlmpipe::plan::params::MODEL_PRESETS {
        assert_eq!(Preset::parse(name).map(Preset::name).ok(), Some(*name));
    }
    assert!(Preset::parse("tiny2").is_err());
}
