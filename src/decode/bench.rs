//! Grammar benchmark for `vlmpipe bench`: compile time, per-step mask time and the overhead of
//! constrained over unconstrained decoding, with a real tokenizer and a simulated model.
//!
//! The "model" is a pool of seeded random logit vectors over the whole model vocabulary; a step
//! costs copying one (what reading logits back costs) plus an argmax, the cheapest honest model
//! step. The constrained loop adds the mask, applying it and committing the token; that grammar
//! work, timed on its own, is the overhead (the whole constrained step can even be faster, since an
//! argmax over a mostly -inf vector is cheaper). Because a real LFM2-VL decode step is far slower,
//! the overhead is also given relative to a configured real step time (100 ms by default).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::decode::compiled::CompiledGrammar;
use crate::decode::error::DecodeError;
use crate::decode::scoring::argmax;
use crate::decode::spec::{FieldType, GrammarSpec, JsonField, Whitespace};
use crate::decode::vocab::{Vocab, VocabConfig};
use crate::rng::SplitMix64;

/// The 49 makers of the Stanford Cars task (see `shared/tasks/README.md`).
pub const CAR_MAKERS: [&str; 49] = [
    "AM",
    "Acura",
    "Aston",
    "Audi",
    "BMW",
    "Bentley",
    "Bugatti",
    "Buick",
    "Cadillac",
    "Chevrolet",
    "Chrysler",
    "Daewoo",
    "Dodge",
    "Eagle",
    "FIAT",
    "Ferrari",
    "Fisker",
    "Ford",
    "GMC",
    "Geo",
    "HUMMER",
    "Honda",
    "Hyundai",
    "Infiniti",
    "Isuzu",
    "Jaguar",
    "Jeep",
    "Lamborghini",
    "Land",
    "Lincoln",
    "MINI",
    "Maybach",
    "Mazda",
    "McLaren",
    "Mercedes-Benz",
    "Mitsubishi",
    "Nissan",
    "Plymouth",
    "Porsche",
    "Ram",
    "Rolls-Royce",
    "Scion",
    "Spyker",
    "Suzuki",
    "Tesla",
    "Toyota",
    "Volkswagen",
    "Volvo",
    "smart",
];

/// Benchmark settings.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub vocab: VocabConfig,
    /// Fresh compilations per grammar (the median is reported).
    pub compile_repeats: usize,
    /// Decoded sequences per grammar.
    pub sequences: usize,
    /// Token limit per sequence.
    pub max_tokens: usize,
    /// A real decode step, to put the mask cost in proportion.
    pub model_step: Duration,
    pub seed: u64,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            vocab: VocabConfig::lfm2_vl(),
            compile_repeats: 20,
            sequences: 200,
            max_tokens: 48,
            model_step: Duration::from_millis(100),
            seed: 7,
        }
    }
}

/// Figures for one grammar.
#[derive(Debug, Clone)]
pub struct GrammarBench {
    pub name: String,
    /// The first compilation for this grammar.
    pub compile_first: Duration,
    /// Median over `compile_repeats` fresh compilations.
    pub compile_median: Duration,
    pub mask_median: Duration,
    pub mask_p99: Duration,
    pub mask_max: Duration,
    /// Masks computed (= tokens decoded).
    pub steps: usize,
    /// Sequences decoded, and those that ended with EOS within the token limit.
    pub sequences: usize,
    pub finished: usize,
    /// Per token: copy logits + argmax.
    pub unconstrained_per_token: Duration,
    /// Per token: copy logits + mask + apply + argmax + commit.
    pub constrained_per_token: Duration,
    /// Per token: the grammar's own work (mask + apply + commit). Argmax over a masked vector is
    /// cheaper than over a full one, so this, not `constrained - unconstrained`, is the overhead.
    pub grammar_per_token: Duration,
}

impl GrammarBench {
    /// The grammar's work per token as a fraction of the simulated (copy + argmax) step.
    pub(crate) fn overhead_vs_argmax(&self) -> f64 {
        self.grammar_per_token.as_secs_f64() / self.unconstrained_per_token.as_secs_f64()
    }

    /// The grammar's work per token as a fraction of a real decode step of `step`.
    pub(crate) fn overhead_vs_step(&self, step: Duration) -> f64 {
        self.grammar_per_token.as_secs_f64() / step.as_secs_f64()
    }
}

/// The whole benchmark.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// Loading the tokenizer and building llguidance's per-tokenizer tables.
    pub vocab_load: Duration,
    pub model_vocab_size: usize,
    pub model_step: Duration,
    pub grammars: Vec<GrammarBench>,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        writeln!(
            f,
            "tokenizer load + llguidance tables: {:.1} ms (vocabulary {})",
            self.vocab_load.as_secs_f64() * 1e3,
            self.model_vocab_size
        )?;
        writeln!(
            f,
            "{:<14} {:>11} {:>11} {:>10} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11}",
            "grammar",
            "compile1 ms",
            "compile ms",
            "mask p50",
            "mask p99",
            "mask max",
            "steps",
            "finished",
            "free/tok",
            "cons/tok",
            "gram/tok",
            "overhead",
            format!("vs {:.0} ms", self.model_step.as_secs_f64() * 1e3),
        )?;
        for g in &self.grammars {
            writeln!(
                f,
                "{:<14} {:>11.2} {:>11.2} {:>8.1}µs {:>8.1}µs {:>8.1}µs {:>7} {:>9} {:>7.1}µs {:>7.1}µs {:>7.1}µs {:>8.1}% {:>10.4}%",
                g.name,
                g.compile_first.as_secs_f64() * 1e3,
                g.compile_median.as_secs_f64() * 1e3,
                us(g.mask_median),
                us(g.mask_p99),
                us(g.mask_max),
                g.steps,
                format!("{}/{}", g.finished, g.sequences),
                us(g.unconstrained_per_token),
                us(g.constrained_per_token),
                us(g.grammar_per_token),
                g.overhead_vs_argmax() * 100.0,
                g.overhead_vs_step(self.model_step) * 100.0,
            )?;
        }
        Ok(())
    }
}

