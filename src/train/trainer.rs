//! The training loop: micro-batches, gradient accumulation, AdamW, evaluation, checkpoints and
//! resume.
//!
//! Everything that decides the numbers is a function of the seed and the optimizer step: the data
//! order of epoch `e` is a seeded permutation, micro-batch `k` of the run is a fixed slice of it,
//! and dropout masks are seeded by the micro-batch index. A checkpoint therefore needs only the
//! trainable tensors, the optimizer moments and the step count to continue exactly where a killed
//! run stopped; the resumed run ends with bit-identical adapters on the same machine.
//!
//! Checkpoints are written at least every `checkpoint_every` steps and every
//! `checkpoint_interval` of training, and after the last step; the two newest are kept. Each
//! records the checksums of its files, so a damaged one (truncated weights, a bad `state.json`, a
//! `latest` pointing nowhere) is recognised: training resumes from the newest intact checkpoint,
//! or starts over, and says which checkpoints it discarded and why.
//!
//! Run directory layout:
//! ```text
//! checkpoints/step-000040/{trainable,optimizer}.safetensors, metrics.parquet, state.json
//! checkpoints/latest         name of the newest complete checkpoint (written last, atomically)
//! best/                      PEFT adapter with the lowest evaluation loss
//! adapter/                   PEFT adapter at the end of training
//! metrics.parquet            one row per optimizer step
//! ```

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::file_error::FileError;
use crate::model::lfm2_vl::Lfm2VlModel;
use crate::model::ops::on_compute_threads;
use crate::model::processor::stack_images;
use crate::model::vision::{ViewSpan, pack_views};
use crate::rng::SeededRng;
use crate::train::batch::{Batch, Example, LossOn, cross_entropy};
use crate::train::error::TrainError;
use crate::train::io::{read_safetensors, write_atomic, write_safetensors};
use crate::train::lora::{Trainable, TrainableSpec};
use crate::train::metrics::{MetricRow, read_metrics, write_metrics};
use crate::train::optim::{
    AdamW, AdamWConfig, Decay, Moments, Schedule, clip_grad_norm, global_norm,
};
use crate::train::peft::PeftAdapter;

/// Every training setting.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub trainable: TrainableSpec,
    pub optimizer: AdamWConfig,
    /// Examples per micro-batch (right-padded).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Share of the steps spent warming up linearly from zero.
    pub warmup_ratio: f64,
    pub decay: Decay,
    /// Clip the global gradient norm to this value.
    pub max_grad_norm: Option<f64>,
    pub epochs: usize,
    /// Overrides `epochs` when set.
    pub max_steps: Option<usize>,
    /// Seeds the data order (the adapter init and dropout use `trainable.lora.seed`).
    pub seed: u64,
    pub loss_on: LossOn,
    /// Evaluate on the held-out set every N steps; a non-empty held-out set is always evaluated
    /// after the last step.
    pub eval_every: Option<usize>,
    /// Write a resumable checkpoint at least every N steps (with a run directory).
    pub checkpoint_every: Option<usize>,
    /// … and at least this often in wall-clock time. With either set, the last step is
    /// checkpointed too. Checkpoints never change the numbers.
    pub checkpoint_interval: Option<Duration>,
    /// Token id used to pad batches (never attended to or labelled).
    pub pad_id: u32,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Keep vision-tower outputs of frozen towers in memory up to this many bytes.
    pub feature_cache_bytes: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            trainable: TrainableSpec {
                lora: Some(Default::default()),
                full: Vec::new(),
            },
            optimizer: AdamWConfig::default(),
            batch_size: 1,
            grad_accum: 16,
            warmup_ratio: 0.1,
            decay: Decay::Linear,
            max_grad_norm: Some(1.0),
            epochs: 1,
            max_steps: None,
            seed: 42,
            loss_on: LossOn::Answer,
            eval_every: Some(100),
            checkpoint_every: Some(50),
            checkpoint_interval: Some(Duration::from_secs(60)),
            pad_id: 0,
            progress: true,
            feature_cache_bytes: 1 << 30,
        }
    }
}

