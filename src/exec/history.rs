//! What each stage looked like at its last run, so `--dry-run` and the summary can say *why* a
//! stage runs again ("parameter `seed` changed", "input `pets` changed") rather than only that it
//! has no cache entry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The recorded identity of one stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageIdentity {
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
pub struct History {
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
    pub fn load(cache_root: &Path, pipeline: &str) -> Self {
        std::fs::read(Self::path(cache_root, pipeline))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Saves atomically (temp file + rename); failures are ignored because history only explains.
    pub fn save(&self, cache_root: &Path, pipeline: &str) {
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
    pub fn record(&mut self, name: &str, identity: StageIdentity) {
        self.stages.insert(name.to_owned(), identity);
    }

    /// Why a stage whose fingerprint has no cache entry must run.
    pub fn explain(&self, name: &str, now: &StageIdentity) -> String {
        let Some(before) = self.stages.get(name) else {
            return "never run".to_owned();
        };
        if before.fingerprint == now.fingerprint {
            return "cache entry missing or removed".to_owned();
        }
        let mut changes = Vec::new();
        if before.kind != now.kind {
            changes.push(format!("kind changed from `{}`", before.kind));
        }
        if before.code_version != now.code_version {
            changes.push(format!("`{}` stage code changed", now.kind));
        }
        changes.extend(
            changed_keys(&before.params, &now.params)
                .into_iter()
                .map(|k| format!("parameter `{k}` changed")),
        );
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

/// Top-level keys whose values differ (params are objects for every stage kind).
fn changed_keys(before: &Value, now: &Value) -> Vec<String> {
    match (before, now) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<String> = a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(*v))
                .map(|(k, _)| k.clone())
                .collect();
            keys.extend(b.keys().filter(|k| !a.contains_key(*k)).cloned());
            keys.sort();
            keys.dedup();
            keys
        }
        _ if before != now => vec!["params".to_owned()],
        _ => Vec::new(),
    }
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
            "parameter `seed` changed, input `pets` changed"
        );
        assert_eq!(history.explain("t", &now), "never run");
        let same = identity("a", json!({"seed": 1, "train": 0.9}), &[("pets", "x")]);
        assert_eq!(
            history.explain("s", &same),
            "cache entry missing or removed"
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
