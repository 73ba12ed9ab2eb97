//! Exact label scoring against a deterministic fake model on a toy tokenizer (no shared data):
//! one model query per answer-trie node, probabilities that match the hand computation, and the
//! cases where greedy constrained decoding and label scoring disagree.

use std::collections::HashMap;
use std::sync::Arc;

use vlmpipe::decode::{
    CompiledGrammar, GrammarSpec, LabelScorer, PrefixScorer, Vocab, greedy_decode,
};

const EOS: u32 = 0;
const TOKENS: [&str; 14] = [
    "<eos>", "c", "a", "t", "m", "r", "n", "d", "o", "g", "cat", "am", "aran", "dog",
];

fn id(tok: &str) -> u32 {
    TOKENS.iter().position(|t| *t == tok).expect("toy token") as u32
}

fn toy_vocab() -> Arc<Vocab> {
    let bytes = TOKENS.iter().map(|t| t.as_bytes().to_vec()).collect();
    // A model vocabulary larger than the tokenizer, like LFM2-VL's.
    Arc::new(Vocab::from_token_bytes(bytes, EOS, Some(20)).expect("toy vocab"))
}

/// A model given as next-token probabilities per prefix; unlisted tokens get a negligible share.
struct TableModel {
    table: HashMap<Vec<u32>, Vec<(u32, f32)>>,
    queried: Vec<Vec<u32>>,
    batches: usize,
}

