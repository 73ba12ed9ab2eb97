//! `vlmpipe infer` with output grammars (`--choice`, `--regex`, `--json-schema`, `--lark`) and
//! exact label scores (`--scores`), on the committed random-weight tiny checkpoint: every
//! constrained answer is valid whatever the seed or temperature, the scores are the runner's own,
//! and a bad grammar is a readable exit 1, not a hang or a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use vlmpipe::decode::{CompiledGrammar, GrammarSpec, LabelScorer, log_softmax};
use vlmpipe::model::chat::Conversation;
use vlmpipe::model::checkpoint::LoadOptions;
use vlmpipe::model::processor::decode_image;
use vlmpipe::runner::ModelRunner;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const LABELS: [&str; 4] = ["cat", "catamaran", "dog", "red circle"];
const PROMPT: &str = "Cat or dog?";
const SYSTEM: &str = "Answer briefly.";

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference")
        .join(rel)
}

fn model() -> PathBuf {
    fixture("checkpoints/tiny-thumb")
}

fn image() -> PathBuf {
    fixture("images/tiny_40x30.png")
}

/// `vlmpipe infer` on the tiny model and image with `extra` flags, offline.
fn infer(extra: &[&str]) -> Result<Output, std::io::Error> {
    let cache = tempfile::tempdir()?;
    let model = model();
    let image = image();
    let mut args: Vec<&str> = vec![
        "infer",
        "--model",
        model.to_str().unwrap_or_default(),
        "--image",
        image.to_str().unwrap_or_default(),
        "--system",
        SYSTEM,
        "--prompt",
        PROMPT,
    ];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_vlmpipe"))
        .args(&args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", cache.path())
        .output()
}

/// Runs `infer` expecting success and parses stdout as JSON.
fn infer_json(extra: &[&str]) -> Result<Value, Box<dyn std::error::Error>> {
    let out = infer(extra)?;
    assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn choice_answers_are_labels_for_every_seed_and_temperature() -> TestResult {
    let choice = LABELS.join(",");
    for temperature in ["0", "0.7", "1.5"] {
        for seed in ["0", "1", "2"] {
            let report = infer_json(&[
                "--choice",
                &choice,
                "--json",
                "--temperature",
                temperature,
                "--seed",
                seed,
                "--max-new-tokens",
                "16",
            ])?;
            let case = format!("temperature {temperature}, seed {seed}");
            let text = report["text"].as_str().ok_or("no text")?;
            assert!(LABELS.contains(&text), "{case}: `{text}` is not a label");
            assert_eq!(report["finish_reason"], "eos", "{case}");
            let answer = &report["answer"];
            assert_eq!(answer["valid"], true, "{case}: {answer}");
            assert_eq!(answer["label"], text, "{case}");
            let index = answer["index"].as_u64().ok_or("no index")? as usize;
            assert_eq!(LABELS[index], text, "{case}");
        }
    }
    Ok(())
}

#[test]
fn regex_and_lark_constrain_the_whole_answer() -> TestResult {
    for seed in ["0", "5", "9"] {
        let out = infer(&[
            "--regex",
            "[0-9]{3}",
            "--temperature",
            "1.5",
            "--seed",
            seed,
        ])?;
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8(out.stdout)?;
        let text = text.trim_end();
        assert!(
            text.len() == 3 && text.bytes().all(|b| b.is_ascii_digit()),
            "seed {seed}: `{text}` is not three digits"
        );
    }

    let dir = tempfile::tempdir()?;
    let lark = dir.path().join("yes_no.lark");
    std::fs::write(&lark, "start: \"yes\" | \"no\" | \"not sure\"\n")?;
    for seed in ["0", "3"] {
        let report = infer_json(&[
            "--lark",
            lark.to_str().unwrap_or_default(),
            "--json",
            "--temperature",
            "1.2",
            "--seed",
            seed,
        ])?;
        let text = report["text"].as_str().ok_or("no text")?;
        assert!(["yes", "no", "not sure"].contains(&text), "`{text}`");
        // Lark answers have no label set: the parsed answer is the text itself.
        assert_eq!(report["answer"]["text"], text);
    }
    Ok(())
}

#[test]
fn json_schema_answers_parse_into_the_label_field() -> TestResult {
    let dir = tempfile::tempdir()?;
    let schema = dir.path().join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object",
            "properties": {"pred_class": {"type": "string", "enum": ["cat", "dog"]}},
            "required": ["pred_class"], "additionalProperties": false}"#,
    )?;
    let schema = schema.to_str().unwrap_or_default();
    for seed in ["0", "4"] {
        let report = infer_json(&[
            "--json-schema",
            schema,
            "--json",
            "--scores",
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "--max-new-tokens",
            "96",
        ])?;
        let text = report["text"].as_str().ok_or("no text")?;
        let parsed: Value = serde_json::from_str(text)?;
        let label = parsed["pred_class"].as_str().ok_or("no pred_class")?;
        assert!(["cat", "dog"].contains(&label), "`{text}`");
        assert_eq!(report["answer"]["label"], label);
        assert_eq!(report["answer"]["fields"]["pred_class"], label);
        let scores = &report["scores"];
        assert_eq!(scores["labels"], serde_json::json!(["cat", "dog"]));
        let total: f64 = probs(scores)?.iter().sum();
        assert!((total - 1.0).abs() < 1e-9, "probabilities sum to {total}");
    }
    Ok(())
}

