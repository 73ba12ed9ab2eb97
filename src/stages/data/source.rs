//! Sources: where a dataset's rows come from, read in chunks of raw rows.
//!
//! Row ids are stable across machines and runs: `<file stem>:<row index>` for Parquet, CSV and
//! JSONL (the index counts data rows of that file from 0), the `/`-separated path relative to
//! the folder for image folders, and `synthetic:<index>` for generated data.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use arrow::array::{
    Array, ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, StructArray,
};
use arrow::datatypes::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use walkdir::WalkDir;

use super::{DataError, SyntheticSpec};
use crate::file_error::FileError;
use crate::read_limits::{ReadKind, open_bounded, open_table};
use crate::read_policy::ReadPolicy;

/// Rows read per chunk (one chunk is probed in parallel, then written).
pub(crate) const CHUNK_ROWS: usize = 256;

/// Extensions an image folder source picks up (case-insensitive); other files are ignored.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// Where a dataset's rows come from.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceSpec {
    /// Parquet files in shard order (what [`crate::hub::Hub::dataset_split_files`] resolves an
    /// `hf(...)` source to). The image column is a struct `{bytes, path}` (the Hub's Image
    /// feature), binary, or a string path relative to the Parquet file.
    Parquet { files: Vec<PathBuf> },
    /// A local folder in the Hub's layout (`data/train-00000-of-00001.parquet`, …).
    ParquetDir {
        dir: PathBuf,
        split: String,
        config: Option<String>,
    },
    /// A folder with one sub-folder per class.
    Folder { dir: PathBuf },
    /// A CSV file with a header; image paths relative to the file.
    Csv { path: PathBuf },
    /// A JSON-lines file of objects; image paths relative to the file.
    Jsonl { path: PathBuf },
    /// Generated shapes (offline quickstart and tests).
    Synthetic(SyntheticSpec),
}

/// Where a row's label comes from.
///
/// An image folder always labels by its class folder: `FromSource` and `Names` use the folder
/// name as is, `Mapped` reads it as an integer key (folders `0/`, `1/`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelSpec {
    /// The source names its own labels: the class folder, or the synthetic class.
    FromSource,
    /// The column holds class names (ints are used as their decimal text).
    Names { column: String },
    /// The column holds integers mapped to class names; an unmapped value is an error.
    Mapped {
        column: String,
        mapping: BTreeMap<i64, String>,
    },
}

impl LabelSpec {
    fn column(&self) -> Option<&str> {
        match self {
            LabelSpec::FromSource => None,
            LabelSpec::Names { column } | LabelSpec::Mapped { column, .. } => Some(column),
        }
    }
}

/// An image as the source gives it.
#[derive(Clone, Debug)]
pub(crate) enum RawImage {
    Bytes(Vec<u8>),
    File(PathBuf),
    Synthetic(usize),
    /// No image: the reason goes to `errors.parquet`.
    Missing(String),
}

/// A label as the source gives it.
#[derive(Clone, Debug)]
pub(crate) enum RawLabel {
    Int(i64),
    Text(String),
    /// Named by the source itself (folder or synthetic class).
    Given(String),
    Missing,
}

#[derive(Clone, Debug)]
pub(crate) struct RawRow {
    pub(crate) row_id: String,
    pub(crate) image: RawImage,
    pub(crate) label: RawLabel,
}

type Chunks = Box<dyn Iterator<Item = Result<Vec<RawRow>, DataError>>>;

/// An opened source: its rows, and what it passed over.
pub(crate) struct Opened {
    pub(crate) chunks: Chunks,
    /// Files of a folder source that are not images (no image extension), relative to the
    /// folder, sorted: skipped, not error rows, but worth saying.
    pub(crate) skipped: Vec<String>,
    /// How many rows `chunks` yields, when the source knows without reading them (the sources
    /// listed in memory; a Parquet source's footers say it through
    /// [`SourceSpec::row_count_hint`]).
    pub(crate) rows: Option<usize>,
}