/// The benchmarked grammars: 2 labels, the 49 car makers, and a JSON object with a maker enum and
/// a confidence number.
pub fn bench_specs() -> Result<Vec<(String, GrammarSpec)>, DecodeError> {
    let makers: Vec<String> = CAR_MAKERS.iter().map(|s| s.to_string()).collect();
    let json = GrammarSpec::json_object(
        &[
            JsonField::required("pred_class", FieldType::Enum(makers.clone())),
            JsonField::required(
                "confidence",
                FieldType::Number {
                    minimum: Some(0.0),
                    maximum: Some(1.0),
                },
            ),
        ],
        Whitespace::Flexible,
    )?;
    Ok(vec![
        ("choice-2".to_string(), GrammarSpec::choice(["cat", "dog"])),
        ("choice-49".to_string(), GrammarSpec::choice(makers)),
        ("json-object".to_string(), json),
    ])
}

/// Runs the benchmark with the tokenizer at `tokenizer_path`.
pub fn bench_grammars(
    tokenizer_path: &Path,
    cfg: &BenchConfig,
) -> Result<BenchReport, DecodeError> {
    let t = Instant::now();
    let vocab = Arc::new(Vocab::from_tokenizer_file(tokenizer_path, &cfg.vocab)?);
    let vocab_load = t.elapsed();

    let pool = LogitPool::new(vocab.model_vocab_size(), 16, cfg.seed);
    let mut grammars = Vec::new();
    for (name, spec) in bench_specs()? {
        grammars.push(bench_one(&name, &spec, &vocab, &pool, cfg)?);
    }
    Ok(BenchReport {
        vocab_load,
        model_vocab_size: vocab.model_vocab_size(),
        model_step: cfg.model_step,
        grammars,
    })
}

fn bench_one(
    name: &str,
    spec: &GrammarSpec,
    vocab: &Arc<Vocab>,
    pool: &LogitPool,
    cfg: &BenchConfig,
) -> Result<GrammarBench, DecodeError> {
    let t = Instant::now();
    let grammar = Arc::new(CompiledGrammar::compile(spec, vocab)?);
    let compile_first = t.elapsed();
    let mut compiles = Vec::with_capacity(cfg.compile_repeats);
    for _ in 0..cfg.compile_repeats {
        let t = Instant::now();
        std::hint::black_box(CompiledGrammar::compile(spec, vocab)?);
        compiles.push(t.elapsed());
    }

    let mut masks = Vec::new();
    let mut finished = 0;
    let mut constrained = Duration::ZERO;
    let mut grammar_work = Duration::ZERO;
    let mut cursor = 0usize;
    let mut scratch = vec![0f32; vocab.model_vocab_size()];
    for seq in 0..cfg.sequences {
        let mut c = grammar.constraint();
        cursor = cursor.wrapping_add(seq * 7 + 1);
        for _ in 0..cfg.max_tokens {
            let start = Instant::now();
            scratch.copy_from_slice(pool.get(cursor));
            cursor += 1;
            let m = Instant::now();
            let mask = c.allowed_tokens()?;
            masks.push(m.elapsed());
            mask.apply_to_logits(&mut scratch);
            let masked = m.elapsed();
            let token = argmax(&scratch).ok_or(DecodeError::Impossible {
                message: "the mask left no finite logit".to_string(),
            })?;
            let k = Instant::now();
            c.commit(token)?;
            grammar_work += masked + k.elapsed();
            constrained += start.elapsed();
            if c.is_finished() {
                finished += 1;
                break;
            }
        }
    }
    let steps = masks.len();

    // The same number of tokens without a grammar.
    let start = Instant::now();
    let mut sink = 0u64;
    for i in 0..steps {
        scratch.copy_from_slice(pool.get(i));
        sink = sink.wrapping_add(u64::from(argmax(&scratch).unwrap_or(0)));
    }
    std::hint::black_box(sink);
    let unconstrained = start.elapsed();

    let per = |d: Duration| d / steps.max(1) as u32;
    Ok(GrammarBench {
        name: name.to_string(),
        compile_first,
        compile_median: percentile(&mut compiles, 0.5),
        mask_median: percentile(&mut masks, 0.5),
        mask_p99: percentile(&mut masks, 0.99),
        mask_max: masks.iter().copied().max().unwrap_or_default(),
        steps,
        sequences: cfg.sequences,
        finished,
        unconstrained_per_token: per(unconstrained),
        constrained_per_token: per(constrained),
        grammar_per_token: per(grammar_work),
    })
}

fn percentile(values: &mut [Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort_unstable();
    let idx = ((values.len() - 1) as f64 * q).round() as usize;
    values[idx.min(values.len() - 1)]
}

/// Pre-drawn random logits, so that drawing them is not timed as part of either loop.
struct LogitPool {
    rows: Vec<Vec<f32>>,
}

impl LogitPool {
    fn new(vocab: usize, n: usize, seed: u64) -> Self {
        // SplitMix64: the simulated logits stay the same across versions.
        let mut rng = SplitMix64::new(seed);
        let rows = (0..n)
            .map(|_| (0..vocab).map(|_| rng.next_f32() * 10.0).collect())
            .collect();
        Self { rows }
    }

    fn get(&self, i: usize) -> &[f32] {
        &self.rows[i % self.rows.len()]
    }
}