impl TrainConfig {
    fn validate(&self) -> Result<(), TrainError> {
        let bad = |name, message: &str| {
            Err(TrainError::Setting {
                name,
                message: message.into(),
            })
        };
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.grad_accum == 0 {
            return bad("grad_accum", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", "must be in [0, 1]");
        }
        if self.max_steps.is_none() && self.epochs == 0 {
            return bad("epochs", "must be at least 1 when no max_steps is given");
        }
        if matches!(self.eval_every, Some(0)) || matches!(self.checkpoint_every, Some(0)) {
            return bad("eval_every", "intervals must be at least 1");
        }
        if self.checkpoint_interval.is_some_and(|t| t.is_zero()) {
            return bad("checkpoint_interval", "must be longer than zero");
        }
        if !(self.optimizer.lr.is_finite() && self.optimizer.lr >= 0.0) {
            return bad("lr", "must be a finite non-negative number");
        }
        Ok(())
    }

    /// A stable hash of everything that shapes the numbers, to refuse resuming another run.
    fn fingerprint(&self, num_train: usize, num_eval: usize) -> String {
        let text = format!(
            "{:?}|{:?}|{}|{}|{}|{:?}|{:?}|{}|{:?}|{}|{:?}|{}|{num_train}|{num_eval}",
            self.trainable,
            self.optimizer,
            self.batch_size,
            self.grad_accum,
            self.warmup_ratio,
            self.decay,
            self.max_grad_norm,
            self.epochs,
            self.max_steps,
            self.seed,
            self.loss_on,
            self.pad_id,
        );
        blake3::hash(text.as_bytes()).to_hex().to_string()
    }
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The adapter after the last step (also attached to the model, in inference mode).
    pub adapter: PeftAdapter,
    pub metrics: Vec<MetricRow>,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<u64>,
    pub total_steps: usize,
    /// Trained scalars.
    pub num_parameters: usize,
    /// The step a resumed run continued from.
    pub resumed_from: Option<u64>,
    /// Checkpoints found damaged and passed over (one sentence each, naming the file).
    pub discarded_checkpoints: Vec<String>,
}

/// Resumable state saved beside the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    step: u64,
    fingerprint: String,
    best_eval_loss: Option<f64>,
    best_step: Option<u64>,
    seconds: f64,
    /// File name → blake3 of its bytes, so damage inside a file is caught on resume.
    #[serde(default)]
    files: BTreeMap<String, String>,
    /// Kept in the checkpoint's own Parquet file: JSON does not round-trip every f64 exactly.
    #[serde(skip)]
    metrics: Vec<MetricRow>,
}

const LATEST: &str = "latest";
const STATE: &str = "state.json";
const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const METRICS: &str = "metrics.parquet";

