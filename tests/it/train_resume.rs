//! Kill-and-resume with a real process kill: a child process (this test binary, re-executed on an
//! ignored entry point) trains with checkpoints until it is SIGKILLed after a checkpoint; training
//! resumed from that run directory must end with exactly the adapter of an uninterrupted run.
//!
//! Dropout, gradient accumulation, clipping, warmup and cosine decay are all on, so the test covers
//! every piece of state a checkpoint must carry (or re-derive from the seed and step).
//!
//! A damaged checkpoint (truncated weights, flipped bytes, a bad `state.json`, `latest` pointing
//! nowhere) never wedges a run: training falls back to the newest intact checkpoint or starts
//! over, says so, and still ends with the uninterrupted run's adapter.

use crate::train_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vlmpipe::train::batch::Example;
use vlmpipe::train::lora::{LoraConfig, TrainableSpec};
use vlmpipe::train::metrics::{MetricRow, read_metrics};
use vlmpipe::train::optim::{AdamWConfig, Decay};
use vlmpipe::train::trainer::{CheckpointScan, TrainConfig, TrainOutcome, scan_checkpoints, train};
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
        checkpoint_interval: None,
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
        .args([
            "--exact",
            "train_resume::resume_child_entry",
            "--ignored",
            "--nocapture",
        ])
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

/// Trains in `dir` and stops abruptly once step `stop_after` is done (after its checkpoint), the
/// way a crash would: by unwinding out of the step callback.
fn interrupted(dir: &Path, stop_after: u64) -> TestResult {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut stop = |row: &MetricRow| {
            if row.step == stop_after {
                std::panic::resume_unwind(Box::new("interrupted on purpose"));
            }
        };
        run(dir, Some(&mut stop))
    }));
    match result {
        Err(_) => Ok(()),
        Ok(_) => Err("the interrupted run finished".into()),
    }
}

fn copy_tree(from: &Path, to: &Path) -> TestResult {
    std::fs::create_dir_all(to)?;
    for item in std::fs::read_dir(from)? {
        let item = item?;
        let target = to.join(item.file_name());
        if item.file_type()?.is_dir() {
            copy_tree(&item.path(), &target)?;
        } else {
            std::fs::copy(item.path(), target)?;
        }
    }
    Ok(())
}

fn adapter_bytes(dir: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(dir.join("adapter/adapter_model.safetensors"))
}

