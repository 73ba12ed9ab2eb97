//! The model runner: grammar-constrained generation and exact label scoring on a tiny
//! transformers-made checkpoint (committed fixture, no ../shared needed).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use vlmpipe::decode::{CompiledGrammar, GrammarSpec, LabelScorer, log_softmax};
use vlmpipe::model::chat::Conversation;
use vlmpipe::model::generate::Sampling;
use vlmpipe::model::lfm2_vl::LogitsMode;
use vlmpipe::runner::{DecodeOptions, ModelRunner, PreparedPrompt};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference")
        .join(rel)
}

fn runner_and_prompt() -> (ModelRunner, PreparedPrompt) {
    let runner = ModelRunner::load(&fixture("checkpoints/tiny-thumb"), DType::F32).unwrap();
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
