//! The content-addressed cache of stage outputs: Parquet files plus a checksummed manifest per entry.
//!
//! Layout under the cache root (default `.vlmpipe/` beside the pipeline; the caller passes it):
//!
//! ```text
//! <root>/CACHEDIR.TAG            marks the folder for backup tools
//! <root>/lock                    the process lock (fs4); `lock.owner` says who holds it
//! <root>/tmp/<fp>.<pid>.<ns>/    entries being written; never read, cleared on the next lock
//! <root>/entries/<fp>/           committed entries: output files + `manifest.json`
//! ```
//!
//! An entry appears under `entries/` only by renaming a complete temp folder (manifest written
//! last), so a killed writer never leaves an entry that a later lookup trusts. Lookups verify the
//! manifest against the files (see [`Verify`]) and turn a corrupt entry into a miss, removing it.
//!
//! **API Boundary**: the executor calls [`CacheStore`], [`fingerprint()`] and [`CacheLock`]; stages
//! only see the folder an [`EntryWriter`] gives them.

mod fingerprint;
mod lock;
mod manifest;
mod store;

pub use fingerprint::{Fingerprint, FingerprintError, canonical_json, fingerprint, sort_keys};
pub use lock::CacheLock;
pub use manifest::hash_file;
pub use manifest::{FileRecord, MANIFEST_FILE, MANIFEST_VERSION, Manifest};
pub use store::{
    CacheEntry, CacheStore, EntryInfo, EntryWriter, GcPolicy, GcReport, Lookup, MissReason,
    SMALL_FILE_BYTES, Verify, VerifyOutcome,
};

use std::path::PathBuf;

use crate::file_error::FileError;

/// Errors of the cache layer. A corrupt entry is not an error (it is a [`Lookup::Miss`]).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A filesystem operation on the cache failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// Another process holds the cache lock and did not release it in time.
    #[error("the cache `{root}` is locked by another run ({holder}); waited {waited_ms} ms")]
    Locked {
        root: PathBuf,
        holder: String,
        waited_ms: u128,
    },
    /// A lock from one cache was passed to another cache's store.
    #[error("the lock passed is for cache `{lock_root}`, not `{store_root}`")]
    WrongLock {
        lock_root: PathBuf,
        store_root: PathBuf,
    },
    /// The manifest could not be serialised (a bug or non-JSON metadata).
    #[error("cannot write the manifest of `{fingerprint}`: {source}")]
    Manifest {
        fingerprint: String,
        #[source]
        source: serde_json::Error,
    },
    /// A file written into an entry is not valid Parquet (counting its rows failed).
    #[error("`{path}` in a new cache entry is not readable Parquet: {source}")]
    BadParquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// An output path would leave the entry, shadow the manifest, or is not a regular file.
    #[error(
        "invalid output file `{name}` (expected a regular file at a relative path inside the entry, not `manifest.json`)"
    )]
    BadFileName { name: String },
}
