//! `vlmpipe infer`: answer one question about one image, the way the LFM2-VL tutorial does,
//! optionally under an output grammar or with every label's exact probability.
//!
//! Resolve the model reference, load it as a [`ModelRunner`] (the one loading and prompting path
//! that evaluation uses too), decode the image, build the conversation (optional system turn,
//! then a user turn with the image first and the text second), and generate. Decoding settings
//! follow flag > `generation_config.json` > greedy. `--choice`/`--regex`/`--json-schema`/`--lark`
//! mask every step to the tokens that keep the answer valid; `--scores` scores every label exactly
//! instead (see `crate::decode` for how the two differ). A bad image, model or grammar is an error
//! (exit 1) naming what was wrong.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::Serialize;
use serde_json::{Value, json};

use crate::cli::Outcome;
use crate::cli::args::{DtypeArg, InferArgs};
use crate::decode::{Answer, AnswerParser, CompiledGrammar, GrammarSpec, LabelScorer, LabelScores};
use crate::model::chat::Conversation;
use crate::model::checkpoint::LoadOptions;
use crate::model::device::device_label;
use crate::model::generate::Sampling;
use crate::model::generation_config::GenerationConfig;
use crate::model::processor::decode_image;
use crate::model::resolve::{resolve_adapter_dir, resolve_model_dir};
use crate::runner::{DecodeOptions, ModelRunner};

/// Generated tokens when neither the flag nor `generation_config.json` says.
const DEFAULT_MAX_NEW_TOKENS: usize = 64;

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct InferReport {
    text: String,
    /// Generated ids only (the EOS id included when it ended the answer).
    token_ids: Vec<u32>,
    prompt_tokens: usize,
    image_tokens: usize,
    finish_reason: &'static str,
    /// Where the model ran (`cpu`, `cuda:0`, `metal:0`).
    device: String,
    /// The dtype it computed in.
    dtype: &'static str,
    /// The `--quant` the weights were quantized to at load (absent without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    quant: Option<&'static str>,
    /// The answer read back under the grammar (only with one).
    #[serde(skip_serializing_if = "Option::is_none")]
    answer: Option<Value>,
    /// Every label's probability (only with `--scores`).
    #[serde(skip_serializing_if = "Option::is_none")]
    scores: Option<LabelScores>,
    timings: Timings,
}

/// Milliseconds per step.
#[derive(Debug, Serialize)]
struct Timings {
    load_ms: f64,
    preprocess_ms: f64,
    vision_ms: f64,
    /// Compiling the grammar for the model's tokenizer (only with one).
    #[serde(skip_serializing_if = "Option::is_none")]
    grammar_ms: Option<f64>,
    /// Exact label scoring (only with `--scores`).
    #[serde(skip_serializing_if = "Option::is_none")]
    scores_ms: Option<f64>,
    prefill_ms: f64,
    decode_ms_per_token: Option<f64>,
    total_ms: f64,
}

