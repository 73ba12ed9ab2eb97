//! Output grammars with the real LFM2 tokenizer (from `../shared`, skipped when absent) and
//! seeded random "models": every constrained answer parses into the label set, masks stay inside
//! the tokenizer, canonical answers are accepted, and impossible grammars fail fast.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::support::shared_path;
use vlmpipe::decode::{
    Answer, AnswerParser, CAR_MAKERS, CompiledGrammar, DecodeError, FieldType, GrammarCache,
    GrammarSpec, JsonField, LabelScorer, PrefixScorer, Vocab, VocabConfig, Whitespace, answer_text,
    argmax, greedy_decode,
};

const TOKENIZER_SIZE: u32 = 64_400;
const MODEL_VOCAB: usize = 65_536;

/// The LFM2 tokenizer, loaded once per test binary.
fn vocab() -> Option<Arc<Vocab>> {
    static VOCAB: OnceLock<Option<Arc<Vocab>>> = OnceLock::new();
    VOCAB
        .get_or_init(|| {
            let path = shared_path("tokenizers/lfm2/tokenizer.json")?;
            let vocab = Vocab::from_tokenizer_file(&path, &VocabConfig::lfm2_vl())
                .expect("the shared LFM2 tokenizer loads");
            Some(Arc::new(vocab))
        })
        .clone()
}

fn cache() -> &'static GrammarCache {
    static CACHE: OnceLock<GrammarCache> = OnceLock::new();
    CACHE.get_or_init(GrammarCache::new)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// SplitMix64: deterministic, seedable, fast enough for 65,536 logits a step.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A random "model": logits drawn from a generator seeded by (seed, prefix), so the same prefix
/// always gets the same logits, like a real model with a fixed prompt.
struct RandomModel {
    seed: u64,
    calls: usize,
}

impl PrefixScorer for RandomModel {
    type Error = std::convert::Infallible;

