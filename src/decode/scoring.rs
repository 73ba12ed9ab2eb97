//! Exact label scoring (`scoring = labels`) and greedy constrained decoding over a model seen
//! through [`PrefixScorer`].
//!
//! Each label's complete answer (canonical tokenisation of its answer text, then EOS, checked
//! against the grammar) goes into a token trie. Walking the trie breadth first asks the model once
//! per internal node, i.e. once per distinct answer prefix, however many labels share it; a label's
//! log-probability is the sum of the log-softmax values along its path. Normalising over labels
//! (log-sum-exp) gives the class distribution; the unnormalised total says how much of the model's
//! probability the labels hold at all.

use std::sync::Arc;

use crate::decode::answer::answer_text;
use crate::decode::compiled::CompiledGrammar;
use crate::decode::error::DecodeError;

/// The model side of scoring and decoding: next-token logits after the prompt plus `prefix`
/// (answer tokens only; the prompt and its KV cache are the implementation's business).
pub trait PrefixScorer {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Logits (or log-probabilities: they are log-softmaxed here, which leaves those unchanged) over
    /// the model vocabulary for the token after `prefix`.
    fn logits_after(&mut self, prefix: &[u32]) -> Result<Vec<f32>, Self::Error>;

    /// [`PrefixScorer::logits_after`] for several prefixes at once, e.g. one trie level, so the
    /// model can batch the branches over the shared prompt cache.
    fn logits_after_batch(&mut self, prefixes: &[&[u32]]) -> Result<Vec<Vec<f32>>, Self::Error> {
        prefixes.iter().map(|p| self.logits_after(p)).collect()
    }
}

/// The log-softmax of `logits` (f64 accumulation; -inf stays -inf).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return vec![f32::NEG_INFINITY; logits.len()];
    }
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = f64::from(max) + sum.ln();
    logits
        .iter()
        .map(|&l| (f64::from(l) - log_z) as f32)
        .collect()
}

/// Every label's probability under the model, from [`LabelScorer::score`]; serialises to the
/// JSON `vlmpipe infer --scores` prints (a -inf log-probability becomes `null`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LabelScores {
    pub labels: Vec<String>,
    /// Log-probability of each label's complete answer (EOS included), unnormalised.
    pub logprobs: Vec<f64>,
    /// Probabilities normalised over the labels (sum to 1).
    pub probs: Vec<f64>,
    /// Index of the most probable label (the first on ties).
    pub best: usize,
    /// Total probability of all label answers before normalising, in [0, 1].
    pub label_mass: f64,
}

impl LabelScores {
    pub fn best_label(&self) -> &str {
        &self.labels[self.best]
    }
}

/// One node of the answer-token trie.
#[derive(Debug, Clone)]
struct TrieNode {
    /// Child nodes by token.
    children: Vec<(u32, usize)>,
    /// The label whose answer ends here (leaves only: every answer ends in EOS).
    label: Option<usize>,
}

/// The label answers of a grammar as a token trie, ready to score against any prompt.
#[derive(Debug, Clone)]
pub struct LabelScorer {
    labels: Vec<String>,
    answers: Vec<Vec<u32>>,
    nodes: Vec<TrieNode>,
    vocab_size: usize,
}

impl LabelScorer {
    /// Builds the trie for `grammar`'s labels: a choice, or a JSON object whose only required
    /// field (`label_field`, if named) is the label enum. Each answer is checked with the grammar.
    pub fn new(
        grammar: &Arc<CompiledGrammar>,
        label_field: Option<&str>,
    ) -> Result<Self, DecodeError> {
        let spec = grammar.spec();
        let field = match label_field {
            Some(f) => Some(f.to_string()),
            None => match spec {
                crate::decode::GrammarSpec::Json { schema, .. }
                | crate::decode::GrammarSpec::JsonSchema(schema) => {
                    Some(crate::decode::answer::single_label_field(schema, None)?)
                }
                _ => None,
            },
        };
        let labels =
            spec.labels(field.as_deref())
                .ok_or_else(|| DecodeError::NoCanonicalAnswer {
                    reason: "label scoring needs a choice or a JSON object with a label enum"
                        .to_string(),
                })?;
        if labels.is_empty() {
            return Err(DecodeError::NoLabels);
        }
        let vocab = grammar.vocab();
        let eos = vocab.eos();
        let mut answers = Vec::with_capacity(labels.len());
        for label in &labels {
            let text = answer_text(spec, label, field.as_deref())?;
            let mut tokens = vocab.tokenize(&text);
            check_answer(grammar, &tokens).map_err(|reason| DecodeError::AnswerRejected {
                label: label.clone(),
                text: text.clone(),
                reason,
            })?;
            tokens.push(eos);
            answers.push(tokens);
        }

        let mut nodes = vec![TrieNode {
            children: Vec::new(),
            label: None,
        }];
        for (label, answer) in answers.iter().enumerate() {
            let mut at = 0;
            for &t in answer {
                at = match nodes[at].children.iter().find(|(tok, _)| *tok == t) {
                    Some(&(_, child)) => child,
                    None => {
                        nodes.push(TrieNode {
                            children: Vec::new(),
                            label: None,
                        });
                        let child = nodes.len() - 1;
                        nodes[at].children.push((t, child));
                        child
                    }
                };
            }
            // Distinct labels have distinct texts and every path ends in EOS, so no leaf is shared.
            nodes[at].label = Some(label);
        }
        Ok(Self {
            labels,
            answers,
            nodes,
            vocab_size: vocab.model_vocab_size(),
        })
    }

