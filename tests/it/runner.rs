//! The model runner: grammar-constrained generation and exact label scoring on a tiny
//! transformers-made checkpoint (committed fixture, no ../shared needed).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Tensor;
use vlmpipe::decode::{CompiledGrammar, GrammarSpec, LabelScorer, log_softmax};
use vlmpipe::model::chat::Conversation;
use vlmpipe::model::checkpoint::LoadOptions;
use vlmpipe::model::generate::Sampling;
use vlmpipe::model::lfm2_vl::LogitsMode;
use vlmpipe::runner::{DecodeOptions, ModelRunner, PreparedPrompt};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference")
        .join(rel)
}

fn runner_and_prompt() -> (ModelRunner, PreparedPrompt) {
    let runner =
        ModelRunner::load(&fixture("checkpoints/tiny-thumb"), &LoadOptions::default()).unwrap();
    let image = image::open(fixture("images/tiny_40x30.png"))
        .unwrap()
        .to_rgb8();
    let conversation = Conversation::image_question(Some("Answer briefly."), "Cat or dog?");
    let prompt = runner.prepare(&conversation, &[image]).unwrap();
    (runner, prompt)
}

const LABELS: [&str; 4] = ["cat", "catamaran", "dog", "red circle"];

fn choice(runner: &ModelRunner) -> Arc<CompiledGrammar> {
    let spec = GrammarSpec::Choice {
        labels: LABELS.iter().map(|s| s.to_string()).collect(),
    };
    Arc::new(CompiledGrammar::compile(&spec, runner.vocab()).unwrap())
}

#[test]
fn constrained_answers_are_always_labels() {
    let (runner, prompt) = runner_and_prompt();
    let grammar = choice(&runner);
    for seed in 0..12 {
        let options = DecodeOptions {
            max_new_tokens: 16,
            sampling: Sampling {
                temperature: if seed == 0 { 0.0 } else { 1.5 },
                top_p: None,
                min_p: None,
                repetition_penalty: None,
                seed,
            },
        };
        let answers = runner
            .generate(&[&prompt, &prompt], &options, Some(&grammar))
            .unwrap();
        for answer in answers {
            assert!(
                LABELS.contains(&answer.text.as_str()),
                "seed {seed}: `{}` is not a label",
                answer.text
            );
            assert!(
                answer.stopped_at_eos,
                "seed {seed}: grammar should end the answer"
            );
        }
    }
}

