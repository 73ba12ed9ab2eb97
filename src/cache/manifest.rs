//! The manifest of a cache entry: what produced it and what it holds, with checksums.

use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::Fingerprint;

/// File name of the manifest inside an entry folder. Written last, so its presence in a committed
/// entry means every file it lists was complete when the entry was renamed into place.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Version of the manifest format; a manifest of another version is treated as a miss.
pub const MANIFEST_VERSION: u32 = 1;

/// Description of one committed cache entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`] at write time.
    pub version: u32,
    /// Name of the stage that produced the entry (for `cache ls`; not part of the identity).
    pub stage: String,
    /// Stage kind (`dataset`, `split`, `eval`, …).
    pub kind: String,
    /// The fingerprint the entry is stored under.
    pub fingerprint: Fingerprint,
    /// Fingerprints of the entries this one was computed from (for reachability in `gc`).
    #[serde(default)]
    pub inputs: Vec<Fingerprint>,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix_s: u64,
    /// The output files, sorted by name.
    pub files: Vec<FileRecord>,
    /// Free-form stage metadata (counts, label lists, timings…).
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// One output file of an entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Plain file name inside the entry folder.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// blake3 of the contents, hex.
    pub blake3: String,
    /// Modification time (ns since the epoch) when the checksum was last confirmed; lets a fast
    /// lookup skip rehashing big files that nobody touched.
    pub mtime_ns: u64,
    /// Row count for Parquet files (from the footer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
}

impl Manifest {
    /// Total size of the entry's files in bytes.
    pub(crate) fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The record of file `name`, if the entry holds it.
    pub fn file(&self, name: &str) -> Option<&FileRecord> {
        self.files.iter().find(|f| f.name == name)
    }
}

/// Modification time of `meta` in ns since the epoch (0 when the platform cannot say).
pub(crate) fn mtime_ns(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// blake3 of a file's contents, streamed in fixed-size chunks.
pub(crate) fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher.finalize().to_hex().to_string())
}