/// A schema from a file gets compact whitespace by default: a random model given a small token
/// budget used to spend it on runs of tabs and newlines and never close the object.
#[test]
fn json_schema_answers_are_compact_and_parse_on_a_small_budget() -> TestResult {
    let dir = tempfile::tempdir()?;
    let schema = dir.path().join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type": "object",
            "properties": {"pred_class": {"type": "string", "enum": ["cat", "dog"]}},
            "required": ["pred_class"], "additionalProperties": false}"#,
    )?;
    let schema = schema.to_str().unwrap_or_default();
    for seed in ["0", "1", "2", "3", "4", "5"] {
        let report = infer_json(&[
            "--json-schema",
            schema,
            "--json",
            "--temperature",
            "1.5",
            "--seed",
            seed,
            "--max-new-tokens",
            "16",
        ])?;
        let text = report["text"].as_str().ok_or("no text")?;
        assert!(
            !text.chars().any(char::is_whitespace),
            "seed {seed}: whitespace in `{text:?}`"
        );
        let parsed: Value = serde_json::from_str(text)
            .map_err(|e| format!("seed {seed}: `{text:?}` does not parse: {e}"))?;
        assert!(parsed["pred_class"].is_string(), "seed {seed}: `{text}`");
        assert_eq!(report["answer"]["valid"], true, "seed {seed}: {report}");
    }
    Ok(())
}

/// A schema whose shortest answer takes several tokens, with a free string a random model
/// rambles in and an integer it can extend digit by digit.
const BUDGET_SCHEMA: &str = r#"{"type": "object",
    "properties": {"pred_class": {"type": "string", "enum": ["cat", "dog"]},
                   "note": {"type": "string"}, "score": {"type": "integer"}},
    "required": ["pred_class", "note", "score"], "additionalProperties": false}"#;

/// Whether `value` is valid against [`BUDGET_SCHEMA`].
fn valid_against_budget_schema(value: &Value) -> bool {
    let Some(object) = value.as_object() else {
        return false;
    };
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys == ["note", "pred_class", "score"]
        && ["cat", "dog"].contains(&object["pred_class"].as_str().unwrap_or_default())
        && object["note"].is_string()
        // JSON Schema's `integer` is any number without a fraction, however many digits: one
        // past u64 parses as an f64 here.
        && object["score"].as_f64().is_some_and(|f| f.fract() == 0.0)
}

/// The token count a too-small budget's error names: `… takes N tokens …`.
fn needed_tokens(err: &str) -> Option<usize> {
    let (_, rest) = err.split_once(" takes ")?;
    rest.split_once(" tokens")?.0.parse().ok()
}