    fn logits_after(&mut self, prefix: &[u32]) -> Result<Vec<f32>, Self::Error> {
        self.calls += 1;
        let mut state = self.seed;
        for &t in prefix {
            state ^= u64::from(t).wrapping_mul(0x2545_F491_4F6C_DD1D);
            splitmix(&mut state);
        }
        Ok((0..MODEL_VOCAB)
            .map(|_| (splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32 * 8.0)
            .collect())
    }
}

/// Samples at temperature 1 from the masked logits; checks every mask on the way.
fn sample_decode(
    grammar: &Arc<CompiledGrammar>,
    model: &mut RandomModel,
    rng: &mut u64,
    max_tokens: usize,
) -> (Vec<u32>, bool) {
    let mut c = grammar.constraint();
    for _ in 0..max_tokens {
        let mask = c.allowed_tokens().expect("a mask");
        check_mask(&mask);
        let mut logits = model.logits_after(c.tokens()).unwrap();
        mask.apply_to_logits(&mut logits);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut u = (splitmix(rng) >> 11) as f64 / (1u64 << 53) as f64 * total;
        let mut token = argmax(&logits).unwrap();
        for (i, w) in weights.iter().enumerate() {
            if *w > 0.0 {
                if u < *w {
                    token = i as u32;
                    break;
                }
                u -= w;
            }
        }
        c.commit(token).expect("an allowed token commits");
        if c.is_finished() {
            return (c.tokens().to_vec(), true);
        }
    }
    (c.tokens().to_vec(), false)
}

fn check_mask(mask: &vlmpipe::decode::TokenMask) {
    assert_eq!(mask.len(), MODEL_VOCAB);
    assert!(mask.count() > 0);
    for id in mask.allowed() {
        assert!(
            id < TOKENIZER_SIZE,
            "mask allows id {id} past the tokenizer"
        );
    }
}

/// Greedy and sampled decoding under `spec` for `seeds` random models: every answer ends with EOS
/// and parses into the label set. Returns the labels seen.
fn decode_many(
    spec: &GrammarSpec,
    label_field: Option<&str>,
    seeds: u64,
    max_tokens: usize,
) -> Vec<Answer> {
    let Some(vocab) = vocab() else {
        return Vec::new();
    };
    let grammar = cache().compile(spec, &vocab).expect("grammar compiles");
    let parser = AnswerParser::for_grammar(spec, label_field, None);
    let mut answers = Vec::new();
    for seed in 0..seeds {
        let mut model = RandomModel { seed, calls: 0 };
        let (tokens, done) =
            greedy_decode(&grammar, &mut model, max_tokens).expect("greedy decodes");
        assert!(
            done,
            "seed {seed}: greedy did not finish: {:?}",
            vocab.decode(&tokens)
        );
        let mut rng = seed ^ 0xDEAD_BEEF;
        let (sampled, sdone) = sample_decode(&grammar, &mut model, &mut rng, max_tokens);
        assert!(
            sdone,
            "seed {seed}: sampling did not finish: {:?}",
            vocab.decode(&sampled)
        );
        for toks in [tokens, sampled] {
            let text = vocab.decode(&toks);
            let answer = parser.parse(&text);
            assert!(
                matches!(answer, Answer::Label { .. }),
                "seed {seed}: `{text}` parsed as {answer:?}"
            );
            answers.push(answer);
        }
    }
    answers
}

fn labels_seen(answers: &[Answer]) -> std::collections::BTreeSet<String> {
    answers
        .iter()
        .filter_map(|a| a.label().map(str::to_string))
        .collect()
}

#[test]
fn cat_dog_choice_always_yields_a_label() {
    let spec = GrammarSpec::choice(["cat", "dog"]);
    let answers = decode_many(&spec, None, 40, 16);
    if answers.is_empty() {
        return;
    }
    assert_eq!(
        labels_seen(&answers).len(),
        2,
        "random models reach both labels"
    );
}

#[test]
fn prefix_pair_cat_catamaran_always_yields_a_label() {
    let spec = GrammarSpec::choice(["cat", "catamaran"]);
    let answers = decode_many(&spec, None, 40, 16);
    if answers.is_empty() {
        return;
    }
    assert_eq!(
        labels_seen(&answers).len(),
        2,
        "both the label and its extension occur"
    );
}

#[test]
fn spaces_unicode_and_multi_token_labels() {
    let labels = [
        "red circle",
        "blue square",
        "café",
        "日本",
        "listening_to_music",
        "Mercedes-Benz",
    ];
    let spec = GrammarSpec::choice(labels);
    let answers = decode_many(&spec, None, 40, 24);
    if answers.is_empty() {
        return;
    }
    assert!(labels_seen(&answers).len() >= 4);
    let vocab = vocab().unwrap();
    assert!(
        vocab.tokenize("listening_to_music").len() > 1,
        "the label spans several tokens"
    );
    assert!(!vocab.tokenize("日本").is_empty());
}

#[test]
fn forty_nine_car_makers() {
    let spec = GrammarSpec::choice(CAR_MAKERS);
    let answers = decode_many(&spec, None, 40, 16);
    if answers.is_empty() {
        return;
    }
    assert!(
        labels_seen(&answers).len() >= 10,
        "random models spread over the makers"
    );
}

fn nested_json_spec() -> GrammarSpec {
    let fields = [
        JsonField::required(
            "pred_class",
            FieldType::Enum(strings(&["cat", "dog", "bird"])),
        ),
        JsonField::required(
            "confidence",
            FieldType::Number {
                minimum: Some(0.0),
                maximum: Some(1.0),
            },
        ),
        JsonField::optional(
            "note",
            FieldType::String {
                max_len: Some(12),
                pattern: None,
            },
        ),
        JsonField::required(
            "tags",
            FieldType::Array {
                items: Box::new(FieldType::Enum(strings(&["indoor", "outdoor"]))),
                max_items: Some(3),
            },
        ),
        JsonField::required(
            "box",
            FieldType::Object(vec![
                JsonField::required(
                    "x",
                    FieldType::Integer {
                        minimum: Some(-500),
                        maximum: Some(5000),
                    },
                ),
                JsonField::required("visible", FieldType::Boolean),
            ]),
        ),
    ];
    GrammarSpec::json_object(&fields, Whitespace::Flexible).unwrap()
}

#[test]
fn nested_json_always_parses_with_its_fields() {
    let answers = decode_many(&nested_json_spec(), Some("pred_class"), 25, 400);
    for a in &answers {
        let Answer::Label { fields, .. } = a else {
            unreachable!()
        };
        let confidence = fields["confidence"].as_f64().expect("a number");
        assert!((0.0..=1.0).contains(&confidence), "{fields:?}");
        let x = fields["box"]["x"].as_i64().expect("an integer");
        assert!((-500..=5000).contains(&x));
        assert!(fields["tags"].as_array().is_some_and(|t| t.len() <= 3));
        assert!(fields["box"]["visible"].is_boolean());
        if let Some(note) = fields.get("note") {
            assert!(note.as_str().is_some_and(|n| n.chars().count() <= 12));
        }
        assert!(
            fields
                .keys()
                .all(|k| ["pred_class", "confidence", "note", "tags", "box"].contains(&k.as_str()))
        );
    }
}

/// Whether `text`'s canonical tokens and then EOS are accepted by `spec`.
fn accepts(spec: &GrammarSpec, text: &str) -> bool {
    let vocab = vocab().unwrap();
    let grammar = cache().compile(spec, &vocab).unwrap();
    let mut c = grammar.constraint();
    vocab
        .tokenize(text)
        .into_iter()
        .chain([vocab.eos()])
        .all(|t| c.commit(t).is_ok())
}

#[test]
fn json_whitespace_flexible_by_default_compact_on_request_and_for_raw_schemas() {
    if vocab().is_none() {
        return;
    }
    let fields = [JsonField::required(
        "pred_class",
        FieldType::Enum(strings(&["cat", "dog"])),
    )];
    let flexible = GrammarSpec::json_object(&fields, Whitespace::Flexible).unwrap();
    let compact = GrammarSpec::json_object(&fields, Whitespace::Compact).unwrap();
    for text in [
        r#"{"pred_class":"dog"}"#,
        r#"{"pred_class": "dog"}"#,
        "{\n  \"pred_class\": \"dog\"\n}",
    ] {
        assert!(accepts(&flexible, text), "flexible rejects {text}");
    }
    assert!(accepts(&compact, r#"{"pred_class":"dog"}"#));
    assert!(!accepts(&compact, r#"{"pred_class": "dog"}"#));
    assert!(!accepts(&flexible, r#"{"pred_class": "pug"}"#));
    assert!(!accepts(&flexible, r#"{"pred_class": "dog", "extra": 1}"#));
    // A raw JSON Schema (`infer --json-schema`) is compact unless it sets its own `x-guidance`.
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"pred_class": {"enum": ["cat", "dog"]}},
        "required": ["pred_class"],
        "additionalProperties": false
    });
    let raw = GrammarSpec::JsonSchema(schema.clone());
    assert!(!accepts(&raw, r#"{"pred_class": "cat"}"#));
    assert!(accepts(&raw, r#"{"pred_class":"cat"}"#));
    let mut own = schema;
    own["x-guidance"] = serde_json::json!({ "whitespace_flexible": true });
    let own = GrammarSpec::JsonSchema(own);
    assert!(accepts(&own, r#"{"pred_class": "cat"}"#));
}

#[test]
fn training_answers_are_accepted_by_their_grammar() {
    if vocab().is_none() {
        return;
    }
    let makers = strings(&CAR_MAKERS);
    let specs = [
        GrammarSpec::choice(makers.clone()),
        GrammarSpec::json_object(
            &[JsonField::required(
                "pred_class",
                FieldType::Enum(makers.clone()),
            )],
            Whitespace::Flexible,
        )
        .unwrap(),
        GrammarSpec::json_object(
            &[JsonField::required(
                "pred_class",
                FieldType::Enum(makers.clone()),
            )],
            Whitespace::Compact,
        )
        .unwrap(),
    ];
    for spec in &specs {
        let parser = AnswerParser::for_grammar(spec, Some("pred_class"), None);
        for label in &makers {
            let text = answer_text(spec, label, Some("pred_class")).unwrap();
            assert!(
                accepts(spec, &text),
                "{spec:?} rejects its own answer {text}"
            );
            assert_eq!(parser.parse(&text).label(), Some(label.as_str()));
        }
    }
    let odd = ["café", "日本", "red circle", "say \"hi\"", "a\\b", "x | y"];
    let spec = GrammarSpec::choice(odd);
    for label in odd {
        assert!(accepts(&spec, &answer_text(&spec, label, None).unwrap()));
    }
}

#[test]
fn other_grammar_kinds_constrain_too() {
    if vocab().is_none() {
        return;
    }
    let regex = GrammarSpec::Regex("(yes|no), [0-9]{1,2}".to_string());
    assert!(accepts(&regex, "yes, 42"));
    assert!(!accepts(&regex, "maybe, 4"));
    let lark = GrammarSpec::Lark(
        "start: animal \" \" count\nanimal: \"cat\" | \"dog\"\ncount: /[1-9]/\n".to_string(),
    );
    assert!(accepts(&lark, "dog 3"));
    assert!(!accepts(&lark, "dog 0"));
}

#[test]
fn impossible_grammars_are_errors_not_hangs() {
    let Some(vocab) = vocab() else { return };
    let cases: Vec<(&str, GrammarSpec)> = vec![
        ("empty labels", GrammarSpec::Choice { labels: vec![] }),
        ("blank label", GrammarSpec::choice(["cat", " "])),
        ("duplicate label", GrammarSpec::choice(["cat", "cat"])),
        (
            "contradictory schema",
            GrammarSpec::JsonSchema(
                serde_json::json!({"type": "integer", "minimum": 5, "maximum": 2}),
            ),
        ),
        (
            "conflicting types",
            GrammarSpec::JsonSchema(
                serde_json::json!({"allOf": [{"type": "string"}, {"type": "integer"}]}),
            ),
        ),
        (
            "empty regex class",
            GrammarSpec::Regex("[a&&b]".to_string()),
        ),
        ("empty regex", GrammarSpec::Regex(String::new())),
        (
            "bad lark",
            GrammarSpec::Lark("start: undefined_rule\n".to_string()),
        ),
        ("empty lark", GrammarSpec::Lark("  ".to_string())),
        (
            "schema not an object",
            GrammarSpec::JsonSchema(serde_json::json!(3)),
        ),
    ];
    for (what, spec) in cases {
        let start = Instant::now();
        let result = CompiledGrammar::compile(&spec, &vocab);
        let err = result.expect_err(what);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what} took {:?}",
            start.elapsed()
        );
        eprintln!("{what}: {err}");
        assert!(
            matches!(
                err,
                DecodeError::NoLabels
                    | DecodeError::BadLabel { .. }
                    | DecodeError::DuplicateLabel(_)
                    | DecodeError::Impossible { .. }
                    | DecodeError::Compile { .. }
            ),
            "{what}: {err:?}"
        );
    }
}

#[test]
fn constraint_rejects_disallowed_tokens_and_forces_eos() {
    let Some(vocab) = vocab() else { return };
    let grammar = cache()
        .compile(&GrammarSpec::choice(["cat", "dog"]), &vocab)
        .unwrap();
    let mut c = grammar.constraint();
    let pug = vocab.tokenize("pug");
    assert!(matches!(
        c.commit(pug[0]),
        Err(DecodeError::TokenNotAllowed { .. })
    ));
    assert!(matches!(
        c.commit(vocab.eos()),
        Err(DecodeError::TokenNotAllowed { .. })
    ));
    assert!(matches!(
        c.commit(65_000),
        Err(DecodeError::TokenNotAllowed { .. })
    ));
    for t in vocab.tokenize("dog") {
        c.commit(t).unwrap();
    }
    let mask = c.allowed_tokens().unwrap();
    assert_eq!(
        mask.allowed().collect::<Vec<_>>(),
        vec![vocab.eos()],
        "only EOS after a full label"
    );
    c.commit(vocab.eos()).unwrap();
    assert!(c.is_finished());
    assert!(matches!(c.allowed_tokens(), Err(DecodeError::Finished)));

    // After `cat` both EOS and the rest of `catamaran` are allowed.
    let grammar = cache()
        .compile(&GrammarSpec::choice(["cat", "catamaran"]), &vocab)
        .unwrap();
    let mut c = grammar.constraint();
    for t in vocab.tokenize("cat") {
        c.commit(t).unwrap();
    }
    let mask = c.allowed_tokens().unwrap();
    assert!(mask.is_allowed(vocab.eos()));
    assert!(mask.count() > 1);
}

#[test]
fn cache_compiles_once_per_spec_and_tokenizer() {
    let Some(vocab) = vocab() else { return };
    let cache = GrammarCache::new();
    let a = cache
        .compile(&GrammarSpec::choice(["cat", "dog"]), &vocab)
        .unwrap();
    let b = cache
        .compile(&GrammarSpec::choice(["cat", "dog"]), &vocab)
        .unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    let c = cache
        .compile(&GrammarSpec::choice(["dog", "cat"]), &vocab)
        .unwrap();
    assert!(!Arc::ptr_eq(&a, &c));
    assert_eq!(cache.len(), 2);
}

#[test]
fn unconstrained_answers_outside_the_labels_are_invalid_not_dropped() {
    let parser = AnswerParser::choice(strings(&["cat", "dog"]));
    let answers: Vec<Answer> = ["cat", "pug", " dog ", "", "Cat"]
        .iter()
        .map(|a| parser.parse(a))
        .collect();
    assert_eq!(answers.len(), 5);
    let invalid: Vec<&Answer> = answers.iter().filter(|a| !a.is_valid()).collect();
    assert_eq!(invalid.len(), 3);
    assert!(invalid.iter().all(|a| matches!(a, Answer::Invalid { .. })));
}

#[test]
fn label_scores_with_real_tokenizer_match_brute_force() {
    let Some(vocab) = vocab() else { return };
    let spec = GrammarSpec::choice(CAR_MAKERS);
    let grammar = cache().compile(&spec, &vocab).unwrap();
    let scorer = LabelScorer::new(&grammar, None).unwrap();
    let mut model = RandomModel { seed: 3, calls: 0 };
    let scores = scorer.score(&mut model).unwrap();
    assert_eq!(model.calls, scorer.num_prefixes());
    let total_tokens: usize = scorer.answers().iter().map(Vec::len).sum();
    assert!(
        scorer.num_prefixes() < total_tokens,
        "shared prefixes are asked once"
    );
    // Brute force: one query per token per label.
    let mut brute = RandomModel { seed: 3, calls: 0 };
    for (i, answer) in scorer.answers().iter().enumerate() {
        let mut lp = 0f64;
        for k in 0..answer.len() {
            let logits = brute.logits_after(&answer[..k]).unwrap();
            lp += f64::from(vlmpipe::decode::log_softmax(&logits)[answer[k] as usize]);
        }
        assert!(
            (lp - scores.logprobs[i]).abs() < 1e-6,
            "{}: {lp} vs {}",
            CAR_MAKERS[i],
            scores.logprobs[i]
        );
    }
    let sum: f64 = scores.probs.iter().sum();
    assert!((sum - 1.0).abs() < 1e-9);
    assert!(scores.label_mass > 0.0 && scores.label_mass < 1.0);

    // The JSON single-field grammar scores the same labels.
    let json = GrammarSpec::json_object(
        &[JsonField::required(
            "pred_class",
            FieldType::Enum(strings(&CAR_MAKERS)),
        )],
        Whitespace::Flexible,
    )
    .unwrap();
    let grammar = cache().compile(&json, &vocab).unwrap();
    let scorer = LabelScorer::new(&grammar, None).unwrap();
    let scores = scorer
        .score(&mut RandomModel { seed: 5, calls: 0 })
        .unwrap();
    assert_eq!(scores.labels.len(), 49);
}

#[test]
fn lfm2_vl_tokenizer_has_im_end_as_eos_and_special_image_tokens() {
    let Some(path) = shared_path("models/LFM2-VL-450M/tokenizer.json") else {
        return;
    };
    let vocab = Vocab::from_tokenizer_file(&path, &VocabConfig::lfm2_vl()).unwrap();
    assert_eq!(vocab.eos(), 7);
    assert_eq!(vocab.tokenizer_size(), TOKENIZER_SIZE as usize);
    assert_eq!(vocab.model_vocab_size(), MODEL_VOCAB);
    let image = vocab.tokenize("<image>");
    assert!(
        image.len() > 1,
        "special tokens are not produced from plain text"
    );
    assert!((0..TOKENIZER_SIZE).filter(|&t| vocab.is_special(t)).count() >= 10);
    assert_eq!(vocab.decode(&vocab.tokenize("a café 日本")), "a café 日本");
}

#[test]
fn unknown_eos_and_missing_files_are_errors() {
    let Some(path) = shared_path("tokenizers/lfm2/tokenizer.json") else {
        return;
    };
    let cfg = VocabConfig {
        eos_token: "<|no_such_token|>".to_string(),
        model_vocab_size: None,
    };
    assert!(matches!(
        Vocab::from_tokenizer_file(&path, &cfg),
        Err(DecodeError::UnknownEos(_))
    ));
    assert!(matches!(
        Vocab::from_tokenizer_file(&path.with_file_name("missing.json"), &cfg),
        Err(DecodeError::ReadTokenizer(_))
    ));
    assert!(matches!(
        Vocab::from_tokenizer_json(b"{ not json", &cfg),
        Err(DecodeError::LoadTokenizer { .. })
    ));
}

/// Samples under `grammar` with a budget of `budget` tokens the way the generation loop does:
/// mask, sample, let the budget override the choice, commit. Returns the answer's text and
/// whether it is complete when the loop stops (EOS or budget spent).
fn sample_with_budget(
    grammar: &Arc<CompiledGrammar>,
    model: &mut RandomModel,
    rng: &mut u64,
    budget: usize,
) -> (String, bool) {
    let mut c = grammar.constraint();
    c.limit_tokens(budget).expect("the budget holds an answer");
    for _ in 0..budget {
        let mask = c.allowed_tokens().expect("a mask");
        check_mask(&mask);
        let mut logits = model.logits_after(c.tokens()).unwrap();
        mask.apply_to_logits(&mut logits);
        // Temperature 1 over logits spread by 8: wide enough to ramble, as a small model does.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut u = (splitmix(rng) >> 11) as f64 / (1u64 << 53) as f64 * total;
        let mut token = argmax(&logits).unwrap();
        for (i, w) in weights.iter().enumerate() {
            if *w > 0.0 {
                if u < *w {
                    token = i as u32;
                    break;
                }
                u -= w;
            }
        }
        let token = c.budget_override(token).expect("override").unwrap_or(token);
        assert!(mask.is_allowed(token) || token == grammar.vocab().eos());
        c.commit(token)
            .expect("the token the budget settles on commits");
        if c.is_finished() {
            break;
        }
    }
    (c.text(), c.is_finished() || c.is_accepting())
}

/// Issue 14 item 11 at the decode layer, with the real 65k-token tokenizer: whatever the budget
/// from the shortest answer up, an answer sampled from a random model is complete when the
/// budget runs out (JSON with free strings and numbers, a nested typed object, a regex), a
/// smaller budget is refused with the tokens needed, and the search stays cheap.
#[test]
fn regression_issue14_budgeted_answers_are_always_complete() {
    let Some(vocab) = vocab() else {
        return;
    };
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "pred_class": {"type": "string", "enum": ["cat", "dog"]},
            "note": {"type": "string"},
            "score": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2}
        },
        "required": ["pred_class", "note", "score", "tags"],
        "additionalProperties": false
    });
    let specs = [
        GrammarSpec::JsonSchema(schema),
        nested_json_spec(),
        GrammarSpec::Regex("[a-z]+@[a-z]+\\.(com|org)".to_string()),
    ];
    for spec in &specs {
        let grammar = cache().compile(spec, &vocab).expect("grammar compiles");
        let started = Instant::now();
        let shortest = grammar.shortest_answer().expect("a shortest answer").len();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{spec:?}: the search took {:?}",
            started.elapsed()
        );
        let err = grammar.constraint().limit_tokens(shortest - 1).unwrap_err();
        assert!(
            matches!(err, DecodeError::BudgetTooSmall { needed, .. } if needed == shortest),
            "{err}"
        );
        assert!(grammar.check_budget(shortest - 1).is_err());
        grammar
            .check_budget(shortest)
            .expect("the shortest answer fits");
        let mut cut = 0;
        for budget in [shortest, shortest + 1, shortest + 3, shortest + 8] {
            for seed in 0..12 {
                let mut model = RandomModel { seed, calls: 0 };
                let mut rng = seed ^ 0x5EED;
                let (text, complete) = sample_with_budget(&grammar, &mut model, &mut rng, budget);
                assert!(
                    complete,
                    "budget {budget}, seed {seed}: `{text}` is incomplete"
                );
                if !matches!(spec, GrammarSpec::Regex(_)) {
                    serde_json::from_str::<serde_json::Value>(&text).unwrap_or_else(|e| {
                        panic!("budget {budget}, seed {seed}: `{text}` does not parse: {e}")
                    });
                }
                cut += usize::from(model.calls >= budget);
            }
        }
        assert!(cut > 0, "{spec:?}: no answer used its whole budget");
    }
}

/// Issue 14 (noticed while closing it): an answer is valid only if the grammar it was held to
/// accepts all of it. Under a regex any text used to be a valid `Answer::Text`, and a JSON
/// Schema answer only had to parse. Needs no tokenizer: answers are text.
#[test]
fn regression_issue14_answers_are_valid_only_if_their_grammar_accepts_them() {
    let parse =
        |spec: &GrammarSpec, text: &str| AnswerParser::for_grammar(spec, None, None).parse(text);
    let regex = GrammarSpec::Regex(r"[0-9]{3}-[a-z]+".to_owned());
    assert_eq!(parse(&regex, "123-abc"), Answer::Text("123-abc".to_owned()));
    // Surrounding whitespace is not part of an answer, as for labels.
    assert!(parse(&regex, " 123-abc\n").is_valid());
    for bad in ["", "12-abc", "123-abc!", "x123-abc", "123-ABC", "hello"] {
        assert!(
            matches!(parse(&regex, bad), Answer::Invalid { .. }),
            "{bad:?} is not a full match of the regex"
        );
    }

    let lark = GrammarSpec::Lark("start: \"yes\" | \"no\"\n".to_owned());
    assert!(parse(&lark, "yes").is_valid());
    assert!(!parse(&lark, "maybe").is_valid());

    let schema = serde_json::json!({
        "type": "object",
        "properties": { "n": { "type": "integer", "minimum": 1 }, "tag": { "enum": ["a", "b"] } },
        "required": ["n", "tag"],
        "additionalProperties": false
    });
    let json = GrammarSpec::JsonSchema(schema);
    assert!(parse(&json, r#"{"n":3,"tag":"a"}"#).is_valid());
    for bad in [
        r#"{"n":3}"#,                     // a required field is missing
        r#"{"n":"3","tag":"a"}"#,         // the wrong type
        r#"{"n":3,"tag":"c"}"#,           // not in the enum
        r#"{"n":3,"tag":"a","extra":1}"#, // no additional properties
        r#"[1, 2]"#,                      // JSON, but not the object
        r#"{"n":3,"tag":"#,               // not JSON
    ] {
        let answer = parse(&json, bad);
        assert!(
            matches!(answer, Answer::Invalid { .. }),
            "{bad}: {answer:?}"
        );
    }
    // A JSON Schema whose label field names the labels: a label answer must validate too.
    let labelled = GrammarSpec::JsonSchema(serde_json::json!({
        "type": "object",
        "properties": { "pred": { "enum": ["cat", "dog"] }, "why": { "type": "string", "maxLength": 5 } },
        "required": ["pred", "why"]
    }));
    let labels = strings(&["cat", "dog"]);
    let parser = AnswerParser::for_grammar(&labelled, Some("pred"), Some(&labels));
    assert!(parser.parse(r#"{"pred":"cat","why":"ears"}"#).is_valid());
    assert!(
        !parser.parse(r#"{"pred":"cat"}"#).is_valid(),
        "`why` is required"
    );
    assert!(
        !parser
            .parse(r#"{"pred":"cat","why":"too long"}"#)
            .is_valid()
    );
}
