//! Reading the files a pipeline names, bounded by kind.
//!
//! A pipeline file may come from someone else, and so may a dataset's list of image paths: a
//! name like `/dev/zero` or a FIFO would otherwise be read forever. Only regular files are
//! opened (checked before opening, so a FIFO never blocks), and each kind of file has a size
//! limit, enforced by reading at most one byte past it, so a file that grows while it is read
//! is refused too. The limits live here, in one place; README.md ("Limits") lists them.

use std::fmt;
use std::io::Read;
use std::path::Path;

/// What a file is read as; each kind has its own size limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadKind {
    /// A pipeline file or a file it imports.
    PipelineSource,
    /// A prompt template named by `file("...")`.
    Template,
    /// A JSON schema named by `json_schema("...")`.
    JsonSchema,
    /// An image file named by a dataset (a folder entry or a CSV/JSONL path).
    Image,
    /// A `csv(...)` or `jsonl(...)` table: paths and labels, streamed.
    Table,
    /// A Parquet file of a `parquet(...)` source (or a Hub split): images inline, streamed.
    Parquet,
}

const MIB: u64 = 1 << 20;

impl ReadKind {
    /// The most bytes a file of this kind may have.
    pub(crate) fn limit(self) -> u64 {
        match self {
            // Hand-written text: the largest shipped pipeline is a few KiB.
            ReadKind::PipelineSource | ReadKind::Template | ReadKind::JsonSchema => MIB,
            // A camera JPEG is a few MiB; a 64 MiB PNG already decodes to gigapixels.
            ReadKind::Image => 64 * MIB,
            // Streamed, so the limit is not memory: 1 GiB of CSV/JSONL is ten million rows of
            // paths and labels, far more than any image dataset a CPU can evaluate.
            ReadKind::Table => 1024 * MIB,
            // Images are stored inline; the Hub shards datasets into files of a few hundred MiB.
            ReadKind::Parquet => 32 * 1024 * MIB,
        }
    }

    /// The kind's name with its article, for messages ("a template").
    fn with_article(self) -> &'static str {
        match self {
            ReadKind::PipelineSource => "a pipeline source",
            ReadKind::Template => "a template",
            ReadKind::JsonSchema => "a json schema",
            ReadKind::Image => "an image",
            ReadKind::Table => "a csv or jsonl table",
            ReadKind::Parquet => "a parquet file",
        }
    }
}

/// Why a bounded read failed; its `Display` is lower-case and says what to do where it can.
#[derive(Debug)]
pub(crate) enum ReadError {
    Io(std::io::Error),
    /// A device, FIFO, socket or directory: reading it may never end.
    NotRegular(ReadKind),
    TooLarge(ReadKind),
    NotUtf8,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io(e) => f.write_str(&lowercase_io(e)),
            ReadError::NotRegular(kind) => write!(
                f,
                "it is not a regular file ({} must be one)",
                kind.with_article()
            ),
            ReadError::TooLarge(kind) => write!(
                f,
                "it is larger than the {} MiB limit for {}",
                kind.limit() / MIB,
                kind.with_article()
            ),
            ReadError::NotUtf8 => f.write_str("it is not valid utf-8"),
        }
    }
}

impl std::error::Error for ReadError {}

/// An io error as a lower-case phrase for messages.
pub(crate) fn lowercase_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        std::io::ErrorKind::IsADirectory => "it is a directory".to_owned(),
        std::io::ErrorKind::InvalidData => "it is not valid utf-8".to_owned(),
        _ => e.to_string().to_lowercase(),
    }
}

/// Reads a regular file of at most `kind.limit()` bytes.
pub(crate) fn read_bounded(path: &Path, kind: ReadKind) -> Result<Vec<u8>, ReadError> {
    // `metadata` follows symlinks, so a link to a device is refused like the device.
    let meta = std::fs::metadata(path).map_err(ReadError::Io)?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular(kind));
    }
    let limit = kind.limit();
    if meta.len() > limit {
        return Err(ReadError::TooLarge(kind));
    }
    let file = std::fs::File::open(path).map_err(ReadError::Io)?;
    // The file may have been swapped or may grow after `metadata`: read one byte past the limit.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge(kind));
    }
    Ok(bytes)
}

/// Opens a regular file of at most `kind.limit()` bytes for streaming: checked before opening
/// (so a FIFO never blocks) and again on the open handle (so a file swapped in between is seen).
/// Readers that stream it should also stop at the limit ([`BoundedReader`]).
pub(crate) fn open_bounded(path: &Path, kind: ReadKind) -> Result<std::fs::File, ReadError> {
    let check = |meta: std::fs::Metadata| {
        if !meta.is_file() {
            Err(ReadError::NotRegular(kind))
        } else if meta.len() > kind.limit() {
            Err(ReadError::TooLarge(kind))
        } else {
            Ok(())
        }
    };
    check(std::fs::metadata(path).map_err(ReadError::Io)?)?;
    let file = std::fs::File::open(path).map_err(ReadError::Io)?;
    check(file.metadata().map_err(ReadError::Io)?)?;
    Ok(file)
}

/// A reader that fails, naming the limit, once it has read past `kind.limit()` bytes (a file
/// that grows while it is read).
pub(crate) struct BoundedReader<R> {
    inner: R,
    kind: ReadKind,
    read: u64,
}

impl<R: Read> BoundedReader<R> {
    pub(crate) fn new(inner: R, kind: ReadKind) -> Self {
        Self {
            inner,
            kind,
            read: 0,
        }
    }
}

impl<R: Read> Read for BoundedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.kind.limit() {
            return Err(std::io::Error::other(
                ReadError::TooLarge(self.kind).to_string(),
            ));
        }
        Ok(n)
    }
}

/// Opens a CSV/JSONL table: [`open_bounded`], read through a [`BoundedReader`].
pub(crate) fn open_table(path: &Path) -> Result<BoundedReader<std::fs::File>, ReadError> {
    Ok(BoundedReader::new(
        open_bounded(path, ReadKind::Table)?,
        ReadKind::Table,
    ))
}

/// Like [`read_bounded`], for a text file.
pub(crate) fn read_text_bounded(path: &Path, kind: ReadKind) -> Result<String, ReadError> {
    String::from_utf8(read_bounded(path, kind)?).map_err(|_| ReadError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_directories_are_refused_before_reading() {
        let err = read_bounded(Path::new("/dev/zero"), ReadKind::Image).unwrap_err();
        assert_eq!(
            err.to_string(),
            "it is not a regular file (an image must be one)"
        );
        let dir = tempfile::tempdir().unwrap();
        let err = read_bounded(dir.path(), ReadKind::Template).unwrap_err();
        assert!(matches!(err, ReadError::NotRegular(ReadKind::Template)));
    }

    #[test]
    fn the_limit_is_inclusive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.j2");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MIB).unwrap();
        assert_eq!(
            read_bounded(&path, ReadKind::Template).unwrap().len(),
            1 << 20
        );
        file.set_len(MIB + 1).unwrap();
        assert_eq!(
            read_bounded(&path, ReadKind::Template)
                .unwrap_err()
                .to_string(),
            "it is larger than the 1 MiB limit for a template"
        );
    }
}