impl SourceSpec {
    /// What identifies the source's current content, for the dataset fingerprint: paths with
    /// size and mtime of every file it reads (hashed into one digest; a stat per file, no
    /// reads, so a no-change rerun over 10,000 images stays fast).
    /// `image_column` locates the image paths of CSV/JSONL sources; a path `reads` refuses
    /// is not looked at (it is an error row, and its absence from the stamp tells the two apart).
    pub(crate) fn stamp(
        &self,
        image_column: &str,
        reads: &ReadPolicy,
    ) -> Result<serde_json::Value, DataError> {
        self.expect_readable(reads)?;
        let files: Vec<PathBuf> = match self {
            SourceSpec::Parquet { files } => files.clone(),
            SourceSpec::ParquetDir { dir, split, config } => {
                parquet_dir_files(dir, split, config.as_deref())?
            }
            SourceSpec::Folder { dir } => {
                // Unreadable entries have no metadata; their paths still enter the digest.
                let mut hasher = blake3::Hasher::new();
                let mut files = Vec::new();
                for entry in folder_rows(dir, reads)?.entries {
                    if entry.problem.is_some() {
                        hasher.update(entry.path.to_string_lossy().as_bytes());
                        hasher.update(&[0]);
                    } else {
                        files.push(entry.path);
                    }
                }
                return stamp_files(&files, hasher);
            }
            SourceSpec::Csv { path } | SourceSpec::Jsonl { path } => {
                let mut files = vec![path.clone()];
                let rows = text_rows(
                    self,
                    path,
                    &LabelSpec::FromSource,
                    image_column,
                    true,
                    reads,
                )?;
                for row in rows {
                    if let RawImage::File(p) = row.image {
                        files.push(p);
                    }
                }
                files
            }
            SourceSpec::Synthetic(spec) => {
                return Ok(serde_json::json!({ "synthetic": spec }));
            }
        };
        stamp_files(&files, blake3::Hasher::new())
    }

    /// The number of rows the source will yield, when cheap to know (for progress bars).
    pub fn row_count_hint(&self) -> Option<u64> {
        match self {
            SourceSpec::Parquet { files } => parquet_rows(files),
            SourceSpec::ParquetDir { dir, split, config } => {
                parquet_rows(&parquet_dir_files(dir, split, config.as_deref()).ok()?)
            }
            SourceSpec::Synthetic(spec) => Some(spec.n as u64),
            SourceSpec::Folder { .. } | SourceSpec::Csv { .. } | SourceSpec::Jsonl { .. } => None,
        }
    }

    /// The source's own files (its folder, table or Parquet files), refused as a whole when
    /// `reads` does not allow them.
    fn expect_readable(&self, reads: &ReadPolicy) -> Result<(), DataError> {
        let (what, paths): (&'static str, Vec<&Path>) = match self {
            SourceSpec::Parquet { files } => {
                ("parquet file", files.iter().map(PathBuf::as_path).collect())
            }
            SourceSpec::ParquetDir { dir, .. } => ("parquet folder", vec![dir.as_path()]),
            SourceSpec::Folder { dir } => ("image folder", vec![dir.as_path()]),
            SourceSpec::Csv { path } => ("csv file", vec![path.as_path()]),
            SourceSpec::Jsonl { path } => ("jsonl file", vec![path.as_path()]),
            SourceSpec::Synthetic(_) => return Ok(()),
        };
        for path in paths {
            reads.check(path).map_err(|refused| DataError::BadSource {
                what,
                path: path.to_path_buf(),
                message: format!("it {}; {}", refused.reason(), refused.hint()),
            })?;
        }
        Ok(())
    }

