//! What each stage looked like at its last run, so `--dry-run` and the summary can say *why* a
//! stage runs again ("parameter `lora.r` changed: 8 → 16", "input `pets` changed") rather than
//! only that it has no cache entry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The recorded identity of one stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct StageIdentity {
    pub fingerprint: String,
    pub kind: String,
    pub code_version: u32,
    pub params: Value,
    pub external: Value,
    /// Input stage name → its fingerprint.
    pub inputs: BTreeMap<String, String>,
}

/// Stage name → identity at its last successful computation, per pipeline.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct History {
    stages: BTreeMap<String, StageIdentity>,
}

impl History {
    fn path(cache_root: &Path, pipeline: &str) -> PathBuf {
        let safe: String = pipeline
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        cache_root.join("history").join(format!("{safe}.json"))
    }

    /// Loads the history; a missing or unreadable file is an empty history (it only explains).
    pub(super) fn load(cache_root: &Path, pipeline: &str) -> Self {
        std::fs::read(Self::path(cache_root, pipeline))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Saves atomically (temp file + rename); failures are ignored because history only explains.
    pub(super) fn save(&self, cache_root: &Path, pipeline: &str) {
        let path = Self::path(cache_root, pipeline);
        let Some(dir) = path.parent() else { return };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let Ok(bytes) = serde_json::to_vec_pretty(self) else {
            return;
        };
        let tmp = path.with_extension(format!("json.{}", std::process::id()));
        if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Records a stage's identity after it ran or was found cached.
    pub(super) fn record(&mut self, name: &str, identity: StageIdentity) {
        self.stages.insert(name.to_owned(), identity);
    }

    /// Why a stage whose fingerprint has no cache entry must run.
    pub(super) fn explain(&self, name: &str, now: &StageIdentity) -> String {
        let Some(before) = self.stages.get(name) else {
            return "never run".to_owned();
        };
        if before.fingerprint == now.fingerprint {
            return "cache entry missing or removed".to_owned();
        }
        let mut changes = Vec::new();
        if before.kind != now.kind {
            changes.push(format!("kind changed from `{}`", before.kind));
        } else if let Some(params) = describe_params(&before.params, &now.params, &now.kind) {
            // Parameters of another kind have another shape: comparing them says nothing.
            changes.push(params);
        }
        if before.code_version != now.code_version {
            changes.push(format!("`{}` stage code changed", now.kind));
        }
        if before.external != now.external {
            changes.push("local input files changed".to_owned());
        }
        for (input, fp) in &now.inputs {
            match before.inputs.get(input) {
                Some(old) if old == fp => {}
                Some(_) => changes.push(format!("input `{input}` changed")),
                None => changes.push(format!("new input `{input}`")),
            }
        }
        if changes.is_empty() {
            "inputs changed".to_owned()
        } else {
            changes.join(", ")
        }
    }
}

/// At most this many changed fields are named; the rest are counted.
const MAX_NAMED_CHANGES: usize = 4;
/// Values longer than this (templates, label lists) are cut with an ellipsis.
const MAX_VALUE_CHARS: usize = 40;

/// "parameter `lora.r` changed: 8 → 16", or "parameters changed: `a` 1 → 2, `b` x → y", naming
/// every changed field by its path; `None` when the parameters are equal.
fn describe_params(before: &Value, now: &Value, kind: &str) -> Option<String> {
    let (before, now) = (unwrap_kind(before, kind), unwrap_kind(now, kind));
    let mut changes = Vec::new();
    diff_values("", before, now, &mut changes);
    let named = |c: &Change| format!("`{}` {} → {}", c.path, c.before, c.now);
    match changes.as_slice() {
        [] => None,
        [one] => Some(format!(
            "parameter `{}` changed: {} → {}",
            one.path, one.before, one.now
        )),
        many => {
            let mut listed: Vec<String> = many.iter().take(MAX_NAMED_CHANGES).map(named).collect();
            if many.len() > MAX_NAMED_CHANGES {
                listed.push(format!("{} more", many.len() - MAX_NAMED_CHANGES));
            }
            Some(format!("parameters changed: {}", listed.join(", ")))
        }
    }
}

/// Plan parameters are tagged with their kind (`{"finetune": {...}}`); the tag is no field.
fn unwrap_kind<'v>(params: &'v Value, kind: &str) -> &'v Value {
    match params {
        Value::Object(map) if map.len() == 1 => match map.get(kind) {
            Some(inner @ Value::Object(_)) => inner,
            _ => params,
        },
        _ => params,
    }
}

/// One changed field: its dotted path and both values, compact.
struct Change {
    path: String,
    before: String,
    now: String,
}