/// Issue 14 item 11: an answer that runs into `--max-new-tokens` is closed in time, so it always
/// parses and is valid against the schema, whatever the budget (from the smallest that holds an
/// answer), seed or temperature; a budget no answer fits is refused before generating, naming
/// the tokens needed.
#[test]
fn regression_issue14_json_schema_answers_close_within_the_token_budget() -> TestResult {
    let dir = tempfile::tempdir()?;
    let schema = dir.path().join("schema.json");
    std::fs::write(&schema, BUDGET_SCHEMA)?;
    let schema = schema.to_str().unwrap_or_default();

    let out = infer(&["--json-schema", schema, "--max-new-tokens", "3"])?;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "a 3-token budget: {err}");
    assert!(out.stdout.is_empty(), "a 3-token budget printed an answer");
    let needed = needed_tokens(&err).ok_or_else(|| format!("no token count in: {err}"))?;
    assert!(needed > 3, "{err}");
    assert!(
        err.contains(&format!("allow at least {needed}")) && err.contains(r#"`{"pred_class":"#),
        "{err}"
    );
    // The minimum itself is enough.
    let just = needed.to_string();
    let out = infer(&["--json-schema", schema, "--max-new-tokens", &just])?;
    assert!(
        out.status.success(),
        "a {needed}-token budget: {}",
        stderr(&out)
    );

    let mut cut = 0;
    for budget in [needed, needed + 1, needed + 2, needed + 5, 2 * needed] {
        let budget = budget.to_string();
        for (temperature, seeds) in [
            ("0", &["0"][..]),
            ("1.0", &["0", "1", "2"]),
            ("1.5", &["3", "4", "5", "6"]),
        ] {
            for &seed in seeds {
                let report = infer_json(&[
                    "--json-schema",
                    schema,
                    "--json",
                    "--temperature",
                    temperature,
                    "--seed",
                    seed,
                    "--max-new-tokens",
                    &budget,
                ])?;
                let text = report["text"].as_str().ok_or("no text")?;
                let case = format!("budget {budget}, temperature {temperature}, seed {seed}");
                let parsed: Value = serde_json::from_str(text)
                    .map_err(|e| format!("{case}: `{text}` does not parse: {e}"))?;
                assert!(valid_against_budget_schema(&parsed), "{case}: `{text}`");
                assert_eq!(report["answer"]["valid"], true, "{case}: {report}");
                cut += usize::from(report["finish_reason"] == "length");
            }
        }
    }
    // The budgets are tight enough that some answers were closed by the budget, not by the model.
    assert!(
        cut > 0,
        "no answer ran into its budget: the test tests nothing"
    );
    Ok(())
}

/// Whether `text` matches `[a-z]+@[a-z]+\.com` in full.
fn is_address(text: &str) -> bool {
    let Some((user, host)) = text.split_once('@') else {
        return false;
    };
    let Some(domain) = host.strip_suffix(".com") else {
        return false;
    };
    let letters = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase());
    letters(user) && letters(domain)
}

/// The same for a regex: a random model writes letters until the budget runs out, so without
/// the forced close the answer lacked its `@domain.com`.
#[test]
fn regression_issue14_regex_answers_close_within_the_token_budget() -> TestResult {
    let regex = r"[a-z]+@[a-z]+\.com";
    let out = infer(&["--regex", regex, "--max-new-tokens", "2"])?;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let needed = needed_tokens(&err).ok_or_else(|| format!("no token count in: {err}"))?;
    for budget in [needed, needed + 1, needed + 3, 12] {
        let budget = budget.to_string();
        for seed in ["0", "1", "2", "3", "4", "5"] {
            let out = infer(&[
                "--regex",
                regex,
                "--temperature",
                "1.5",
                "--seed",
                seed,
                "--max-new-tokens",
                &budget,
            ])?;
            assert!(out.status.success(), "{}", stderr(&out));
            let text = String::from_utf8(out.stdout)?;
            let text = text.trim_end();
            assert!(
                is_address(text),
                "budget {budget}, seed {seed}: `{text}` does not match `{regex}`"
            );
        }
    }
    Ok(())
}

fn probs(scores: &Value) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    Ok(serde_json::from_value(scores["probs"].clone())?)
}

