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
    /// Exports `out.txt` to this path.
    export_to: Option<std::path::PathBuf>,
    /// Its external state cannot be read (a model that is not there).
    unresolvable: bool,
    /// Runs without missing inputs, naming them (like a report).
    partial: Option<Vec<String>>,
    /// Also writes a file above the fast-verify limit.
    big: bool,
}

impl Word {
    fn new(word: &str, runs: Arc<AtomicUsize>) -> Self {
        Word {
            word: word.to_owned(),
            fail: word == "!",
            runs,
            export_to: None,
            unresolvable: false,
            partial: None,
            big: false,
        }
    }
}

impl Stage for Word {
    fn kind(&self) -> &'static str {
        "word"
    }
    fn code_version(&self) -> u32 {
        1
    }
    fn params(&self) -> Value {
        match &self.partial {
            Some(missing) if !missing.is_empty() => {
                json!({ "word": self.word, "missing": missing })
            }
            _ => json!({ "word": self.word }),
        }
    }
    fn external_state(&self) -> Result<Value, StageError> {
        if self.unresolvable {
            return Err(StageError::msg("model `m` is not in the local Hub cache"));
        }
        Ok(Value::Null)
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<StageOutcome, StageError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.fail {
            return Err(StageError::msg("the word is cursed"));
        }
        let mut text = String::new();
        for input in ctx.inputs {
            text.push_str(&std::fs::read_to_string(input.path("out.txt"))?);
        }
        text.push_str(&self.word);
        std::fs::write(ctx.out_path("out.txt"), text)?;
        if self.big {
            let size = crate::cache::SMALL_FILE_BYTES as usize + 1024;
            std::fs::write(ctx.out_path("big.bin"), vec![b'w'; size])?;
        }
        Ok(StageOutcome {
            warnings: vec![format!("{} says hi", ctx.name)],
            ..StageOutcome::default()
        })
    }
    fn exports(&self) -> Vec<Export> {
        self.export_to
            .iter()
            .map(|target| Export {
                file: "out.txt".to_owned(),
                target: target.clone(),
            })
            .collect()
    }
    fn without_inputs(&self, missing: &[MissingInput]) -> Option<Box<dyn Stage>> {
        let partial = self.partial.as_ref()?;
        let mut names = partial.clone();
        names.extend(missing.iter().map(|m| m.name.clone()));
        Some(Box::new(Word {
            word: self.word.clone(),
            fail: self.fail,
            runs: self.runs.clone(),
            export_to: self.export_to.clone(),
            unresolvable: false,
            partial: Some(names),
            big: false,
        }))
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
                    stage: Box::new(Word::new(words[i], self.runs[i].clone())),
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
            stage: Box::new(Word::new("q", Arc::new(AtomicUsize::new(0)))),
        }],
    };
    let error = run(&graph, &store, &options).err().unwrap();
    assert_eq!(
        error.to_string(),
        "unknown stage `dd` in `--only` (did you mean `ddd`?)"
    );
}

/// A graph of `Word`s from (name, inputs, stage) triples.
fn graph_of(nodes: Vec<(&str, Vec<usize>, Word)>) -> ExecGraph {
    ExecGraph {
        pipeline: "test".to_owned(),
        nodes: nodes
            .into_iter()
            .map(|(name, inputs, stage)| ExecNode {
                name: name.to_owned(),
                inputs,
                stage: Box::new(stage),
            })
            .collect(),
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        quiet: true,
        ..RunOptions::default()
    }
}

#[test]
fn exports_follow_the_entry_whether_it_ran_or_was_cached() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path().join("cache")).unwrap();
    let target = dir.path().join("evals/a/out.txt");
    let graph = |word: &str| {
        let mut stage = Word::new(word, Arc::new(AtomicUsize::new(0)));
        stage.export_to = Some(target.clone());
        graph_of(vec![("a", vec![], stage)])
    };
    let first = run(&graph("one"), &store, &quiet()).unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "one");
    assert!(first.stage("a").unwrap().outputs.contains(&target));
    run(&graph("two"), &store, &quiet()).unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "two");
    // Back to the first word: cached, and the export is the cached entry's again.
    let again = run(&graph("one"), &store, &quiet()).unwrap();
    assert_eq!(statuses(&again), ["cached"]);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "one");
    // A deleted export is restored by the next run.
    std::fs::remove_file(&target).unwrap();
    run(&graph("one"), &store, &quiet()).unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "one");
    // No absolute path of the project is stored in the entry.
    let manifest = std::fs::read_to_string(
        std::path::Path::new(&again.stage("a").unwrap().outputs[0])
            .parent()
            .unwrap()
            .join("manifest.json"),
    )
    .unwrap();
    assert!(!manifest.contains("evals"), "{manifest}");
    // A dry run writes nothing, and lists only exports equal to the entry.
    std::fs::write(&target, "stale").unwrap();
    let dry = run(
        &graph("one"),
        &store,
        &RunOptions {
            dry_run: true,
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "stale");
    assert!(!dry.stage("a").unwrap().outputs.contains(&target));
}

