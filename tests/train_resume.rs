//! Kill-and-resume with a real process kill: a child process (this test binary, re-executed on an
//! ignored entry point) trains with checkpoints until it is SIGKILLed after a checkpoint; training
//! resumed from that run directory must end with exactly the adapter of an uninterrupted run.
//!
//! Dropout, gradient accumulation, clipping, warmup and cosine decay are all on, so the test covers
//! every piece of state a checkpoint must carry (or re-derive from the seed and step).

mod train_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vlmpipe::train::batch::Example;
use vlmpipe::train::lora::{LoraConfig, TrainableSpec};
use vlmpipe::train::metrics::{MetricRow, read_metrics};
use vlmpipe::train::optim::{AdamWConfig, Decay};
use vlmpipe::train::trainer::{TrainConfig, TrainOutcome, train};
use vlmpipe::train::{LossOn, TrainError};

use train_support::{AnyResult, TestResult, dataset, examples, processor, tiny_model};

const CHILD_ENV: &str = "VLMPIPE_TRAIN_RESUME_CHILD";
const TOTAL_STEPS: usize = 8;

fn config() -> TrainConfig {
    TrainConfig {
        trainable: TrainableSpec {
            lora: Some(LoraConfig {
                rank: 4,
                alpha: 8.0,
                dropout: 0.1,
                seed: 9,
                ..LoraConfig::default()
            }),
            full: vec!["linear_2".into()],
        },
        optimizer: AdamWConfig {
            lr: 5e-3,
            ..AdamWConfig::default()
        },
        batch_size: 3,
        grad_accum: 2,
        warmup_ratio: 0.25,
        decay: Decay::Cosine,
        max_grad_norm: Some(0.5),
        epochs: 1,
        max_steps: Some(TOTAL_STEPS),
        seed: 4,
        loss_on: LossOn::Answer,
        eval_every: Some(3),
        checkpoint_every: Some(2),
        pad_id: 0,
        progress: false,
        feature_cache_bytes: 1 << 24,
    }
}

fn data() -> AnyResult<(Vec<Example>, Vec<Example>)> {
    let processor = processor()?;
    Ok((
        examples(&processor, &dataset(10, 21))?,
        examples(&processor, &dataset(4, 22))?,
    ))
}

fn run(dir: &Path, on_step: Option<&mut dyn FnMut(&MetricRow)>) -> AnyResult<TrainOutcome> {
    let (train_set, eval_set) = data()?;
    let mut model = tiny_model(3)?;
    Ok(train(
        &mut model,
        &train_set,
        &eval_set,
        &config(),
        Some(dir),
        on_step,
    )?)
}

/// The child's training entry point; only meaningful under [`CHILD_ENV`].
#[test]
#[ignore = "entry point of the child process of kill_and_resume_matches_uninterrupted_run"]
fn resume_child_entry() -> TestResult {
    let dir = std::env::var_os(CHILD_ENV).ok_or("run only as the child of the resume test")?;
    // Slow steps leave the parent a wide window between two checkpoints.
    let mut slow = |_: &MetricRow| std::thread::sleep(Duration::from_millis(300));
    run(Path::new(&dir), Some(&mut slow))?;
    Ok(())
}

fn checkpoint_step(dir: &Path) -> Option<usize> {
    let name = std::fs::read_to_string(dir.join("checkpoints/latest")).ok()?;
    name.trim().strip_prefix("step-")?.parse().ok()
}

#[test]
fn kill_and_resume_matches_uninterrupted_run() -> TestResult {
    let killed = tempfile::tempdir()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--exact", "resume_child_entry", "--ignored", "--nocapture"])
        .env(CHILD_ENV, killed.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let stopped_at = loop {
        if let Some(step) = checkpoint_step(killed.path()).filter(|&s| s >= 4) {
            child.kill()?;
            break step;
        }
        if let Some(status) = child.try_wait()? {
            return Err(format!("the child ended ({status}) before it could be killed").into());
        }
        if Instant::now() > deadline {
            child.kill()?;
            return Err("no checkpoint within 180 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    child.wait()?;
    assert!(
        !killed.path().join("adapter").exists(),
        "the child finished before the kill"
    );

    let resumed = run(killed.path(), None)?;
    let from = resumed.resumed_from.ok_or("the rerun did not resume")? as usize;
    assert!(
        from >= stopped_at && from < TOTAL_STEPS,
        "resumed from {from}"
    );

    let fresh = tempfile::tempdir()?;
    let full = run(fresh.path(), None)?;
    assert_eq!(full.resumed_from, None);

    let (a, b) = (
        resumed.adapter.named_tensors(),
        full.adapter.named_tensors(),
    );
    assert_eq!(a.len(), b.len());
    for ((name, x), (other, y)) in a.iter().zip(&b) {
        assert_eq!(name, other);
        assert_eq!(
            x.flatten_all()?.to_vec1::<f32>()?,
            y.flatten_all()?.to_vec1::<f32>()?,
            "{name}"
        );
    }
    let bytes = |dir: &Path| std::fs::read(dir.join("adapter/adapter_model.safetensors"));
    assert_eq!(bytes(killed.path())?, bytes(fresh.path())?);

    // The metrics table continues the killed run's rows: same losses, one row per step.
    let rows = read_metrics(&killed.path().join("metrics.parquet"))?;
    let steps: Vec<u64> = rows.iter().map(|r| r.step).collect();
    assert_eq!(steps, (1..=TOTAL_STEPS as u64).collect::<Vec<_>>());
    for (r, f) in rows.iter().zip(&full.metrics) {
        assert_eq!(
            (r.train_loss, r.eval_loss, r.lr),
            (f.train_loss, f.eval_loss, f.lr)
        );
    }
    assert_eq!(resumed.best_step, full.best_step);
    Ok(())
}

#[test]
fn a_checkpoint_of_other_settings_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (train_set, eval_set) = data()?;
    let mut cfg = config();
    cfg.max_steps = Some(2);
    let mut model = tiny_model(3)?;
    train(
        &mut model,
        &train_set,
        &eval_set,
        &cfg,
        Some(dir.path()),
        None,
    )?;
    cfg.optimizer.lr *= 2.0;
    let mut model = tiny_model(3)?;
    let err = train(
        &mut model,
        &train_set,
        &eval_set,
        &cfg,
        Some(dir.path()),
        None,
    );
    assert!(
        matches!(err, Err(TrainError::CheckpointMismatch { .. })),
        "{err:?}"
    );
    Ok(())
}
