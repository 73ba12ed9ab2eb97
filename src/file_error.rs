//! [`FileError`]: a file operation that failed, naming the file, with the OS error as its cause.
//!
//! One type for every layer that reads or writes files on a stage's behalf, so a message always
//! says which file (`cannot write `…/adapter/adapter_config.json``) instead of a bare
//! "No such file or directory (os error 2)".

use std::fmt;
use std::path::{Path, PathBuf};

/// What was being done to the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileAction {
    Read,
    Write,
    Create,
    Copy,
    List,
    Inspect,
    Remove,
    Lock,
}

impl fmt::Display for FileAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileAction::Read => "read",
            FileAction::Write => "write",
            FileAction::Create => "create",
            FileAction::Copy => "copy to",
            FileAction::List => "list",
            FileAction::Inspect => "inspect",
            FileAction::Remove => "remove",
            FileAction::Lock => "lock",
        })
    }
}

/// A file operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} `{}`", path.display())]
pub struct FileError {
    pub action: FileAction,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl FileError {
    /// For `map_err`: `std::fs::read(&path).map_err(FileError::read(&path))`.
    pub(crate) fn read(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        Self::at(FileAction::Read, path)
    }

    /// For `map_err` on a write.
    pub(crate) fn write(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        Self::at(FileAction::Write, path)
    }

    /// For `map_err` on creating a folder.
    pub(crate) fn create(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        Self::at(FileAction::Create, path)
    }

    /// For `map_err` on copying a file to `path`.
    pub(crate) fn copy_to(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        Self::at(FileAction::Copy, path)
    }

    /// For `map_err` on listing a folder.
    pub(crate) fn list(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        Self::at(FileAction::List, path)
    }

    /// For `map_err` on reading a file's metadata.
    pub(crate) fn inspect(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        Self::at(FileAction::Inspect, path)
    }

    /// For `map_err` on removing a folder.
    pub(crate) fn remove(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        Self::at(FileAction::Remove, path)
    }

    /// For `map_err` on taking a file lock.
    pub(crate) fn lock(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        Self::at(FileAction::Lock, path)
    }

    fn at(action: FileAction, path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        move |source| FileError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_file_and_keeps_the_cause() {
        let path = Path::new("/nowhere/model.json");
        let error = std::fs::read(path)
            .map_err(FileError::read(path))
            .unwrap_err();
        assert_eq!(error.to_string(), "cannot read `/nowhere/model.json`");
        assert_eq!(error.source.kind(), std::io::ErrorKind::NotFound);
        assert!(std::error::Error::source(&error).is_some());
    }

    /// Every layer that reads or writes files reports the one `FileError` (issue 15 item 3), so
    /// a caller matches the action and path instead of a per-layer `Io` variant's text.
    #[test]
    fn every_layer_reports_file_errors_as_file_error() {
        use crate::cache::{CacheError, CacheStore};
        use crate::stages::data::{DataError, read_rows};
        use crate::stages::eval::{EvalError, read_records_parquet};
        use crate::train::TrainError;
        use crate::train::io::read_safetensors;

        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.parquet");
        let is = |e: &FileError, action: FileAction, path: &Path| {
            e.action == action && e.path == path && e.source.kind() == std::io::ErrorKind::NotFound
        };
        match read_rows(&missing) {
            Err(DataError::File(e)) => assert!(is(&e, FileAction::Read, &missing), "{e}"),
            other => panic!("{:?}", other.err()),
        }
        match read_records_parquet(&missing) {
            Err(EvalError::File(e)) => assert!(is(&e, FileAction::Read, &missing), "{e}"),
            other => panic!("{:?}", other.err()),
        }
        match read_safetensors(&missing, &candle_core::Device::Cpu) {
            Err(TrainError::File(e)) => assert!(is(&e, FileAction::Read, &missing), "{e}"),
            other => panic!("{:?}", other.err()),
        }
        // A cache root below a regular file cannot be created.
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").expect("write");
        match CacheStore::open(file.join("cache")) {
            Err(CacheError::File(e)) => assert_eq!(e.action, FileAction::Create, "{e}"),
            other => panic!("{:?}", other.err().map(|e| e.to_string())),
        }
    }
}