    /// Opens the source as chunks of raw rows; what `reads` refuses is not read (a refused
    /// image is an error row).
    pub(crate) fn open(
        &self,
        image_column: &str,
        label: &LabelSpec,
        reads: &ReadPolicy,
    ) -> Result<Opened, DataError> {
        self.expect_readable(reads)?;
        let mut rows_known = None;
        let chunks = match self {
            SourceSpec::Parquet { files } => parquet_chunks(files.clone(), image_column, label)?,
            SourceSpec::ParquetDir { dir, split, config } => parquet_chunks(
                parquet_dir_files(dir, split, config.as_deref())?,
                image_column,
                label,
            )?,
            SourceSpec::Folder { dir } => {
                let listing = folder_rows(dir, reads)?;
                let rows: Vec<RawRow> = listing
                    .entries
                    .into_iter()
                    .map(
                        |FolderEntry {
                             id,
                             path,
                             class,
                             problem,
                         }| RawRow {
                            row_id: id,
                            image: match problem {
                                Some(reason) => RawImage::Missing(reason),
                                None => RawImage::File(path),
                            },
                            // A mapping applies to folder names (`0/`, `1/`); otherwise they are classes.
                            label: match label {
                                LabelSpec::Mapped { .. } => RawLabel::Text(class),
                                _ => RawLabel::Given(class),
                            },
                        },
                    )
                    .collect();
                return Ok(Opened {
                    rows: Some(rows.len()),
                    chunks: chunked(rows),
                    skipped: listing.skipped,
                });
            }
            SourceSpec::Csv { path } | SourceSpec::Jsonl { path } => {
                if label.column().is_none() {
                    return Err(DataError::LabelColumnNeeded);
                }
                let rows = text_rows(self, path, label, image_column, false, reads)?;
                rows_known = Some(rows.len());
                chunked(rows)
            }
            SourceSpec::Synthetic(spec) => {
                let rows: Vec<RawRow> = (0..spec.n)
                    .map(|i| RawRow {
                        row_id: format!("synthetic:{i:06}"),
                        image: RawImage::Synthetic(i),
                        label: RawLabel::Given(spec.class_of(i)),
                    })
                    .collect();
                rows_known = Some(rows.len());
                chunked(rows)
            }
        };
        Ok(Opened {
            chunks,
            skipped: Vec::new(),
            rows: rows_known,
        })
    }
}

/// Adds path, size and mtime of each of `files` to `hasher`: a source's stamp.
fn stamp_files(
    files: &[PathBuf],
    mut hasher: blake3::Hasher,
) -> Result<serde_json::Value, DataError> {
    for path in files {
        let meta = std::fs::metadata(path).map_err(FileError::inspect(path))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        hasher.update(path.to_string_lossy().as_bytes());
        hasher.update(&[0]);
        hasher.update(&meta.len().to_le_bytes());
        hasher.update(&mtime.to_le_bytes());
    }
    Ok(serde_json::json!({
        "files": files.len(),
        "digest": hasher.finalize().to_hex().to_string(),
    }))
}

/// Total rows of Parquet files from their footers.
fn parquet_rows(files: &[PathBuf]) -> Option<u64> {
    use parquet::file::reader::FileReader;
    let mut total = 0u64;
    for path in files {
        let file = open_bounded(path, ReadKind::Parquet).ok()?;
        let reader = parquet::file::reader::SerializedFileReader::new(file).ok()?;
        total += u64::try_from(reader.metadata().file_metadata().num_rows()).ok()?;
    }
    Some(total)
}

fn chunked(rows: Vec<RawRow>) -> Chunks {
    let mut rows = rows.into_iter().peekable();
    Box::new(std::iter::from_fn(move || {
        rows.peek()?;
        Some(Ok(rows.by_ref().take(CHUNK_ROWS).collect()))
    }))
}