#[test]
fn label_scores_equal_a_full_forward_of_each_answer() {
    let (runner, prompt) = runner_and_prompt();
    let grammar = choice(&runner);
    let scorer = LabelScorer::new(&grammar, None).unwrap();
    let scores = runner.score_labels(&prompt, &scorer).unwrap();
    assert_eq!(scores.labels, LABELS);
    let total: f64 = scores.probs.iter().sum();
    assert!((total - 1.0).abs() < 1e-9, "probabilities sum to {total}");

    // Brute force: the whole prompt + answer through the model without any cache reuse.
    let model = runner.model();
    for (label, answer) in scorer.answers().iter().enumerate() {
        let mut ids = prompt.inputs.input_ids.clone();
        ids.extend_from_slice(answer);
        let input = Tensor::from_slice(&ids, (1, ids.len()), model.device()).unwrap();
        let mut cache = model.new_cache(1);
        let logits = model
            .forward(
                &input,
                prompt.image_features.as_ref(),
                None,
                &mut cache,
                LogitsMode::All,
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let start = prompt.inputs.input_ids.len();
        let expected: f64 = answer
            .iter()
            .enumerate()
            .map(|(i, &token)| f64::from(log_softmax(&logits[start + i - 1])[token as usize]))
            .sum();
        let got = scores.logprobs[label];
        assert!(
            (got - expected).abs() < 1e-3,
            "`{}`: cached scoring {got} vs full forward {expected}",
            LABELS[label]
        );
    }
}

mod eval_job {
    use super::*;
    use vlmpipe::decode::AnswerParser;
    use vlmpipe::stages::eval::run::{AnswerMode, EvalJob, EvalSample, SampleImage};

    fn samples() -> Vec<EvalSample> {
        let image = image::open(fixture("images/tiny_40x30.png"))
            .unwrap()
            .to_rgb8();
        let conversation = Conversation::image_question(None, "Cat or dog?");
        let mut samples: Vec<EvalSample> = (0..3)
            .map(|i| EvalSample {
                row_id: format!("row:{i}"),
                image_id: format!("img{i}"),
                ground_truth: if i % 2 == 0 { "cat" } else { "dog" }.to_owned(),
                image: SampleImage::Decoded(image.clone()),
                decode_ms: 0.0,
                conversation: conversation.clone(),
            })
            .collect();
        samples.push(EvalSample {
            row_id: "row:broken".to_owned(),
            image_id: "broken".to_owned(),
            ground_truth: "dog".to_owned(),
            image: SampleImage::Failed("truncated JPEG".to_owned()),
            decode_ms: 0.0,
            conversation,
        });
        samples
    }

    fn labels() -> Vec<String> {
        LABELS.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn constrained_eval_records_every_sample_and_counts_bad_images_as_invalid() {
        let runner =
            ModelRunner::load(&fixture("checkpoints/tiny-thumb"), &LoadOptions::default()).unwrap();
        let labels = labels();
        let job = EvalJob {
            runner: &runner,
            labels: &labels,
            parser: AnswerParser::choice(labels.clone()),
            mode: AnswerMode::Generate {
                options: DecodeOptions {
                    max_new_tokens: 8,
                    sampling: Sampling::default(),
                },
                grammar: Some(choice(&runner)),
            },
            batch_size: 2,
        };
        let mut done = 0;
        let records = job.run(samples(), |n| done += n).unwrap();
        assert_eq!(done, 4);
        assert_eq!(records.len(), 4);
        for record in &records[..3] {
            assert!(record.valid, "{record:?}");
            assert_eq!(
                record.correct,
                record.parsed_label.as_deref() == Some(record.ground_truth.as_str())
            );
        }
        let broken = &records[3];
        assert!(!broken.valid && !broken.correct);
        assert_eq!(broken.raw_output, "<image error: truncated JPEG>");
        // Batches [0, 1] and [2, broken]: the broken image never reached the model.
        let shared: Vec<u32> = records.iter().map(|r| r.batch_size).collect();
        assert_eq!(shared, [2, 2, 1, 0]);
        // Identical inputs give identical answers whatever the batch they fell into.
        assert_eq!(records[0].raw_output, records[2].raw_output);
    }

    #[test]
    fn a_sampled_answer_depends_on_its_row_not_on_the_batching() {
        let runner =
            ModelRunner::load(&fixture("checkpoints/tiny-thumb"), &LoadOptions::default()).unwrap();
        let labels = labels();
        let job = |batch_size| EvalJob {
            runner: &runner,
            labels: &labels,
            parser: AnswerParser::choice(labels.clone()),
            mode: AnswerMode::Generate {
                options: DecodeOptions {
                    max_new_tokens: 12,
                    sampling: Sampling {
                        temperature: 1.5,
                        seed: 5,
                        ..Sampling::default()
                    },
                },
                grammar: None,
            },
            batch_size,
        };
        let answers = |batch_size| -> Vec<(String, String)> {
            job(batch_size)
                .run(samples(), |_| {})
                .unwrap()
                .into_iter()
                .map(|r| (r.row_id, r.raw_output))
                .collect()
        };
        let one_by_one = answers(1);
        assert_eq!(answers(3), one_by_one);
        assert_eq!(answers(4), one_by_one);
        // The same image and prompt in other rows: other streams, so the answers differ
        // (12 tokens at temperature 1.5 from a 1024-token vocabulary).
        assert_ne!(one_by_one[0].1, one_by_one[2].1);
    }

    #[test]
    fn scored_eval_gives_a_distribution_and_its_argmax() {
        let runner =
            ModelRunner::load(&fixture("checkpoints/tiny-thumb"), &LoadOptions::default()).unwrap();
        let labels = labels();
        let grammar = choice(&runner);
        let job = EvalJob {
            runner: &runner,
            labels: &labels,
            parser: AnswerParser::choice(labels.clone()),
            mode: AnswerMode::ScoreLabels {
                scorer: LabelScorer::new(&grammar, None).unwrap(),
            },
            batch_size: 4,
        };
        let records = job.run(samples(), |_| {}).unwrap();
        for record in &records[..3] {
            let probs = record.class_probs.as_ref().unwrap();
            let total: f32 = probs.iter().sum();
            assert!((total - 1.0).abs() < 1e-4);
            let best = probs
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            assert_eq!(record.parsed_label.as_deref(), Some(LABELS[best]));
        }
        assert!(records[3].class_probs.is_none());
    }
}

#[test]
fn ids_past_the_tokenizer_decode_without_failing() {
    // A random model's embedding has more rows than the tokenizer has entries.
    let (runner, _) = runner_and_prompt();
    let size = runner.processor().tokenizer().get_vocab_size(true) as u32;
    let known = runner.decode_text(&[size - 100, size - 99]);
    assert!(!known.is_empty());
    assert_eq!(
        runner.decode_text(&[size - 100, size, size + 7, size - 99]),
        known
    );
    assert_eq!(runner.decode_text(&[size + 1]), "");
}

/// Copies the `tiny-thumb` checkpoint into `dir`.
fn copy_checkpoint(dir: &std::path::Path) {
    for entry in std::fs::read_dir(fixture("checkpoints/tiny-thumb")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
}

/// A copy of the `tiny-thumb` checkpoint whose special tokens sit at other ids: each pair of
/// `swaps` trades places in the tokenizer (and its config), and the model configs follow.
fn checkpoint_with_swapped_ids(dir: &std::path::Path, swaps: &[(u32, u32)]) {
    copy_checkpoint(dir);
    let swap = |id: u64| -> u64 {
        for &(a, b) in swaps {
            if id == u64::from(a) {
                return u64::from(b);
            }
            if id == u64::from(b) {
                return u64::from(a);
            }
        }
        id
    };
    let edit = |name: &str, change: &dyn Fn(&mut serde_json::Value)| {
        let path = dir.join(name);
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        change(&mut json);
        std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    };
    edit("tokenizer.json", &|t| {
        for token in t["added_tokens"].as_array_mut().unwrap() {
            token["id"] = swap(token["id"].as_u64().unwrap()).into();
        }
        for (_, id) in t["model"]["vocab"].as_object_mut().unwrap() {
            *id = swap(id.as_u64().unwrap()).into();
        }
    });
    edit("tokenizer_config.json", &|c| {
        let decoder = c["added_tokens_decoder"].as_object().unwrap().clone();
        let moved: serde_json::Map<String, serde_json::Value> = decoder
            .into_iter()
            .map(|(id, token)| (swap(id.parse().unwrap()).to_string(), token))
            .collect();
        c["added_tokens_decoder"] = moved.into();
    });
    edit("config.json", &|c| {
        c["image_token_id"] = swap(c["image_token_id"].as_u64().unwrap()).into();
        if let Some(text) = c.get_mut("text_config") {
            for key in ["eos_token_id", "bos_token_id", "pad_token_id"] {
                if let Some(id) = text.get(key).and_then(|v| v.as_u64()) {
                    text[key] = swap(id).into();
                }
            }
        }
    });
    edit("generation_config.json", &|g| {
        for key in ["eos_token_id", "bos_token_id", "pad_token_id"] {
            if let Some(id) = g.get(key).and_then(|v| v.as_u64()) {
                g[key] = swap(id).into();
            }
        }
    });
}

#[test]
fn special_tokens_are_found_by_their_strings_not_their_usual_ids() {
    // `<|im_end|>` 7, `<image>` 396, `<|img_row_1_col_1|>` 397, `<|img_thumbnail|>` 497,
    // `<|image_start|>` 498, `<|image_end|>` 499, `<|pad|>` 0, `<|startoftext|>` 1: each traded
    // with an ordinary token.
    let swaps = [
        (7, 900),
        (396, 901),
        (397, 902),
        (497, 903),
        (498, 904),
        (499, 905),
        (0, 906),
        (1, 907),
    ];
    let moved = tempfile::tempdir().unwrap();
    checkpoint_with_swapped_ids(moved.path(), &swaps);
    let usual =
        ModelRunner::load(&fixture("checkpoints/tiny-thumb"), &LoadOptions::default()).unwrap();
    let swapped = ModelRunner::load(moved.path(), &LoadOptions::default()).unwrap();
    let swap = |id: u32| {
        swaps
            .iter()
            .find_map(|&(a, b)| (id == a).then_some(b).or((id == b).then_some(a)))
            .unwrap_or(id)
    };

    // A tiled image (row/column markers, a thumbnail) and a system turn.
    let image = image::open(fixture("images/wide_1500x500.png"))
        .unwrap()
        .to_rgb8();
    let conversation = Conversation::image_question(Some("Be brief."), "Cat or dog?");
    let a = usual
        .prepare(&conversation, std::slice::from_ref(&image))
        .unwrap();
    let b = swapped
        .prepare(&conversation, std::slice::from_ref(&image))
        .unwrap();
    assert!(
        a.inputs.text.contains("<|img_row_1_col_1|>"),
        "{}",
        a.inputs.text
    );
    assert!(
        a.inputs.text.contains("<|img_thumbnail|>"),
        "{}",
        a.inputs.text
    );
    assert_eq!(a.inputs.text, b.inputs.text);
    let mapped: Vec<u32> = a.inputs.input_ids.iter().map(|&t| swap(t)).collect();
    assert_eq!(b.inputs.input_ids, mapped);
    assert_eq!(b.inputs.image_token_id, 901);
    let image_tokens = |ids: &[u32], id| ids.iter().filter(|&&t| t == id).count();
    assert_eq!(
        image_tokens(&b.inputs.input_ids, 901),
        image_tokens(&a.inputs.input_ids, 396)
    );
    assert!(image_tokens(&a.inputs.input_ids, 396) > 0);
    // Generation stops at `<|im_end|>` wherever it is; padding uses `<|pad|>`.
    let eos: Vec<u32> = usual.eos_token_ids().iter().map(|&t| swap(t)).collect();
    assert_eq!(swapped.eos_token_ids(), eos.as_slice());
    assert_eq!(swapped.pad_token_id(), swap(usual.pad_token_id()));
    // Decoding skips the moved special tokens as it skipped them at their usual ids.
    assert_eq!(
        swapped.decode_text(&[904, 905, 900]),
        usual.decode_text(&[498, 499, 7])
    );
}

/// `tiny-thumb` with `config.json` edited by `change`.
fn checkpoint_with_config(dir: &std::path::Path, change: impl Fn(&mut serde_json::Value)) {
    copy_checkpoint(dir);
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    change(&mut config);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

#[test]
fn vision_feature_layer_runs_that_many_encoder_layers() {
    // `-2`: the features after all but the last encoder layer (then post_layernorm), which is
    // what a tower one layer shorter computes with the same weights.
    let (penultimate, shorter) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    checkpoint_with_config(penultimate.path(), |c| {
        c["vision_feature_layer"] = (-2).into()
    });
    checkpoint_with_config(shorter.path(), |c| {
        let layers = c["vision_config"]["num_hidden_layers"].as_i64().unwrap();
        c["vision_config"]["num_hidden_layers"] = (layers - 1).into();
    });
    let image = image::open(fixture("images/photo_512x384.png"))
        .unwrap()
        .to_rgb8();
    let conversation = Conversation::image_question(None, "Cat or dog?");
    let features = |dir: &std::path::Path| -> Tensor {
        let runner = ModelRunner::load(dir, &LoadOptions::default()).unwrap();
        runner
            .prepare(&conversation, std::slice::from_ref(&image))
            .unwrap()
            .image_features
            .unwrap()
    };
    let last = features(&fixture("checkpoints/tiny-thumb"));
    let at_penultimate = features(penultimate.path());
    let of_shorter = features(shorter.path());
    let diff = crate::support::max_abs_diff;
    assert_eq!(diff(&at_penultimate, &of_shorter), 0.0);
    assert!(
        diff(&at_penultimate, &last) > 1e-3,
        "the last layer was run"
    );
}