/// A prefix (as token texts) and the next-token probabilities after it.
type Row<'a> = (&'a [&'a str], &'a [(&'a str, f32)]);

impl TableModel {
    fn new(rows: &[Row<'_>]) -> Self {
        let table = rows
            .iter()
            .map(|(prefix, probs)| {
                let prefix = prefix.iter().map(|t| id(t)).collect();
                let probs = probs.iter().map(|(t, p)| (id(t), *p)).collect();
                (prefix, probs)
            })
            .collect();
        Self {
            table,
            queried: Vec::new(),
            batches: 0,
        }
    }
}

impl PrefixScorer for TableModel {
    type Error = std::io::Error;

    fn logits_after(&mut self, prefix: &[u32]) -> Result<Vec<f32>, Self::Error> {
        self.queried.push(prefix.to_vec());
        let mut logits = vec![-40.0f32; 20];
        let probs = self
            .table
            .get(prefix)
            .ok_or_else(|| std::io::Error::other(format!("no row for prefix {prefix:?}")))?;
        for &(tok, p) in probs {
            logits[tok as usize] = p.ln();
        }
        Ok(logits)
    }

    fn logits_after_batch(&mut self, prefixes: &[&[u32]]) -> Result<Vec<Vec<f32>>, Self::Error> {
        self.batches += 1;
        prefixes.iter().map(|p| self.logits_after(p)).collect()
    }
}

fn compile(labels: &[&str]) -> Arc<CompiledGrammar> {
    Arc::new(
        CompiledGrammar::compile(&GrammarSpec::choice(labels.iter().copied()), &toy_vocab())
            .unwrap(),
    )
}

#[test]
fn greedy_and_scoring_disagree_when_a_shared_first_token_splits_its_mass() {
    // p(cat)=0.6, p(dog)=0.4; after `cat`: end 0.55, `am` 0.45.
    // Complete answers: cat 0.33, catamaran 0.27, dog 0.40.
    let mut model = TableModel::new(&[
        (&[], &[("cat", 0.6), ("dog", 0.4)]),
        (&["cat"], &[("<eos>", 0.55), ("am", 0.45)]),
        (&["cat", "am"], &[("aran", 1.0)]),
        (&["cat", "am", "aran"], &[("<eos>", 1.0)]),
        (&["dog"], &[("<eos>", 1.0)]),
    ]);
    let grammar = compile(&["cat", "catamaran", "dog"]);
    let (greedy, done) = greedy_decode(&grammar, &mut model, 8).unwrap();
    assert!(done);
    assert_eq!(
        grammar.vocab().decode(&greedy),
        "cat",
        "greedy follows the likelier first token"
    );

    let scorer = LabelScorer::new(&grammar, None).unwrap();
    let mut model = TableModel {
        queried: Vec::new(),
        batches: 0,
        ..model
    };
    let scores = scorer.score(&mut model).unwrap();
    assert_eq!(
        scores.best_label(),
        "dog",
        "scoring weighs complete answers"
    );
    let expect = [0.33, 0.27, 0.40];
    for (p, e) in scores.probs.iter().zip(expect) {
        assert!((p - e).abs() < 1e-4, "{:?}", scores.probs);
    }
    assert!((scores.label_mass - 1.0).abs() < 1e-4);

    // One query per trie node with children: [], [cat], [dog], [cat am], [cat am aran].
    assert_eq!(scorer.num_prefixes(), 5);
    assert_eq!(model.queried.len(), 5);
    let mut distinct = model.queried.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 5, "no prefix asked twice");
    // Batched per trie level: depths 0, 1, 2, 3.
    assert_eq!(model.batches, 4);
}

#[test]
fn greedy_and_scoring_disagree_on_a_label_and_its_extension() {
    // After `cat` the model prefers `am` (0.6 vs 0.4 for ending), but only half of what follows
    // `catam` spells `catamaran`: cat 0.36 against catamaran 0.27.
    let mut model = TableModel::new(&[
        (&[], &[("cat", 0.9), ("dog", 0.1)]),
        (&["cat"], &[("<eos>", 0.4), ("am", 0.6)]),
        (&["cat", "am"], &[("aran", 0.5), ("d", 0.5)]),
        (&["cat", "am", "aran"], &[("<eos>", 1.0)]),
    ]);
    let grammar = compile(&["cat", "catamaran"]);
    let (greedy, done) = greedy_decode(&grammar, &mut model, 8).unwrap();
    assert!(done);
    assert_eq!(grammar.vocab().decode(&greedy), "catamaran");

    let scores = LabelScorer::new(&grammar, None)
        .unwrap()
        .score(&mut model)
        .unwrap();
    assert_eq!(scores.best_label(), "cat");
    assert!((scores.logprobs[0] - (0.9f64 * 0.4).ln()).abs() < 1e-5);
    assert!((scores.logprobs[1] - (0.9f64 * 0.6 * 0.5).ln()).abs() < 1e-5);
    assert!((scores.label_mass - 0.63).abs() < 1e-4);
}

#[test]
fn scorer_errors_are_reported_not_swallowed() {
    let mut model = TableModel::new(&[(&[], &[("cat", 1.0)])]);
    let grammar = compile(&["cat", "dog"]);
    let err = LabelScorer::new(&grammar, None)
        .unwrap()
        .score(&mut model)
        .unwrap_err();
    assert!(
        matches!(err, vlmpipe::decode::DecodeError::Scorer(_)),
        "{err:?}"
    );
}

#[test]
fn masks_cover_the_model_vocabulary_but_never_ids_past_the_tokenizer() {
    let grammar = compile(&["cat", "dog"]);
    let mut c = grammar.constraint();
    let mask = c.allowed_tokens().unwrap();
    assert_eq!(mask.len(), 20);
    assert!(mask.allowed().all(|t| (t as usize) < TOKENS.len()));
    assert!(mask.is_allowed(id("cat")) && mask.is_allowed(id("c")) && mask.is_allowed(id("dog")));
    assert!(!mask.is_allowed(EOS) && !mask.is_allowed(19));
    let mut logits = vec![1.0f32; 20];
    mask.apply_to_logits(&mut logits);
    assert_eq!(
        logits.iter().filter(|l| l.is_finite()).count(),
        mask.count()
    );
    assert!(
        c.commit(17).is_err(),
        "an id past the tokenizer is never allowed"
    );
}