/// Collects the leaves that differ; objects are walked key by key, anything else (lists too) is
/// one value.
fn diff_values(path: &str, before: &Value, now: &Value, out: &mut Vec<Change>) {
    if before == now {
        return;
    }
    match (before, now) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => diff_values(&child, x, y, out),
                    (x, y) => out.push(Change {
                        path: child,
                        before: x.map_or_else(|| "unset".to_owned(), compact),
                        now: y.map_or_else(|| "unset".to_owned(), compact),
                    }),
                }
            }
        }
        _ => out.push(Change {
            path: if path.is_empty() {
                "params".to_owned()
            } else {
                path.to_owned()
            },
            before: compact(before),
            now: compact(now),
        }),
    }
}

/// A value as a person reads it: JSON without spaces, `unset` for null, cut when long.
fn compact(value: &Value) -> String {
    let text = match value {
        Value::Null => "unset".to_owned(),
        other => other.to_string(),
    };
    if text.chars().count() <= MAX_VALUE_CHARS {
        return text;
    }
    let cut: String = text.chars().take(MAX_VALUE_CHARS - 1).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn identity(fp: &str, params: Value, inputs: &[(&str, &str)]) -> StageIdentity {
        StageIdentity {
            fingerprint: fp.to_owned(),
            kind: "split".to_owned(),
            code_version: 1,
            params,
            external: Value::Null,
            inputs: inputs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn explains_what_changed() {
        let mut history = History::default();
        history.record(
            "s",
            identity("a", json!({"seed": 1, "train": 0.9}), &[("pets", "x")]),
        );
        let now = identity("b", json!({"seed": 2, "train": 0.9}), &[("pets", "y")]);
        assert_eq!(
            history.explain("s", &now),
            "parameter `seed` changed: 1 → 2, input `pets` changed"
        );
        assert_eq!(history.explain("t", &now), "never run");
        let same = identity("a", json!({"seed": 1, "train": 0.9}), &[("pets", "x")]);
        assert_eq!(
            history.explain("s", &same),
            "cache entry missing or removed"
        );
    }

    /// Issue 13, item 8: a rerun names the changed fields by path, old → new, not the block.
    #[test]
    fn names_changed_fields_by_path_with_old_and_new_values() {
        let finetune = |r: u64, max_steps: Value, targets: &[&str]| StageIdentity {
            kind: "finetune".to_owned(),
            params: json!({"finetune": {
                "lora": {"r": r, "alpha": 16.0, "targets": targets},
                "lr": 0.01,
                "max_steps": max_steps,
                "prompt": "ask",
            }}),
            ..identity(
                &format!("{r}{max_steps}{}", targets.len()),
                Value::Null,
                &[],
            )
        };
        let mut history = History::default();
        history.record("tuned", finetune(8, json!(64), &["w1"]));
        assert_eq!(
            history.explain("tuned", &finetune(16, json!(64), &["w1"])),
            "parameter `lora.r` changed: 8 → 16"
        );
        assert_eq!(
            history.explain("tuned", &finetune(16, json!(6), &["w1", "w2"])),
            "parameters changed: `lora.r` 8 → 16, `lora.targets` [\"w1\"] → [\"w1\",\"w2\"], \
             `max_steps` 64 → 6"
        );
        assert_eq!(
            history.explain("tuned", &finetune(8, Value::Null, &["w1"])),
            "parameter `max_steps` changed: 64 → unset"
        );
    }

    #[test]
    fn long_values_are_cut_and_many_changes_counted() {
        let mut history = History::default();
        let long = "You identify the colour of shapes. ".repeat(4);
        history.record(
            "p",
            identity(
                "a",
                json!({"split": {"system": long, "a": 1, "b": 1, "c": 1, "d": 1}}),
                &[],
            ),
        );
        let now = identity(
            "b",
            json!({"split": {"system": "Be brief.", "a": 2, "b": 2, "c": 2, "d": 2, "e": 2}}),
            &[],
        );
        let text = history.explain("p", &now);
        assert_eq!(
            text,
            "parameters changed: `a` 1 → 2, `b` 1 → 2, `c` 1 → 2, `d` 1 → 2, 2 more"
        );
        history.record("q", identity("a", json!({"system": long}), &[]));
        let text = history.explain("q", &identity("b", json!({"system": "Be brief."}), &[]));
        assert_eq!(
            text,
            "parameter `system` changed: \"You identify the colour of shapes. You… → \"Be brief.\""
        );
    }

    #[test]
    fn round_trips_through_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut history = History::default();
        history.record("s", identity("a", json!({"n": 3}), &[]));
        history.save(dir.path(), "my pipeline");
        let loaded = History::load(dir.path(), "my pipeline");
        assert_eq!(loaded.stages, history.stages);
    }
}