/// Runs `vlmpipe infer`.
pub(crate) fn run(args: &InferArgs) -> anyhow::Result<Outcome> {
    let total = Instant::now();
    // Grammar files are read before the model loads, so a typo fails in milliseconds.
    let spec = grammar_spec(args)?;
    let dir = resolve_model_dir(&args.model)?;
    let generation = GenerationConfig::from_model_dir(&dir)?;
    let device = crate::cli::open_device(&args.device)?;
    let t = Instant::now();
    let adapter = args
        .adapter
        .as_deref()
        .map(resolve_adapter_dir)
        .transpose()?;
    let options = LoadOptions {
        dtype: args.dtype.to_candle(),
        device,
    };
    let runner = match args.quant {
        None => ModelRunner::load_with_adapter(&dir, adapter.as_deref(), &options)?,
        Some(quant) => {
            let (runner, report) =
                ModelRunner::load_quantized(&dir, adapter.as_deref(), &options, quant)?;
            for line in report.fallback_lines() {
                eprintln!("note: `--quant {quant}`: {line}");
            }
            runner
        }
    };
    let load = t.elapsed();

    let t = Instant::now();
    let grammar = match &spec {
        Some(spec) => {
            let compiled = CompiledGrammar::compile(spec, runner.vocab())
                .context("the grammar cannot be used")?;
            for warning in compiled.warnings() {
                eprintln!("warning: grammar: {warning}");
            }
            // A budget no answer fits is refused before the image is even read (label scores
            // alone generate nothing).
            if !args.scores || args.json || args.dump_logits.is_some() {
                compiled.check_budget(decode_options(args, &generation).max_new_tokens)?;
            }
            Some(Arc::new(compiled))
        }
        None => None,
    };
    let grammar_time = grammar.as_ref().map(|_| t.elapsed());

    let image = read_image(&args.image)?;
    let conversation = Conversation::image_question(args.system.as_deref(), &args.prompt);
    let prompt = runner
        .prepare(&conversation, std::slice::from_ref(&image))
        .with_context(|| format!("cannot prepare the prompt for `{}`", args.image.display()))?;

    let t = Instant::now();
    let scores = match (&grammar, args.scores) {
        (Some(grammar), true) => {
            let scorer = LabelScorer::new(grammar, None).context("cannot score labels")?;
            Some(
                runner
                    .score_labels(&prompt, &scorer)
                    .context("label scoring failed")?,
            )
        }
        (None, true) => anyhow::bail!("`--scores` needs `--choice` or `--json-schema`"),
        (_, false) => None,
    };
    let scores_time = scores.as_ref().map(|_| t.elapsed());

    // Scoring alone answers the question; generate only when something else asks for it.
    if let Some(scores) = &scores
        && !args.json
        && args.dump_logits.is_none()
    {
        println!("{}", serde_json::to_string_pretty(scores)?);
        return Ok(Outcome::Success);
    }

    let options = decode_options(args, &generation);
    let run = runner
        .generate_with_details(&[&prompt], &options, grammar.as_ref())
        .context("generation failed")?;
    let Some(answer) = run.answers.first() else {
        anyhow::bail!("generation returned no answer");
    };
    if let Some(path) = &args.dump_logits {
        dump_logits(&run.prompt_logits, path)?;
    }
    if let Some(scores) = &scores
        && !args.json
    {
        println!("{}", serde_json::to_string_pretty(scores)?);
        return Ok(Outcome::Success);
    }

    if args.json {
        let parsed = grammar.as_ref().map(|g| {
            answer_json(&AnswerParser::for_grammar(g.spec(), None, None).parse(&answer.text))
        });
        let report = InferReport {
            text: answer.text.clone(),
            token_ids: answer
                .tokens
                .iter()
                .copied()
                .chain(answer.eos_token)
                .collect(),
            prompt_tokens: prompt.inputs.input_ids.len(),
            image_tokens: prompt.inputs.num_image_tokens(),
            finish_reason: if answer.stopped_at_eos {
                "eos"
            } else {
                "length"
            },
            device: device_label(runner.device()),
            dtype: dtype_name(args.dtype),
            quant: args.quant.map(|q| q.name()),
            answer: parsed,
            scores,
            timings: Timings {
                load_ms: ms(load),
                preprocess_ms: ms(prompt.encode_time.saturating_sub(prompt.vision_time)),
                vision_ms: ms(prompt.vision_time),
                grammar_ms: grammar_time.map(ms),
                scores_ms: scores_time.map(ms),
                prefill_ms: ms(run.prefill),
                decode_ms_per_token: mean_ms(&run.step_times),
                total_ms: ms(total.elapsed()),
            },
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", answer.text.trim());
    }
    Ok(Outcome::Success)
}

/// The grammar the flags ask for, with its files read and parsed (clap keeps them exclusive).
fn grammar_spec(args: &InferArgs) -> anyhow::Result<Option<GrammarSpec>> {
    if let Some(labels) = &args.choice {
        // `--choice "cat, dog"` means the labels `cat` and `dog`.
        let labels: Vec<String> = labels.iter().map(|l| l.trim().to_string()).collect();
        return Ok(Some(GrammarSpec::choice(labels)));
    }
    if let Some(regex) = &args.regex {
        return Ok(Some(GrammarSpec::Regex(regex.clone())));
    }
    if let Some(path) = &args.json_schema {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the JSON Schema `{}`", path.display()))?;
        let schema: Value = serde_json::from_str(&text)
            .with_context(|| format!("`{}` is not valid JSON", path.display()))?;
        return Ok(Some(GrammarSpec::JsonSchema(schema)));
    }
    if let Some(path) = &args.lark {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the Lark grammar `{}`", path.display()))?;
        return Ok(Some(GrammarSpec::Lark(text)));
    }
    Ok(None)
}

fn read_image(path: &Path) -> anyhow::Result<RgbImage> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read image `{}`", path.display()))?;
    decode_image(&bytes).with_context(|| format!("bad image `{}`", path.display()))
}

