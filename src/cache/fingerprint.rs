//! Stage fingerprints: blake3 over the stage kind, its canonical parameters, its inputs'
//! fingerprints and the version of the stage kind's code.

use std::fmt;

use serde_json::Value;

/// A stage fingerprint: 64 lower-case hex digits of a blake3 hash. Names a cache entry.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Fingerprint(String);

/// A string that is not a fingerprint (wrong length or not lower-case hex).
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a fingerprint (expected 64 lower-case hex digits)")]
pub struct FingerprintError(pub String);

impl Fingerprint {
    /// Parses 64 lower-case hex digits.
    pub fn parse(text: &str) -> Result<Self, FingerprintError> {
        let ok = text.len() == 64
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(FingerprintError(text.to_owned()))
        }
    }

    /// The fingerprint of arbitrary bytes (used for content hashes of inputs).
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self(blake3::hash(bytes).to_hex().to_string())
    }

    /// The full hex string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, for human-facing listings.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Fingerprint {
    type Error = FingerprintError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Fingerprint> for String {
    fn from(value: Fingerprint) -> Self {
        value.0
    }
}

/// The fingerprint of a stage.
///
/// Hashes `kind`, the canonical JSON of `params` (object keys sorted at every level, no
/// whitespace, so formatting and comments of the pipeline never matter), the input fingerprints
/// in the order given (the order is part of the stage's meaning, e.g. `compare = [a, b]`), and
/// `code_version`, which a stage kind bumps whenever its output for the same inputs changes.
pub fn fingerprint(
    kind: &str,
    params: &Value,
    inputs: &[Fingerprint],
    code_version: u32,
) -> Fingerprint {
    let mut hasher = blake3::Hasher::new();
    // A versioned, length-prefixed framing so no two different tuples hash the same text.
    hasher.update(b"vlmpipe-fingerprint-v1\0");
    for part in [
        kind.as_bytes(),
        canonical_json(params).as_bytes(),
        code_version.to_string().as_bytes(),
    ] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.update(&(inputs.len() as u64).to_le_bytes());
    for input in inputs {
        hasher.update(input.as_str().as_bytes());
    }
    Fingerprint(hasher.finalize().to_hex().to_string())
}

/// Recursively sorts object keys (serde_json preserves insertion order in this build), so
/// parameters print and compare the same however they were built.
pub fn sort_keys(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: std::collections::BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, sort_keys(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

/// Canonical JSON text: object keys sorted (by code point) at every level, no whitespace.
///
/// serde_json's `Map` keeps insertion order in this build (a dependency enables
/// `preserve_order`), so sorting is done here rather than trusted to the map type.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        // Scalars: serde_json prints numbers in their shortest round-trip form, deterministically.
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": [1, 2], "x": "s"}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":"s","y":[1,2]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), r#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
        assert_eq!(fingerprint("k", &a, &[], 1), fingerprint("k", &b, &[], 1));
    }

    #[test]
    fn every_part_changes_the_fingerprint() {
        let p = json!({"n": 1});
        let input = fingerprint("dataset", &json!({}), &[], 1);
        let base = fingerprint("sample", &p, std::slice::from_ref(&input), 1);
        assert_ne!(
            base,
            fingerprint("shuffle", &p, std::slice::from_ref(&input), 1)
        );
        assert_ne!(
            base,
            fingerprint("sample", &json!({"n": 2}), std::slice::from_ref(&input), 1)
        );
        assert_ne!(base, fingerprint("sample", &p, &[], 1));
        assert_ne!(
            base,
            fingerprint("sample", &p, std::slice::from_ref(&input), 2)
        );
        assert_eq!(base, fingerprint("sample", &p, &[input], 1));
    }

    #[test]
    fn fingerprint_is_stable_across_versions_of_this_code() {
        // Golden value: changing the hashing scheme silently invalidates every user's cache.
        let fp = fingerprint("dataset", &json!({"source": "x", "seed": 42}), &[], 1);
        assert_eq!(
            fp.as_str(),
            "eb53fd506827195596e99de36704bf93cf97d3686df358c6f2bf4c492be64674"
        );
        assert_eq!(Fingerprint::parse(fp.as_str()).unwrap(), fp);
        assert!(Fingerprint::parse("ABC").is_err());
        assert!(Fingerprint::parse(&"G".repeat(64)).is_err());
    }
}