#[test]
fn a_stage_that_cannot_resolve_fails_and_the_rest_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let runs: Vec<_> = (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    // a → c, b (unresolvable) → d; e reads a and b and can do without b, like a report.
    let build = || {
        let mut b = Word::new("b", runs[1].clone());
        b.unresolvable = true;
        let mut e = Word::new("e", runs[3].clone());
        e.partial = Some(Vec::new());
        graph_of(vec![
            ("a", vec![], Word::new("a", runs[0].clone())),
            ("b", vec![], b),
            ("c", vec![0], Word::new("c", runs[2].clone())),
            ("d", vec![1], Word::new("d", Arc::new(AtomicUsize::new(0)))),
            ("e", vec![0, 1], e),
        ])
    };
    let summary = run(&build(), &store, &quiet()).unwrap();
    assert_eq!(
        statuses(&summary),
        ["ran", "failed", "ran", "skipped", "ran"]
    );
    assert!(
        summary
            .stage("b")
            .unwrap()
            .reason
            .as_deref()
            .unwrap()
            .contains("model `m` is not in the local Hub cache")
    );
    let e = summary.stage("e").unwrap();
    assert!(
        e.reason.as_deref().unwrap().contains("without `b`"),
        "{e:?}"
    );
    assert_eq!(std::fs::read_to_string(&e.outputs[0]).unwrap(), "ae");
    // The partial output is cached under its own fingerprint (the missing set is a parameter)…
    let again = run(&build(), &store, &quiet()).unwrap();
    assert_eq!(statuses(&again)[4], "cached");
    assert_eq!(again.stage("e").unwrap().fingerprint, e.fingerprint);
    // …never under the complete one.
    let mut complete = Word::new("e", Arc::new(AtomicUsize::new(0)));
    complete.partial = Some(Vec::new());
    let whole = graph_of(vec![
        ("a", vec![], Word::new("a", Arc::new(AtomicUsize::new(0)))),
        ("b", vec![], Word::new("b", Arc::new(AtomicUsize::new(0)))),
        ("e", vec![0, 1], complete),
    ]);
    let summary = run(&whole, &store, &quiet()).unwrap();
    assert_eq!(statuses(&summary), ["cached", "ran", "ran"]);
    let e = summary.stage("e").unwrap();
    assert_eq!(std::fs::read_to_string(&e.outputs[0]).unwrap(), "abe");
}

#[test]
fn an_input_of_a_stage_that_runs_is_verified_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let store = CacheStore::open(dir.path()).unwrap();
    let build = |word: &str| {
        let mut a = Word::new("a", Arc::new(AtomicUsize::new(0)));
        a.big = true;
        graph_of(vec![
            ("a", vec![], a),
            ("b", vec![0], Word::new(word, Arc::new(AtomicUsize::new(0)))),
        ])
    };
    let first = run(&build("b"), &store, &quiet()).unwrap();
    let big = first
        .stage("a")
        .unwrap()
        .outputs
        .iter()
        .find(|p| p.ends_with("big.bin"))
        .unwrap()
        .clone();
    // Same size, same mtime, other bytes: a fast lookup cannot see it.
    let mtime = std::fs::metadata(&big).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&big).unwrap();
    bytes[10] = b'X';
    std::fs::write(&big, bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&big)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    // Nothing runs: nothing is rehashed beyond the fast check.
    assert_eq!(
        statuses(&run(&build("b"), &store, &quiet()).unwrap()),
        ["cached", "cached"]
    );
    // `b` runs and reads `a`: `a` is checked in full first, found corrupt and recomputed.
    let summary = run(&build("B"), &store, &quiet()).unwrap();
    assert_eq!(statuses(&summary), ["ran", "ran"]);
    assert!(
        summary
            .stage("a")
            .unwrap()
            .reason
            .as_deref()
            .unwrap()
            .starts_with("cache entry corrupt"),
    );
}

#[test]
fn a_dry_run_says_would_run_not_ran() {
    let fixture = Fixture::new();
    fixture.run(["x", "y", "z", "w"], RunOptions::default());
    let dry = fixture.run(
        ["x", "Y", "z", "w"],
        RunOptions {
            dry_run: true,
            ..RunOptions::default()
        },
    );
    let table = dry.render_table();
    let last = table.lines().last().unwrap();
    assert!(
        last.starts_with("dry run, nothing ran: 2 would run, 2 cached, 0 failed, 0 skipped"),
        "{table}"
    );
    let real = fixture.run(["x", "Y", "z", "w"], RunOptions::default());
    assert!(
        real.render_table()
            .lines()
            .last()
            .unwrap()
            .starts_with("2 ran, 2 cached")
    );
}
