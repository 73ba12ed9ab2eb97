//! Executor behaviour with small in-memory stages.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

use super::*;
use crate::cache::CacheStore;

/// A stage that concatenates its inputs' text and its own word, counting its runs.
struct Word {
    word: String,
    fail: bool,
    runs: Arc<AtomicUsize>,
}

impl Stage for Word {
    fn kind(&self) -> &'static str {
        "word"
    }
    fn code_version(&self) -> u32 {
        1
    }
    fn params(&self) -> Value {
        json!({ "word": self.word })
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.fail {
            return Err("the word is cursed".into());
        }
        let mut text = String::new();
        for input in ctx.inputs {
            text.push_str(&std::fs::read_to_string(input.path("out.txt"))?);
        }
        text.push_str(&self.word);
        std::fs::write(ctx.out_path("out.txt"), text)?;
        Ok(StageOutcome {
            warnings: vec![format!("{} says hi", ctx.name)],
            ..StageOutcome::default()
        })
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    runs: Vec<Arc<AtomicUsize>>,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            runs: (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect(),
        }
    }

    /// a → b → d, c independent; `words` gives each stage's word ("!" fails).
    fn graph(&self, words: [&str; 4]) -> ExecGraph {
        let names = ["a", "b", "c", "d"];
        let inputs: [Vec<usize>; 4] = [vec![], vec![0], vec![], vec![1, 2]];
        ExecGraph {
            pipeline: "test".to_owned(),
            nodes: (0..4)
                .map(|i| ExecNode {
                    name: names[i].to_owned(),
                    inputs: inputs[i].clone(),
                    stage: Box::new(Word {
                        word: words[i].to_owned(),
                        fail: words[i] == "!",
                        runs: self.runs[i].clone(),
                    }),
                })
                .collect(),
        }
    }

    fn run(&self, words: [&str; 4], options: RunOptions) -> RunSummary {
        let store = CacheStore::open(self.dir.path()).unwrap();
        let options = RunOptions {
            quiet: true,
            ..options
        };
        run(&self.graph(words), &store, &options).unwrap()
    }

    fn runs(&self) -> Vec<usize> {
        self.runs.iter().map(|r| r.load(Ordering::SeqCst)).collect()
    }
}

fn statuses(summary: &RunSummary) -> Vec<&'static str> {
    summary.stages.iter().map(|s| s.status.as_str()).collect()
}

const WORDS: [&str; 4] = ["x", "y", "z", "w"];

#[test]
fn second_run_is_all_cached_and_output_is_right() {
    let fixture = Fixture::new();
    let first = fixture.run(WORDS, RunOptions::default());
    assert_eq!(statuses(&first), ["ran"; 4]);
    assert_eq!(
        first.stage("a").unwrap().reason.as_deref(),
        Some("never run")
    );
    let second = fixture.run(WORDS, RunOptions::default());
    assert_eq!(statuses(&second), ["cached"; 4]);
    assert_eq!(fixture.runs(), [1, 1, 1, 1]);
    let d = second.stage("d").unwrap();
    assert_eq!(std::fs::read_to_string(&d.outputs[0]).unwrap(), "xyzw");
    // Warnings survive the cache.
    assert_eq!(d.warnings, ["d says hi"]);
    assert_eq!(first.stage("d").unwrap().fingerprint, d.fingerprint);
}

#[test]
fn a_change_reruns_the_stage_and_what_depends_on_it() {
    let fixture = Fixture::new();
    fixture.run(WORDS, RunOptions::default());
    let summary = fixture.run(["x", "Y", "z", "w"], RunOptions::default());
    assert_eq!(statuses(&summary), ["cached", "ran", "cached", "ran"]);
    assert_eq!(
        summary.stage("b").unwrap().reason.as_deref(),
        Some("parameter `word` changed: \"y\" → \"Y\"")
    );
    assert_eq!(
        summary.stage("d").unwrap().reason.as_deref(),
        Some("input `b` changed")
    );
}

#[test]
fn force_only_and_dry_run() {
    let fixture = Fixture::new();
    let dry = fixture.run(
        WORDS,
        RunOptions {
            dry_run: true,
            ..RunOptions::default()
        },
    );
    assert_eq!(statuses(&dry), ["would run"; 4]);
    assert_eq!(fixture.runs(), [0, 0, 0, 0]);

    let only = fixture.run(
        WORDS,
        RunOptions {
            only: vec!["b".to_owned()],
            ..RunOptions::default()
        },
    );
    assert_eq!(statuses(&only), ["ran", "ran", "skipped", "skipped"]);

    let forced = fixture.run(
        WORDS,
        RunOptions {
            force: vec!["a".to_owned()],
            ..RunOptions::default()
        },
    );
    // a is recomputed; its fingerprint is unchanged, so b stays cached.
    assert_eq!(statuses(&forced), ["ran", "cached", "ran", "ran"]);
    assert_eq!(fixture.runs(), [2, 1, 1, 1]);
}

#[test]
fn a_failure_skips_dependents_and_leaves_no_entry() {
    let fixture = Fixture::new();
    let summary = fixture.run(["x", "!", "z", "w"], RunOptions::default());
    assert_eq!(statuses(&summary), ["ran", "failed", "ran", "skipped"]);
    assert!(!summary.success);
    assert_eq!(
        summary.stage("b").unwrap().reason.as_deref(),
        Some("the word is cursed")
    );
    assert_eq!(
        summary.stage("d").unwrap().reason.as_deref(),
        Some("input `b` did not complete")
    );
    // The failed stage runs again next time rather than being trusted.
    let again = fixture.run(["x", "!", "z", "w"], RunOptions::default());
    assert_eq!(statuses(&again), ["cached", "failed", "cached", "skipped"]);
}

#[test]
fn a_corrupted_entry_is_recomputed() {
    let fixture = Fixture::new();
    let first = fixture.run(WORDS, RunOptions::default());
    std::fs::write(&first.stage("c").unwrap().outputs[0], "garbage!").unwrap();
    let second = fixture.run(WORDS, RunOptions::default());
    assert_eq!(statuses(&second), ["cached", "cached", "ran", "cached"]);
    assert!(
        second
            .stage("c")
            .unwrap()
            .reason
            .as_deref()
            .unwrap()
            .starts_with("cache entry corrupt"),
        "{:?}",
        second.stage("c").unwrap().reason
    );
}

#[test]
fn unknown_stage_names_get_a_hint() {
    let fixture = Fixture::new();
    let store = CacheStore::open(fixture.dir.path()).unwrap();
    let options = RunOptions {
        only: vec!["dd".to_owned()],
        quiet: true,
        ..RunOptions::default()
    };
    let graph = ExecGraph {
        pipeline: "p".to_owned(),
        nodes: vec![ExecNode {
            name: "ddd".to_owned(),
            inputs: vec![],
            stage: Box::new(Word {
                word: "q".to_owned(),
                fail: false,
                runs: Arc::new(AtomicUsize::new(0)),
            }),
        }],
    };
    let error = run(&graph, &store, &options).err().unwrap();
    assert_eq!(
        error.to_string(),
        "unknown stage `dd` in `--only` (did you mean `ddd`?)"
    );
}