/// Flag > `generation_config.json` > greedy with [`DEFAULT_MAX_NEW_TOKENS`].
fn decode_options(args: &InferArgs, file: &GenerationConfig) -> DecodeOptions {
    // transformers samples only with `do_sample: true`; a bare temperature in the file is inert.
    let file_temperature = match file.do_sample {
        Some(true) => file.temperature.unwrap_or(1.0),
        _ => 0.0,
    };
    DecodeOptions {
        max_new_tokens: args
            .max_new_tokens
            .or(file.max_new_tokens)
            .unwrap_or(DEFAULT_MAX_NEW_TOKENS),
        sampling: Sampling {
            temperature: args.temperature.unwrap_or(file_temperature),
            top_p: args.top_p.or(file.top_p),
            min_p: args.min_p.or(file.min_p),
            repetition_penalty: args.repetition_penalty.or(file.repetition_penalty),
            seed: args.seed,
        },
    }
}

/// The parsed answer as `--json` prints it: `valid`, then the label (with its index and, for
/// JSON answers, every field), the JSON value, the free text, or why it is invalid.
fn answer_json(answer: &Answer) -> Value {
    match answer {
        Answer::Label {
            label,
            index,
            fields,
        } => json!({ "valid": true, "label": label, "index": index, "fields": fields }),
        Answer::Json(value) => json!({ "valid": true, "json": value }),
        Answer::Text(text) => json!({ "valid": true, "text": text }),
        Answer::Invalid { raw, reason } => {
            json!({ "valid": false, "raw": raw, "reason": reason.to_string() })
        }
    }
}

/// Writes `[1, vocab]` (or `[vocab]`) logits as safetensors tensor `logits`, f32 `[vocab]`.
fn dump_logits(logits: &Tensor, path: &Path) -> anyhow::Result<()> {
    // To the host first: the file is written from CPU memory whatever device computed it.
    let logits = logits
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?;
    let tensors = HashMap::from([("logits".to_string(), logits)]);
    candle_core::safetensors::save(&tensors, path)
        .with_context(|| format!("cannot write logits to `{}`", path.display()))
}

fn dtype_name(dtype: DtypeArg) -> &'static str {
    dtype.name()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mean_ms(steps: &[Duration]) -> Option<f64> {
    (!steps.is_empty()).then(|| steps.iter().map(|d| ms(*d)).sum::<f64>() / steps.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::InvalidReason;

    #[test]
    fn answers_print_what_they_hold() {
        let label = Answer::Label {
            label: "dog".into(),
            index: 1,
            fields: serde_json::Map::new(),
        };
        assert_eq!(
            answer_json(&label),
            json!({"valid": true, "label": "dog", "index": 1, "fields": {}})
        );
        let invalid = Answer::Invalid {
            raw: "pug".into(),
            reason: InvalidReason::NotALabel,
        };
        assert_eq!(
            answer_json(&invalid),
            json!({"valid": false, "raw": "pug", "reason": "not one of the labels"})
        );
        assert_eq!(
            answer_json(&Answer::Text("42".into())),
            json!({"valid": true, "text": "42"})
        );
    }
}