/// Trains `model` on `train`, evaluating on `eval`, with checkpoints and outputs in `run_dir`.
///
/// When `run_dir` holds a checkpoint of the same settings, training resumes from it. `on_step`
/// sees every metrics row as it is produced (after any checkpoint of that step is written).
pub fn train(
    model: &mut Lfm2VlModel,
    train: &[Example],
    eval: &[Example],
    cfg: &TrainConfig,
    run_dir: Option<&Path>,
    mut on_step: Option<&mut dyn FnMut(&MetricRow)>,
) -> Result<TrainOutcome, TrainError> {
    cfg.validate()?;
    if train.is_empty() {
        return Err(TrainError::EmptyTrainingSet);
    }
    let trainable = Trainable::attach(model, &cfg.trainable)?;
    let named = trainable.named_vars();
    let mut opt = AdamW::new(named.iter().map(|v| v.var.clone()).collect(), cfg.optimizer);
    let order = DataOrder::new(train.len(), cfg.batch_size, cfg.seed);
    let total_steps = cfg
        .max_steps
        .unwrap_or_else(|| (cfg.epochs * order.batches_per_epoch).div_ceil(cfg.grad_accum));
    let schedule = Schedule::new(cfg.optimizer.lr, cfg.warmup_ratio, total_steps, cfg.decay);
    let fingerprint = cfg.fingerprint(train.len(), eval.len());

    let mut state = CheckpointState {
        step: 0,
        fingerprint: fingerprint.clone(),
        best_eval_loss: None,
        best_step: None,
        seconds: 0.0,
        files: BTreeMap::new(),
        metrics: Vec::new(),
    };
    let mut resumed_from = None;
    let mut discarded_checkpoints = Vec::new();
    if let Some(dir) = run_dir {
        let found = newest_intact_checkpoint(dir);
        discarded_checkpoints = found.problems;
        if let Some(saved) = found.checkpoint {
            state = restore_checkpoint(saved, &fingerprint, &trainable, &mut opt)?;
            resumed_from = Some(state.step);
        }
        // Damaged checkpoints newer than the one resumed from, and a pointer to nowhere, are of
        // no use to anyone (best effort: the next checkpoint replaces them anyway).
        for name in &found.damaged {
            let _ = std::fs::remove_dir_all(checkpoint_dir(dir).join(name));
        }
        if found.bad_latest {
            let _ = std::fs::remove_file(checkpoint_dir(dir).join(LATEST));
        }
    }

    let features = FeatureSource::new(model, &trainable, train, eval, cfg.feature_cache_bytes);
    let device = model.device().clone();
    let bar = if cfg.progress {
        let bar = ProgressBar::new(total_steps as u64);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} train [{bar:30}] {pos}/{len} {msg} {elapsed_precise} ETA {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    bar.set_position(state.step);
    let started = Instant::now();
    let seconds_before = state.seconds;
    let checkpointing = cfg.checkpoint_every.is_some() || cfg.checkpoint_interval.is_some();
    let (mut saved_step, mut saved_at) = (state.step as usize, Instant::now());

    let mode = trainable.mode().clone();
    // Whatever happens below, the model leaves this function in inference mode.
    let _inference_on_exit = InferenceOnDrop(mode.clone());
    for step in state.step as usize..total_steps {
        mode.set_training(true);
        let mut grads: Vec<Option<Tensor>> = vec![None; named.len()];
        let mut loss_sum = 0f64;
        for k in 0..cfg.grad_accum {
            let micro = (step * cfg.grad_accum + k) as u64;
            mode.set_micro_step(micro);
            let indices = order.micro_batch(micro as usize);
            let loss = batch_loss(model, &features, Set::Train, train, &indices, cfg, &device);
            let loss = loss?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(TrainError::NonFiniteLoss {
                    step: step + 1,
                    loss: value,
                });
            }
            loss_sum += f64::from(value);
            let store = backward(&(loss / cfg.grad_accum as f64)?)?;
            for (slot, nv) in grads.iter_mut().zip(&named) {
                if let Some(g) = store.get(nv.var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        mode.set_training(false);
        let mut grads = grads
            .into_iter()
            .zip(&named)
            .map(|(g, nv)| match g {
                Some(g) => Ok(g),
                None => nv.var.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let grad_norm = match cfg.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, max)?,
            None => global_norm(&grads)?,
        };
        let lr = schedule.lr(step);
        opt.step(&grads, lr)?;

        let done = step + 1;
        let eval_due = !eval.is_empty()
            && (done == total_steps || cfg.eval_every.is_some_and(|n| done % n == 0));
        let eval_loss = if eval_due {
            Some(evaluate_with(model, &features, eval, cfg, &device)?)
        } else {
            None
        };
        let row = MetricRow {
            step: done as u64,
            epoch: (done * cfg.grad_accum) as f64 / order.batches_per_epoch as f64,
            train_loss: loss_sum / cfg.grad_accum as f64,
            eval_loss,
            lr,
            grad_norm,
            seconds: seconds_before + started.elapsed().as_secs_f64(),
        };
        state.metrics.push(row.clone());
        state.step = done as u64;
        state.seconds = row.seconds;
        if let Some(loss) = eval_loss
            && state.best_eval_loss.is_none_or(|best| loss < best)
        {
            state.best_eval_loss = Some(loss);
            state.best_step = Some(done as u64);
            if let Some(dir) = run_dir {
                PeftAdapter::from_trainable(&trainable, None)?.save(&dir.join("best"))?;
            }
        }
        // Whichever comes first, steps or time; the last step too, so a run killed while its
        // outputs are written resumes without training again.
        let checkpoint_due = checkpointing
            && (done == total_steps
                || cfg.checkpoint_every.is_some_and(|n| done - saved_step >= n)
                || cfg
                    .checkpoint_interval
                    .is_some_and(|t| saved_at.elapsed() >= t));
        if let Some(dir) = run_dir
            && checkpoint_due
        {
            save_checkpoint(dir, &mut state, &trainable, &opt)?;
            write_metrics(&dir.join("metrics.parquet"), &state.metrics)?;
            (saved_step, saved_at) = (done, Instant::now());
        }
        bar.set_position(done as u64);
        bar.set_message(match eval_loss {
            Some(e) => format!("loss {:.4} eval {e:.4}", row.train_loss),
            None => format!("loss {:.4}", row.train_loss),
        });
        if let Some(f) = on_step.as_deref_mut() {
            f(&row);
        }
    }
    bar.finish_and_clear();

    let adapter = PeftAdapter::from_trainable(&trainable, None)?;
    if let Some(dir) = run_dir {
        adapter.save(&dir.join("adapter"))?;
        write_metrics(&dir.join("metrics.parquet"), &state.metrics)?;
    }
    Ok(TrainOutcome {
        adapter,
        metrics: state.metrics,
        best_eval_loss: state.best_eval_loss,
        best_step: state.best_step,
        total_steps,
        num_parameters: trainable.num_parameters(),
        resumed_from,
        discarded_checkpoints,
    })
}

/// Token-weighted mean loss of `examples` under the model's current adapters (inference mode).
pub fn evaluate(
    model: &Lfm2VlModel,
    examples: &[Example],
    cfg: &TrainConfig,
) -> Result<f64, TrainError> {
    let features = FeatureSource::uncached(model);
    evaluate_with(model, &features, examples, cfg, &model.device().clone())
}

fn evaluate_with(
    model: &Lfm2VlModel,
    features: &FeatureSource,
    examples: &[Example],
    cfg: &TrainConfig,
    device: &Device,
) -> Result<f64, TrainError> {
    let (mut sum, mut count) = (0f64, 0usize);
    let indices: Vec<usize> = (0..examples.len()).collect();
    for chunk in indices.chunks(cfg.batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
        let n = Batch::collate(&refs, cfg.loss_on, cfg.pad_id, device)?.num_targets;
        let loss = batch_loss(model, features, Set::Eval, examples, chunk, cfg, device)?;
        sum += f64::from(loss.to_scalar::<f32>()?) * n as f64;
        count += n;
    }
    Ok(if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    })
}

/// Mean cross-entropy over the labelled tokens of the examples at `indices`.
fn batch_loss(
    model: &Lfm2VlModel,
    features: &FeatureSource,
    set: Set,
    examples: &[Example],
    indices: &[usize],
    cfg: &TrainConfig,
    device: &Device,
) -> Result<Tensor, TrainError> {
    let refs: Vec<&Example> = indices.iter().map(|&i| &examples[i]).collect();
    let batch = Batch::collate(&refs, cfg.loss_on, cfg.pad_id, device)?;
    if batch.num_targets == 0 {
        return Err(TrainError::Example {
            index: indices.first().copied().unwrap_or(0),
            message: "no labelled tokens in this batch (is the answer empty?)".into(),
        });
    }
    let image_features = features.features(model, set, examples, indices)?;
    batch_loss_on(model, &batch, image_features.as_ref())
}

/// The loss of a collated batch given its image features (views in example order).
pub fn batch_loss_on(
    model: &Lfm2VlModel,
    batch: &Batch,
    image_features: Option<&Tensor>,
) -> Result<Tensor, TrainError> {
    on_compute_threads(|| batch_loss_inner(model, batch, image_features))
}

/// The gradients of `loss`, computed on rayon's threads like the forward pass
/// ([`batch_loss_on`]), so the backward's products are not handed over from outside the pool.
pub(crate) fn backward(loss: &Tensor) -> candle_core::Result<candle_core::backprop::GradStore> {
    on_compute_threads(|| loss.backward())
}

fn batch_loss_inner(
    model: &Lfm2VlModel,
    batch: &Batch,
    image_features: Option<&Tensor>,
) -> Result<Tensor, TrainError> {
    let embeds = model.embed(&batch.input_ids, image_features)?;
    let mut cache = model.new_cache(batch.batch_size);
    // The decoder computes only the last `keep` positions of each row that any target needs
    // (after the last attention layer, the rest feed nothing the loss reads): for an answer at
    // the end of a prompt that skips about an eighth of the forward and backward.
    let (keep, predict_rows) = tail_rows(batch)?;
    let hidden =
        model
            .text()
            .forward_tail(&embeds, Some(&batch.attention_mask), &mut cache, None, keep)?;
    let d = hidden.dim(2)?;
    // Only the positions that predict a target go through the LM head: with a 65k vocabulary the
    // head over every prompt position would dominate time and memory.
    let rows = hidden
        .reshape((batch.batch_size * keep, d))?
        .index_select(&predict_rows, 0)?;
    let logits = model.text().lm_head(&rows)?;
    Ok(cross_entropy(&logits, &batch.targets)?)
}

/// The positions per row the loss reads, counted from the end (`keep`), and the batch's predict
/// rows as indices into `[batch_size * keep]` instead of `[batch_size * seq_len]`.
fn tail_rows(batch: &Batch) -> Result<(usize, Tensor), TrainError> {
    let l = batch.seq_len;
    let flat = batch.predict_rows.to_vec1::<u32>()?;
    let first = flat.iter().map(|&r| r as usize % l).min().unwrap_or(0);
    let keep = if crate::model::autograd::enabled() {
        (l - first).max(1)
    } else {
        l
    };
    let rows: Vec<u32> = flat
        .iter()
        .map(|&r| {
            let (row, t) = (r as usize / l, r as usize % l);
            (row * keep + t - first) as u32
        })
        .collect();
    let n = rows.len();
    Ok((
        keep,
        Tensor::from_vec(rows, n, batch.predict_rows.device())?,
    ))
}

/// Switches adapters back to inference mode when dropped.
struct InferenceOnDrop(std::sync::Arc<crate::train::lora::TrainMode>);

impl Drop for InferenceOnDrop {
    fn drop(&mut self) {
        self.0.set_training(false);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Set {
    Train,
    Eval,
}

/// Vision-tower output of one example and the views it covers.
type VisionOutputs = (Tensor, Vec<ViewSpan>);

/// Image features per example, caching the frozen vision tower's output when it fits.
struct FeatureSource {
    /// `Some` when the tower is frozen and the cache is enabled.
    cache: Option<RefCell<HashMap<(Set, usize), VisionOutputs>>>,
}

impl FeatureSource {
    fn new(
        model: &Lfm2VlModel,
        trainable: &Trainable,
        train: &[Example],
        eval: &[Example],
        budget: usize,
    ) -> Self {
        let patches: usize = train
            .iter()
            .chain(eval)
            .flat_map(|e| &e.images)
            .flat_map(|im| &im.spatial_shapes)
            .map(|(r, c)| r * c)
            .sum();
        let bytes = patches * model.config().vision.hidden_size * 4;
        let cache = (!trainable.trains_vision_tower(model) && bytes <= budget)
            .then(|| RefCell::new(HashMap::new()));
        Self { cache }
    }

    fn uncached(_model: &Lfm2VlModel) -> Self {
        Self { cache: None }
    }

    /// Projector outputs of every image of the examples at `indices`, in order.
    fn features(
        &self,
        model: &Lfm2VlModel,
        set: Set,
        examples: &[Example],
        indices: &[usize],
    ) -> Result<Option<Tensor>, TrainError> {
        let mut parts = Vec::new();
        for &i in indices {
            let e = &examples[i];
            if e.images.is_empty() {
                continue;
            }
            let cached = self
                .cache
                .as_ref()
                .and_then(|c| c.borrow().get(&(set, i)).cloned());
            let (hidden, spans) = match cached {
                Some(hit) => hit,
                None => {
                    let t = stack_images(&e.images, model.device())?;
                    let shapes: Vec<(usize, usize)> = e
                        .images
                        .iter()
                        .flat_map(|im| im.spatial_shapes.iter().copied())
                        .collect();
                    let (patches, spans) =
                        pack_views(&t.pixel_values, &t.pixel_attention_mask, &shapes)?;
                    let patches = patches.to_dtype(model.dtype())?;
                    let hidden = model
                        .vision()
                        .forward_packed(&patches, &spans, false)?
                        .last_hidden_state;
                    if let Some(c) = &self.cache {
                        c.borrow_mut()
                            .insert((set, i), (hidden.clone(), spans.clone()));
                    }
                    (hidden, spans)
                }
            };
            parts.push(model.projector().forward(&hidden, &spans, false)?.features);
        }
        if parts.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    }
}

/// The seeded order of examples: micro-batch `k` of the run, across epochs.
#[derive(Debug, Clone)]
struct DataOrder {
    n: usize,
    batch_size: usize,
    batches_per_epoch: usize,
    seed: u64,
    permutations: RefCell<HashMap<usize, Vec<usize>>>,
}

impl DataOrder {
    fn new(n: usize, batch_size: usize, seed: u64) -> Self {
        Self {
            n,
            batch_size,
            batches_per_epoch: n.div_ceil(batch_size),
            seed,
            permutations: RefCell::new(HashMap::new()),
        }
    }

    fn permutation(&self, epoch: usize) -> Vec<usize> {
        if let Some(p) = self.permutations.borrow().get(&epoch) {
            return p.clone();
        }
        let mut rng = SeededRng::from_words(&[self.seed, epoch as u64, 0x6461_7461]);
        let mut p: Vec<usize> = (0..self.n).collect();
        rng.shuffle(&mut p);
        self.permutations.borrow_mut().insert(epoch, p.clone());
        p
    }

    fn micro_batch(&self, k: usize) -> Vec<usize> {
        let epoch = k / self.batches_per_epoch;
        let idx = k % self.batches_per_epoch;
        let perm = self.permutation(epoch);
        let start = idx * self.batch_size;
        perm[start..(start + self.batch_size).min(self.n)].to_vec()
    }
}

fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Checkpoints kept: the newest and the one before it, to fall back on if the newest is damaged.
const KEEP_CHECKPOINTS: usize = 2;

fn save_checkpoint(
    run_dir: &Path,
    state: &mut CheckpointState,
    trainable: &Trainable,
    opt: &AdamW,
) -> Result<(), TrainError> {
    let root = checkpoint_dir(run_dir);
    let name = format!("step-{:06}", state.step);
    let dir = root.join(&name);
    std::fs::create_dir_all(&dir).map_err(FileError::create(&dir))?;
    let named = trainable.named_vars();
    let tensors: Vec<(String, Tensor)> = named
        .iter()
        .map(|v| (v.name.clone(), v.var.as_detached_tensor()))
        .collect();
    write_safetensors(&dir.join(TRAINABLE), &tensors)?;
    let mut moments = Vec::new();
    for (v, m) in named.iter().zip(opt.moments()) {
        let shape = v.var.shape().clone();
        moments.push((
            format!("m.{}", v.name),
            Tensor::from_vec(m.m.clone(), shape.clone(), &Device::Cpu)?,
        ));
        moments.push((
            format!("v.{}", v.name),
            Tensor::from_vec(m.v.clone(), shape, &Device::Cpu)?,
        ));
    }
    write_safetensors(&dir.join(OPTIMIZER), &moments)?;
    write_metrics(&dir.join(METRICS), &state.metrics)?;
    state.files.clear();
    for file in [TRAINABLE, OPTIMIZER, METRICS] {
        state
            .files
            .insert(file.to_owned(), file_hash(&dir.join(file))?);
    }
    let json = serde_json::to_vec_pretty(state).map_err(|e| TrainError::Json {
        path: dir.join(STATE),
        message: e.to_string(),
    })?;
    // `state.json` is written last: a folder without it is an interrupted save.
    write_atomic(&dir.join(STATE), &json)?;
    // The pointer moves only once the checkpoint is complete; then older ones can go.
    write_atomic(&root.join(LATEST), name.as_bytes())?;
    for (_, old) in step_dirs(&root).into_iter().skip(KEEP_CHECKPOINTS) {
        // Best effort: a leftover old checkpoint wastes space but breaks nothing.
        let _ = std::fs::remove_dir_all(root.join(old));
    }
    Ok(())
}

/// blake3 of a file's bytes, hex.
fn file_hash(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(FileError::read(path))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// The `step-NNNNNN` folders under `root`, newest first (other names are not ours to touch).
fn step_dirs(root: &Path) -> Vec<(u64, String)> {
    let mut dirs: Vec<(u64, String)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, name))
        })
        .collect();
    dirs.sort_by(|a, b| b.cmp(a));
    dirs
}

/// A checkpoint read from disk and checked, not yet applied to a model.
struct SavedCheckpoint {
    dir: PathBuf,
    state: CheckpointState,
    trainable: HashMap<String, Tensor>,
    moments: HashMap<String, Tensor>,
}

/// The newest intact checkpoint of a run directory and what was wrong with newer ones.
struct Found {
    checkpoint: Option<SavedCheckpoint>,
    /// One sentence per unusable checkpoint (or a `latest` pointing nowhere).
    problems: Vec<String>,
    /// Folder names of the unusable checkpoints.
    damaged: Vec<String>,
    /// `latest` names no checkpoint folder.
    bad_latest: bool,
}

/// What the checkpoints of a run directory offer, checked the way a resume checks them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckpointScan {
    /// The step of the newest intact checkpoint: where training would resume.
    pub step: Option<u64>,
    /// Why newer checkpoints cannot be used, one sentence each.
    pub problems: Vec<String>,
}