fn parquet_dir_files(
    dir: &Path,
    split: &str,
    config: Option<&str>,
) -> Result<Vec<PathBuf>, DataError> {
    let listed = crate::hub::list_relative_files(dir).map_err(|e| DataError::BadSource {
        what: "parquet folder",
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let chosen = crate::hub::select_split_files(&listed, config, split);
    if chosen.is_empty() {
        return Err(DataError::BadSource {
            what: "parquet folder",
            path: dir.to_path_buf(),
            message: format!("no Parquet files for split `{split}` in the Hub layout"),
        });
    }
    Ok(chosen.iter().map(|rel| dir.join(rel)).collect())
}

/// One image entry of a class-per-folder tree.
struct FolderEntry {
    /// The path relative to the folder, `/`-separated: the row id.
    id: String,
    path: PathBuf,
    class: String,
    /// Why the entry cannot be read (a dangling link, a link loop), recorded as an error row.
    problem: Option<String>,
}

/// What a class-per-folder tree holds.
struct FolderListing {
    /// Image entries, sorted by id.
    entries: Vec<FolderEntry>,
    /// Files without an image extension, relative to the folder, sorted.
    skipped: Vec<String>,
}

/// Every image in a class-per-folder tree, sorted by id. Files without an image extension are
/// skipped (and listed), even when unreadable; an image entry (or a link loop, or something that
/// is not a regular file) that cannot be read becomes an entry with its problem, so one bad
/// entry costs its row, not the dataset. A symlink that leaves what `reads` allows is such an
/// entry too, and a linked folder outside is not listed.
fn folder_rows(dir: &Path, reads: &ReadPolicy) -> Result<FolderListing, DataError> {
    if !dir.is_dir() {
        return Err(DataError::BadSource {
            what: "image folder",
            path: dir.to_path_buf(),
            message: "not a folder".to_owned(),
        });
    }
    let has_image_extension = |path: &Path| {
        path.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
    };
    // `(id, class)` of a path inside `dir` with a class folder component.
    let id_and_class = |path: &Path| -> Option<(String, String)> {
        let rel = path.strip_prefix(dir).ok()?;
        let parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        (parts.len() >= 2).then(|| (parts.join("/"), parts[0].clone()))
    };
    let rel_id = |path: &Path| {
        path.strip_prefix(dir)
            .unwrap_or(path)
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/")
    };
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    // From depth 1, so a class folder that is a link is checked too.
    let mut walk = WalkDir::new(dir)
        .min_depth(1)
        .follow_links(true)
        .into_iter();
    while let Some(item) = walk.next() {
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                let Some(path) = e.path().map(Path::to_path_buf) else {
                    return Err(FileError::list(dir)(e.into()).into());
                };
                if e.depth() == 0 {
                    return Err(FileError::list(dir)(e.into()).into());
                }
                let is_loop = e.loop_ancestor().is_some();
                if !is_loop && !has_image_extension(&path) {
                    skipped.push(rel_id(&path));
                    continue;
                }
                let Some((id, class)) = id_and_class(&path) else {
                    continue;
                };
                let problem = match e.loop_ancestor() {
                    Some(ancestor) => format!(
                        "symlink loop: `{}` points to its ancestor `{}`",
                        path.display(),
                        ancestor.display()
                    ),
                    None => format!("cannot read `{}`: {}", path.display(), e),
                };
                rows.push(FolderEntry {
                    id,
                    path,
                    class,
                    problem: Some(problem),
                });
                continue;
            }
        };
        // Only a link can lead outside `dir` (itself checked by the caller), so only links
        // cost a path resolution: a no-change rerun over 10,000 plain files stays a stat each.
        if item.path_is_symlink()
            && let Err(refused) = reads.check(item.path())
        {
            // A linked folder outside is one error row: listing it would already read it.
            // A file beside the class folders is ignored, as it would be inside.
            if item.file_type().is_dir() {
                walk.skip_current_dir();
            } else if item.depth() < 2 || !has_image_extension(item.path()) {
                continue;
            }
            let rel = item.path().strip_prefix(dir).unwrap_or(item.path());
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            rows.push(FolderEntry {
                id: parts.join("/"),
                path: item.path().to_path_buf(),
                class: parts.first().cloned().unwrap_or_default(),
                problem: Some(refused.to_string()),
            });
            continue;
        }
        if item.file_type().is_dir() {
            continue;
        }
        if !has_image_extension(item.path()) {
            skipped.push(rel_id(item.path()));
            continue;
        }
        if item.depth() < 2 {
            continue;
        }
        // Depth 2 guarantees a class folder component.
        let Some((id, class)) = id_and_class(item.path()) else {
            continue;
        };
        // A FIFO, socket or device named like an image is an error row, never opened.
        let problem = (!item.file_type().is_file()).then(|| {
            format!(
                "`{}` is not a regular file (a FIFO, socket or device); only files are read",
                item.path().display()
            )
        });
        rows.push(FolderEntry {
            id,
            path: item.path().to_path_buf(),
            class,
            problem,
        });
    }
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    skipped.sort();
    if rows.iter().all(|r| r.problem.is_some()) {
        return Err(DataError::BadSource {
            what: "image folder",
            path: dir.to_path_buf(),
            message: "no images in class sub-folders (expected <folder>/<class>/<image>)"
                .to_owned(),
        });
    }
    Ok(FolderListing {
        entries: rows,
        skipped,
    })
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rows".to_owned())
}