/// `--scores` prints exactly what `ModelRunner::score_labels` computes for the same prompt, and
/// the greedy constrained answer starts with the most likely token among the labels' first ones.
#[test]
fn scores_match_the_runner_and_the_greedy_answer() -> TestResult {
    let choice = LABELS.join(",");
    let out = infer(&["--choice", &choice, "--scores"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let scores: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(scores["labels"], serde_json::json!(LABELS));
    let cli_probs = probs(&scores)?;
    let total: f64 = cli_probs.iter().sum();
    assert!((total - 1.0).abs() < 1e-9, "probabilities sum to {total}");
    let best = scores["best"].as_u64().ok_or("no best")? as usize;
    let max = cli_probs.iter().copied().fold(f64::MIN, f64::max);
    assert_eq!(cli_probs[best], max, "best is the argmax");

    let runner = ModelRunner::load(&model(), &LoadOptions::default())?;
    let rgb = decode_image(&std::fs::read(image())?)?;
    let conversation = Conversation::image_question(Some(SYSTEM), PROMPT);
    let prompt = runner.prepare(&conversation, &[rgb])?;
    let grammar = std::sync::Arc::new(CompiledGrammar::compile(
        &GrammarSpec::choice(LABELS),
        runner.vocab(),
    )?);
    let scorer = LabelScorer::new(&grammar, None)?;
    let ours = runner.score_labels(&prompt, &scorer)?;
    for (cli, lib) in cli_probs.iter().zip(&ours.probs) {
        assert!((cli - lib).abs() < 1e-9, "cli {cli} vs runner {lib}");
    }
    assert_eq!(best, ours.best);

    // Greedy constrained decoding picks the best allowed first token; the labels' canonical
    // first tokens are all allowed, so none of them beats it.
    let dir = tempfile::tempdir()?;
    let logits_path = dir.path().join("logits.safetensors");
    let report = infer_json(&[
        "--choice",
        &choice,
        "--json",
        "--scores",
        "--dump-logits",
        logits_path.to_str().unwrap_or_default(),
    ])?;
    assert_eq!(
        probs(&report["scores"])?,
        cli_probs,
        "same scores with --json"
    );
    let bytes = std::fs::read(&logits_path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let logits: Vec<f32> = st
        .tensor("logits")?
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    let logp = log_softmax(&logits);
    let tokens: Vec<u32> = serde_json::from_value(report["token_ids"].clone())?;
    let chosen = *tokens.first().ok_or("no tokens")? as usize;
    for answer in scorer.answers() {
        let first = answer[0] as usize;
        assert!(
            logp[chosen] >= logp[first],
            "greedy took {chosen} over the label start {first}"
        );
    }
    // A label's score is its first token's log-probability plus that of the rest: never more.
    for (label, answer) in ours.logprobs.iter().zip(scorer.answers()) {
        assert!(*label <= f64::from(logp[answer[0] as usize]) + 1e-4);
    }
    Ok(())
}

#[test]
fn bad_grammars_exit_1_with_a_message() -> TestResult {
    let dir = tempfile::tempdir()?;
    let not_json = dir.path().join("not.json");
    std::fs::write(&not_json, "{ pred_class: ")?;
    let empty_enum = dir.path().join("empty.json");
    std::fs::write(&empty_enum, r#"{"type": "string", "enum": []}"#)?;
    let no_label = dir.path().join("number.json");
    std::fs::write(
        &no_label,
        r#"{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}"#,
    )?;
    let empty_lark = dir.path().join("empty.lark");
    std::fs::write(&empty_lark, "  \n")?;
    let missing = dir.path().join("missing.json");
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--regex".into(), "(".into()], "unclosed group"),
        (vec!["--choice".into(), ",".into()], "is empty"),
        (vec!["--choice".into(), "cat,cat".into()], "cat"),
        (
            vec!["--json-schema".into(), path(&not_json)],
            "not valid JSON",
        ),
        (vec!["--json-schema".into(), path(&missing)], "cannot read"),
        (
            vec!["--json-schema".into(), path(&empty_enum)],
            "never be satisfied",
        ),
        (vec!["--lark".into(), path(&empty_lark)], "empty"),
        (
            vec!["--json-schema".into(), path(&no_label), "--scores".into()],
            "cannot score labels",
        ),
    ];
    for (flags, expected) in cases {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let out = infer(&flags)?;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {err}");
        assert!(err.contains(expected), "{flags:?}: {err}");
        assert!(!err.contains("panicked"), "{flags:?}: {err}");
        assert!(out.stdout.is_empty(), "{flags:?} printed an answer");
    }

    // Two grammars at once, or scores without labels, are usage errors (clap's exit 2).
    for flags in [
        &["--choice", "a,b", "--regex", "a|b"][..],
        &["--regex", "a|b", "--scores"][..],
    ] {
        let out = infer(flags)?;
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", stderr(&out));
    }
    Ok(())
}