/// Looks at the checkpoints of `run_dir` without touching a model (whether they belong to the
/// same settings is only known to [`train`]).
pub fn scan_checkpoints(run_dir: &Path) -> CheckpointScan {
    let found = newest_intact_checkpoint(run_dir);
    CheckpointScan {
        step: found.checkpoint.map(|c| c.state.step),
        problems: found.problems,
    }
}

fn newest_intact_checkpoint(run_dir: &Path) -> Found {
    let root = checkpoint_dir(run_dir);
    let mut found = Found {
        checkpoint: None,
        problems: Vec::new(),
        damaged: Vec::new(),
        bad_latest: false,
    };
    let dirs = step_dirs(&root);
    if let Ok(latest) = std::fs::read_to_string(root.join(LATEST)) {
        let latest = latest.trim();
        if !dirs.iter().any(|(_, name)| name == latest) {
            found.bad_latest = true;
            found.problems.push(format!(
                "`{}` names `{latest}`, which is not a checkpoint",
                root.join(LATEST).display()
            ));
        }
    }
    for (_, name) in dirs {
        match read_checkpoint(&root.join(&name)) {
            Ok(checkpoint) => {
                found.checkpoint = Some(checkpoint);
                break;
            }
            Err(why) => {
                found.problems.push(format!(
                    "checkpoint `{}` cannot be used: {why}",
                    root.join(&name).display()
                ));
                found.damaged.push(name);
            }
        }
    }
    found
}