/// Issue 13, item 10: each kind of damage falls back to the newest intact checkpoint (or starts
/// over), names the damaged file, and ends with exactly the uninterrupted run's adapter.
#[test]
fn a_damaged_checkpoint_falls_back_or_starts_over() -> TestResult {
    let fresh = tempfile::tempdir()?;
    let full = run(fresh.path(), None)?;
    assert!(full.discarded_checkpoints.is_empty());
    let expected = adapter_bytes(fresh.path())?;

    // Stopped after step 5: checkpoints at steps 2 and 4 (the two newest are kept).
    let stopped = tempfile::tempdir()?;
    interrupted(stopped.path(), 5)?;
    let checkpoints = stopped.path().join("checkpoints");
    assert_eq!(
        scan_checkpoints(stopped.path()),
        CheckpointScan {
            step: Some(4),
            problems: Vec::new()
        }
    );

    type Damage = fn(&Path) -> std::io::Result<()>;
    let truncate: Damage = |c| {
        let path = c.join("step-000004/trainable.safetensors");
        let bytes = std::fs::read(&path)?;
        std::fs::write(&path, &bytes[..bytes.len() / 2])
    };
    let flip_a_byte: Damage = |c| {
        let path = c.join("step-000004/optimizer.safetensors");
        let mut bytes = std::fs::read(&path)?;
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&path, bytes)
    };
    let bad_state: Damage = |c| std::fs::write(c.join("step-000004/state.json"), "{\"step\": ");
    let latest_nowhere: Damage = |c| std::fs::write(c.join("latest"), "step-000099");
    let all_damaged: Damage = |c| {
        std::fs::write(c.join("step-000004/state.json"), "not json")?;
        std::fs::remove_file(c.join("step-000002/metrics.parquet"))
    };
    // (damage, step resumed from, text naming the problem)
    let cases: [(&str, Damage, Option<u64>, &str); 5] = [
        (
            "truncated weights",
            truncate,
            Some(2),
            "trainable.safetensors",
        ),
        (
            "flipped byte",
            flip_a_byte,
            Some(2),
            "optimizer.safetensors",
        ),
        ("bad state.json", bad_state, Some(2), "state.json"),
        (
            "latest pointing nowhere",
            latest_nowhere,
            Some(4),
            "step-000099",
        ),
        (
            "every checkpoint damaged",
            all_damaged,
            None,
            "metrics.parquet",
        ),
    ];
    for (what, damage, from, named) in cases {
        let dir = tempfile::tempdir()?;
        copy_tree(stopped.path(), dir.path())?;
        damage(&dir.path().join("checkpoints"))?;
        let scan = scan_checkpoints(dir.path());
        assert_eq!(scan.step, from, "{what}: {scan:?}");
        let resumed = run(dir.path(), None).map_err(|e| format!("{what}: {e}"))?;
        assert_eq!(resumed.resumed_from, from, "{what}");
        assert!(
            resumed
                .discarded_checkpoints
                .iter()
                .any(|p| p.contains(named)),
            "{what}: {:?}",
            resumed.discarded_checkpoints
        );
        assert_eq!(resumed.discarded_checkpoints, scan.problems, "{what}");
        assert!(
            adapter_bytes(dir.path())? == expected,
            "{what}: another adapter than the uninterrupted run's"
        );
        // The damaged checkpoints are gone: the next resume has nothing to complain about.
        assert_eq!(
            scan_checkpoints(dir.path()).problems,
            Vec::<String>::new(),
            "{what}"
        );
    }
    assert!(checkpoints.join("step-000004").is_dir());
    Ok(())
}

/// Issue 13, item 9: with the default settings a run checkpoints (by steps and by time) and
/// after the last step, keeping the two newest checkpoints.
#[test]
fn default_settings_checkpoint_by_steps_and_time() -> TestResult {
    let defaults = TrainConfig::default();
    assert_eq!(defaults.checkpoint_every, Some(50));
    assert_eq!(defaults.checkpoint_interval, Some(Duration::from_secs(60)));

    // Every step takes longer than the interval, so every step is checkpointed.
    let dir = tempfile::tempdir()?;
    let (train_set, eval_set) = data()?;
    let mut model = tiny_model(3)?;
    let cfg = TrainConfig {
        checkpoint_every: Some(1000),
        checkpoint_interval: Some(Duration::from_millis(50)),
        max_steps: Some(4),
        ..config()
    };
    let slow = |_: &MetricRow| std::thread::sleep(Duration::from_millis(60));
    let mut seen = Vec::new();
    let mut watch = |row: &MetricRow| {
        slow(row);
        seen.push(std::fs::read_to_string(dir.path().join("checkpoints/latest")).ok());
    };
    train(
        &mut model,
        &train_set,
        &eval_set,
        &cfg,
        Some(dir.path()),
        Some(&mut watch),
    )?;
    // Each step after the first starts at least one interval after the last save, so the time
    // rule saves steps 2 and 3 (step 1 only if computing it took that long); the last step is
    // always saved.
    assert_eq!(
        seen[1..],
        [
            Some("step-000002".to_owned()),
            Some("step-000003".to_owned()),
            Some("step-000004".to_owned())
        ]
    );
    let mut kept: Vec<String> = std::fs::read_dir(dir.path().join("checkpoints"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    kept.sort();
    assert_eq!(kept, ["latest", "step-000003", "step-000004"]);
    Ok(())
}