    /// Each label's answer tokens, EOS last.
    pub fn answers(&self) -> &[Vec<u32>] {
        &self.answers
    }

    /// How many prefixes [`LabelScorer::score`] asks the model about (the trie's internal nodes).
    pub fn num_prefixes(&self) -> usize {
        self.nodes.iter().filter(|n| !n.children.is_empty()).count()
    }

    /// Scores every label with one model query per distinct answer prefix, batched per trie level.
    pub fn score<S: PrefixScorer>(&self, model: &mut S) -> Result<LabelScores, DecodeError> {
        let mut logprob = vec![0f64; self.nodes.len()];
        // Nodes of the current level with their prefixes.
        let mut level: Vec<(usize, Vec<u32>)> = vec![(0, Vec::new())];
        while !level.is_empty() {
            let internal: Vec<&(usize, Vec<u32>)> = level
                .iter()
                .filter(|(n, _)| !self.nodes[*n].children.is_empty())
                .collect();
            if internal.is_empty() {
                break;
            }
            let prefixes: Vec<&[u32]> = internal.iter().map(|(_, p)| p.as_slice()).collect();
            let rows = model
                .logits_after_batch(&prefixes)
                .map_err(|e| DecodeError::Scorer(Box::new(e)))?;
            if rows.len() != prefixes.len() || rows.iter().any(|r| r.len() != self.vocab_size) {
                return Err(DecodeError::ScorerShape {
                    expected: prefixes.len(),
                    got: rows.len(),
                });
            }
            let mut next = Vec::new();
            for ((node, prefix), row) in internal.into_iter().zip(rows) {
                let lp = log_softmax(&row);
                for &(tok, child) in &self.nodes[*node].children {
                    logprob[child] = logprob[*node] + f64::from(lp[tok as usize]);
                    let mut p = prefix.clone();
                    p.push(tok);
                    next.push((child, p));
                }
            }
            level = next;
        }

        let mut logprobs = vec![f64::NEG_INFINITY; self.labels.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(label) = n.label {
                logprobs[label] = logprob[i];
            }
        }
        let max = logprobs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            return Err(DecodeError::Degenerate);
        }
        let sum: f64 = logprobs.iter().map(|l| (l - max).exp()).sum();
        let probs: Vec<f64> = logprobs.iter().map(|l| (l - max).exp() / sum).collect();
        let best = logprobs
            .iter()
            .enumerate()
            .fold(0, |best, (i, l)| if *l > logprobs[best] { i } else { best });
        Ok(LabelScores {
            labels: self.labels.clone(),
            label_mass: (max + sum.ln()).exp().min(1.0),
            logprobs,
            probs,
            best,
        })
    }
}

/// Walks `tokens` then EOS through a fresh constraint; the error says where it was rejected.
fn check_answer(grammar: &Arc<CompiledGrammar>, tokens: &[u32]) -> Result<(), String> {
    let mut c = grammar.constraint();
    for (i, &t) in tokens.iter().enumerate() {
        c.commit(t)
            .map_err(|e| format!("token {} of {} ({t}): {e}", i + 1, tokens.len()))?;
    }
    c.commit(grammar.vocab().eos())
        .map_err(|_| "the answer is not complete after its last token".to_string())
}

/// Greedy constrained decoding: at each step the most likely allowed token (the first on ties),
/// until EOS or `max_tokens`. Returns the answer tokens (EOS excluded) and whether EOS came.
pub fn greedy_decode<S: PrefixScorer>(
    grammar: &Arc<CompiledGrammar>,
    model: &mut S,
    max_tokens: usize,
) -> Result<(Vec<u32>, bool), DecodeError> {
    let mut c = grammar.constraint();
    for _ in 0..max_tokens {
        let mask = c.allowed_tokens()?;
        let mut logits = model
            .logits_after(c.tokens())
            .map_err(|e| DecodeError::Scorer(Box::new(e)))?;
        mask.apply_to_logits(&mut logits);
        let token = argmax(&logits).ok_or(DecodeError::Impossible {
            message: "the mask left no finite logit".to_string(),
        })?;
        c.commit(token)?;
        if c.is_finished() {
            return Ok((c.tokens().to_vec(), true));
        }
    }
    Ok((c.tokens().to_vec(), false))
}

/// The index of the largest finite value (the first on ties).
pub fn argmax(values: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in values.iter().enumerate() {
        if v > f32::NEG_INFINITY && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalises() {
        let lp = log_softmax(&[1.0, 2.0, 3.0, f32::NEG_INFINITY]);
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(lp[3], f32::NEG_INFINITY);
        assert!(log_softmax(&[f32::NEG_INFINITY; 2])[0].is_infinite());
    }

    #[test]
    fn argmax_skips_masked_and_takes_first_tie() {
        assert_eq!(argmax(&[f32::NEG_INFINITY, 2.0, 2.0]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), None);
        assert_eq!(argmax(&[]), None);
    }
}