/// Reads every file of one checkpoint and checks it against the checksums in `state.json`.
fn read_checkpoint(dir: &Path) -> Result<SavedCheckpoint, String> {
    let state_path = dir.join(STATE);
    let text =
        std::fs::read_to_string(&state_path).map_err(|e| format!("cannot read `{STATE}` ({e})"))?;
    let mut state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| format!("`{STATE}` is not valid ({e})"))?;
    for (file, expected) in &state.files {
        let actual = file_hash(&dir.join(file)).map_err(|e| error_text(&e))?;
        if &actual != expected {
            return Err(format!("`{file}` does not match its checksum (damaged)"));
        }
    }
    let tensors = |file: &str| -> Result<HashMap<String, Tensor>, String> {
        Ok(read_safetensors(&dir.join(file), &Device::Cpu)
            .map_err(|e| error_text(&e))?
            .into_iter()
            .collect())
    };
    let trainable = tensors(TRAINABLE)?;
    let moments = tensors(OPTIMIZER)?;
    state.metrics = read_metrics(&dir.join(METRICS)).map_err(|e| error_text(&e))?;
    if state.metrics.len() as u64 != state.step {
        return Err(format!(
            "`{METRICS}` has {} rows for step {}",
            state.metrics.len(),
            state.step
        ));
    }
    Ok(SavedCheckpoint {
        dir: dir.to_path_buf(),
        state,
        trainable,
        moments,
    })
}