/// Rows of a CSV or JSONL file. With `lenient`, a missing label column is allowed (for stamps).
fn text_rows(
    spec: &SourceSpec,
    path: &Path,
    label: &LabelSpec,
    image_column: &str,
    lenient: bool,
    reads: &ReadPolicy,
) -> Result<Vec<RawRow>, DataError> {
    let base = path.parent().unwrap_or(Path::new("."));
    let stem = file_stem(path);
    let resolve = |text: &str| -> RawImage {
        if text.trim().is_empty() {
            return RawImage::Missing("empty image path".to_owned());
        }
        let image = base.join(text.trim());
        match reads.check(&image) {
            Ok(_) => RawImage::File(image),
            Err(refused) => RawImage::Missing(refused.to_string()),
        }
    };
    let label_col = label.column();
    let mut rows = Vec::new();
    match spec {
        SourceSpec::Csv { .. } => {
            let file = open_table(path).map_err(|e| DataError::BadSource {
                what: "csv file",
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            let mut reader = csv::Reader::from_reader(file);
            let headers = reader.headers().map_err(|e| csv_error(path, e))?.clone();
            let find = |name: &str| {
                headers
                    .iter()
                    .position(|h| h == name)
                    .ok_or_else(|| DataError::MissingColumn {
                        path: path.to_path_buf(),
                        column: name.to_owned(),
                        available: headers.iter().collect::<Vec<_>>().join(", "),
                    })
            };
            let image_idx = find(image_column)?;
            let label_idx = match label_col {
                Some(c) if !lenient => Some(find(c)?),
                _ => None,
            };
            for (i, record) in reader.records().enumerate() {
                let record = record.map_err(|e| csv_error(path, e))?;
                let label = match label_idx.and_then(|idx| record.get(idx)) {
                    Some(v) if !v.trim().is_empty() => RawLabel::Text(v.trim().to_owned()),
                    _ => RawLabel::Missing,
                };
                rows.push(RawRow {
                    row_id: format!("{stem}:{i}"),
                    image: resolve(record.get(image_idx).unwrap_or("")),
                    label,
                });
            }
        }
        _ => {
            let file = open_table(path).map_err(|e| DataError::BadSource {
                what: "jsonl file",
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            let mut index = 0;
            for (line_no, line) in BufReader::new(file).lines().enumerate() {
                let line = line.map_err(FileError::read(path))?;
                if line.trim().is_empty() {
                    continue;
                }
                let value: serde_json::Value =
                    serde_json::from_str(&line).map_err(|e| DataError::BadSource {
                        what: "jsonl file",
                        path: path.to_path_buf(),
                        message: format!("line {}: {e}", line_no + 1),
                    })?;
                let image = match value.get(image_column) {
                    Some(serde_json::Value::String(s)) => resolve(s),
                    Some(_) => RawImage::Missing(format!("`{image_column}` is not a string path")),
                    None => RawImage::Missing(format!("no `{image_column}` field")),
                };
                let label = match label_col.and_then(|c| value.get(c)) {
                    Some(serde_json::Value::Number(n)) => match n.as_i64() {
                        Some(v) => RawLabel::Int(v),
                        None => RawLabel::Text(n.to_string()),
                    },
                    Some(serde_json::Value::String(s)) if !s.trim().is_empty() => {
                        RawLabel::Text(s.trim().to_owned())
                    }
                    _ => RawLabel::Missing,
                };
                rows.push(RawRow {
                    row_id: format!("{stem}:{index}"),
                    image,
                    label,
                });
                index += 1;
            }
        }
    }
    Ok(rows)
}

fn csv_error(path: &Path, e: csv::Error) -> DataError {
    DataError::BadSource {
        what: "csv file",
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Streams Parquet files batch by batch.
struct ParquetChunks {
    files: std::vec::IntoIter<PathBuf>,
    current: Option<(PathBuf, String, ParquetRecordBatchReader, usize)>,
    image_column: String,
    label_column: String,
}

fn parquet_chunks(
    files: Vec<PathBuf>,
    image_column: &str,
    label: &LabelSpec,
) -> Result<Chunks, DataError> {
    let label_column = label
        .column()
        .ok_or(DataError::LabelColumnNeeded)?
        .to_owned();
    Ok(Box::new(ParquetChunks {
        files: files.into_iter(),
        current: None,
        image_column: image_column.to_owned(),
        label_column,
    }))
}

impl ParquetChunks {
    fn open_next(&mut self) -> Option<Result<(), DataError>> {
        let path = self.files.next()?;
        Some(self.open_file(path))
    }

    fn open_file(&mut self, path: PathBuf) -> Result<(), DataError> {
        let file = open_bounded(&path, ReadKind::Parquet).map_err(|e| DataError::BadSource {
            what: "parquet file",
            path: path.clone(),
            message: e.to_string(),
        })?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(DataError::parquet(&path))?;
        let schema = builder.schema().clone();
        let position = |name: &str| {
            schema.index_of(name).map_err(|_| DataError::MissingColumn {
                path: path.clone(),
                column: name.to_owned(),
                available: schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        };
        let indices = [position(&self.image_column)?, position(&self.label_column)?];
        let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(CHUNK_ROWS)
            .build()
            .map_err(DataError::parquet(&path))?;
        let stem = file_stem(&path);
        self.current = Some((path, stem, reader, 0));
        Ok(())
    }

    fn convert(
        &self,
        batch: &RecordBatch,
        path: &Path,
        stem: &str,
        first: usize,
    ) -> Result<Vec<RawRow>, DataError> {
        let image =
            batch
                .column_by_name(&self.image_column)
                .ok_or_else(|| DataError::MissingColumn {
                    path: path.to_path_buf(),
                    column: self.image_column.clone(),
                    available: String::new(),
                })?;
        let label =
            batch
                .column_by_name(&self.label_column)
                .ok_or_else(|| DataError::MissingColumn {
                    path: path.to_path_buf(),
                    column: self.label_column.clone(),
                    available: String::new(),
                })?;
        let images = image_values(image, path, &self.image_column)?;
        let labels = label_values(label, path, &self.label_column)?;
        Ok(images
            .into_iter()
            .zip(labels)
            .enumerate()
            .map(|(i, (image, label))| RawRow {
                row_id: format!("{stem}:{}", first + i),
                image,
                label,
            })
            .collect())
    }
}

impl Iterator for ParquetChunks {
    type Item = Result<Vec<RawRow>, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.current.is_none() {
                if let Err(e) = self.open_next()? {
                    return Some(Err(e));
                }
                continue;
            }
            let (path, stem, reader, offset) = self.current.as_mut()?;
            match reader.next() {
                None => self.current = None,
                Some(Err(e)) => {
                    return Some(Err(DataError::Arrow {
                        path: path.clone(),
                        source: e,
                    }));
                }
                Some(Ok(batch)) => {
                    let first = *offset;
                    *offset += batch.num_rows();
                    let (path, stem) = (path.clone(), stem.clone());
                    return Some(self.convert(&batch, &path, &stem, first));
                }
            }
        }
    }
}

fn cast(array: &ArrayRef, to: &DataType, path: &Path, column: &str) -> Result<ArrayRef, DataError> {
    arrow::compute::cast(array, to).map_err(|_| DataError::ColumnType {
        path: path.to_path_buf(),
        column: column.to_owned(),
        found: array.data_type().to_string(),
        expected: format!("something castable to {to}"),
    })
}

fn image_values(array: &ArrayRef, path: &Path, column: &str) -> Result<Vec<RawImage>, DataError> {
    let base = path.parent().unwrap_or(Path::new("."));
    match array.data_type() {
        DataType::Struct(_) => {
            let structs = array
                .as_any()
                .downcast_ref::<StructArray>()
                .ok_or_else(|| type_error(array, path, column))?;
            let bytes = match structs.column_by_name("bytes") {
                Some(b) => Some(cast(b, &DataType::Binary, path, column)?),
                None => None,
            };
            let paths = match structs.column_by_name("path") {
                Some(p) => Some(cast(p, &DataType::Utf8, path, column)?),
                None => None,
            };
            let bytes = bytes
                .as_ref()
                .and_then(|b| b.as_any().downcast_ref::<BinaryArray>());
            let paths = paths
                .as_ref()
                .and_then(|p| p.as_any().downcast_ref::<StringArray>());
            if bytes.is_none() && paths.is_none() {
                return Err(type_error(array, path, column));
            }
            Ok((0..structs.len())
                .map(|i| {
                    if structs.is_null(i) {
                        return RawImage::Missing("null image".to_owned());
                    }
                    if let Some(b) = bytes.filter(|b| !b.is_null(i)) {
                        return RawImage::Bytes(b.value(i).to_vec());
                    }
                    match paths.filter(|p| !p.is_null(i)) {
                        Some(p) if !p.value(i).is_empty() => RawImage::File(base.join(p.value(i))),
                        _ => {
                            RawImage::Missing("image struct has neither bytes nor path".to_owned())
                        }
                    }
                })
                .collect())
        }
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
            let bytes = cast(array, &DataType::Binary, path, column)?;
            let bytes = bytes
                .as_any()
                .downcast_ref::<BinaryArray>()
                .ok_or_else(|| type_error(array, path, column))?;
            Ok((0..bytes.len())
                .map(|i| {
                    if bytes.is_null(i) {
                        RawImage::Missing("null image".to_owned())
                    } else {
                        RawImage::Bytes(bytes.value(i).to_vec())
                    }
                })
                .collect())
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let paths = cast(array, &DataType::Utf8, path, column)?;
            let paths = paths
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| type_error(array, path, column))?;
            Ok((0..paths.len())
                .map(|i| {
                    if paths.is_null(i) || paths.value(i).is_empty() {
                        RawImage::Missing("null image path".to_owned())
                    } else {
                        RawImage::File(base.join(paths.value(i)))
                    }
                })
                .collect())
        }
        _ => Err(type_error(array, path, column)),
    }
}

fn type_error(array: &ArrayRef, path: &Path, column: &str) -> DataError {
    DataError::ColumnType {
        path: path.to_path_buf(),
        column: column.to_owned(),
        found: array.data_type().to_string(),
        expected: "struct {bytes, path}, binary, or a string path".to_owned(),
    }
}

fn label_values(array: &ArrayRef, path: &Path, column: &str) -> Result<Vec<RawLabel>, DataError> {
    let is_int = matches!(
        array.data_type(),
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64
    ) || matches!(array.data_type(), DataType::Dictionary(_, v) if v.is_integer());
    if is_int {
        let ints = cast(array, &DataType::Int64, path, column)?;
        let ints = ints
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| type_error(array, path, column))?;
        Ok(ints
            .iter()
            .map(|v| v.map_or(RawLabel::Missing, RawLabel::Int))
            .collect())
    } else {
        let text = cast(array, &DataType::Utf8, path, column)?;
        let text = text
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| type_error(array, path, column))?;
        Ok(text
            .iter()
            .map(|v| match v {
                Some(s) if !s.trim().is_empty() => RawLabel::Text(s.trim().to_owned()),
                _ => RawLabel::Missing,
            })
            .collect())
    }
}