/// An error with its causes, on one line.
fn error_text(error: &TrainError) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// Applies a checkpoint of the same settings to the trainable tensors and the optimizer; nothing
/// is changed unless all of it fits.
fn restore_checkpoint(
    saved: SavedCheckpoint,
    fingerprint: &str,
    trainable: &Trainable,
    opt: &mut AdamW,
) -> Result<CheckpointState, TrainError> {
    let mismatch = |message: String| TrainError::CheckpointMismatch {
        path: saved.dir.clone(),
        message,
    };
    if saved.state.fingerprint != fingerprint {
        return Err(mismatch(
            "the training settings or data sizes changed; use a new run directory".into(),
        ));
    }
    let named = trainable.named_vars();
    let mut values = Vec::with_capacity(named.len());
    let mut restored = Vec::with_capacity(named.len());
    for v in &named {
        let t = saved
            .trainable
            .get(&v.name)
            .ok_or_else(|| mismatch(format!("tensor `{}` is missing", v.name)))?;
        if t.shape() != v.var.shape() {
            return Err(mismatch(format!("tensor `{}` has another shape", v.name)));
        }
        values.push(t.to_device(v.var.device())?.to_dtype(v.var.dtype())?);
        let get = |prefix: &str| -> Result<Vec<f32>, TrainError> {
            let key = format!("{prefix}.{}", v.name);
            let t = saved
                .moments
                .get(&key)
                .ok_or_else(|| mismatch(format!("optimizer tensor `{key}` is missing")))?;
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        restored.push(Moments {
            m: get("m")?,
            v: get("v")?,
        });
    }
    // The optimizer checks its moments before taking them, so it goes first.
    opt.restore(restored, saved.state.step)?;
    for (v, value) in named.iter().zip(&values) {
        v.var.set(value)?;
    }
    Ok(saved.state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_order_covers_each_epoch_once() {
        let order = DataOrder::new(10, 3, 5);
        assert_eq!(order.batches_per_epoch, 4);
        let mut seen: Vec<usize> = (0..4).flat_map(|k| order.micro_batch(k)).collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(order.micro_batch(3).len(), 1);
        assert_ne!(order.permutation(0), order.permutation(1));
        assert_eq!(
            order.micro_batch(5),
            DataOrder::new(10, 3, 5).micro_batch(5)
        );
    }
}
