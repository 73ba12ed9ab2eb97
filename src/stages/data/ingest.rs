//! The dataset stage: read a source, check each image, filter, store images once, write tables.
//!
//! Per chunk of rows: explicit drops first (their images are never read), then the label
//! (an unmapped or missing label stops the stage with an error naming the row: a wrong mapping
//! is a pipeline bug, not bad data), then the image is loaded and probed in parallel across
//! `threads` (an unreadable image is recorded in `errors.parquet` and stays in `rows.parquet` as
//! an error row without an image, so an eval reports it; a full check decodes with the
//! `max_image_pixels` cap), then the
//! `keep` mode and `max_image_size` filters (recorded in `filtered.parquet`). Kept rows keep the
//! source's order.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;

use crate::file_error::FileError;
use crate::read_limits::{ReadKind, read_bounded};
use crate::read_policy::ReadPolicy;

use super::image_store::{ImageStoreWriter, image_id};
use super::source::{RawImage, RawLabel, RawRow};
use super::{
    DataError, ERRORS_FILE, FILTERED_FILE, IMAGES_FILE, ImageCheck, ImageInfo, LabelSpec,
    ROWS_FILE, RowRecord, RowTable, SourceSpec, probe_image, write_rows,
};
use crate::model::processor::{DEFAULT_MAX_IMAGE_PIXELS, decode_image_capped};

/// Row filters of a dataset.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FilterSpec {
    /// Keep only images whose PIL-style mode is listed (`keep = rgb_only` → `["RGB"]`).
    pub modes: Option<Vec<String>>,
    /// Drop images whose longest side exceeds this many pixels.
    pub max_image_size: Option<u32>,
    /// Decoding refuses images whose header declares more pixels than this (`None`:
    /// [`DEFAULT_MAX_IMAGE_PIXELS`], PIL's cap): a full check records them in `errors.parquet`,
    /// an eval as error rows. Skipped in serialisation when unset so fingerprints keep their shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_image_pixels: Option<u64>,
    /// Row ids to drop; ids that match no row are reported in [`IngestReport::unknown_drop_ids`].
    pub drop: Vec<String>,
}

impl FilterSpec {
    /// The decoded-pixel cap in force.
    pub(crate) fn max_pixels(&self) -> u64 {
        self.max_image_pixels.unwrap_or(DEFAULT_MAX_IMAGE_PIXELS)
    }
}

/// Everything the dataset stage needs.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetSpec {
    pub source: SourceSpec,
    /// Image column of Parquet/CSV/JSONL sources (ignored by folders and synthetic data).
    pub image_column: String,
    pub label: LabelSpec,
    /// The class list (`labels NAME = [...]`): fixes `label_index` order and rejects other labels.
    /// Without it: mapping values in key order, synthetic classes, or the sorted labels seen.
    pub classes: Option<Vec<String>>,
    pub filters: FilterSpec,
    pub check: ImageCheck,
    /// Worker threads for reading and probing images; 0 = the machine's parallelism. Not
    /// serialised: it never changes the output, so it must not change a fingerprint either.
    #[serde(skip)]
    pub threads: usize,
    /// Where the source may read ([`ReadPolicy`]: a pipeline's folder, the Hub cache,
    /// `--allow-read`); `None` is the source's own folder only. The user's consent, so never
    /// serialised: what it lets through shows in the source stamp instead.
    #[serde(skip)]
    pub reads: Option<ReadPolicy>,
}

impl DatasetSpec {
    /// What identifies the source's current content (see [`SourceSpec::stamp`]); the executor
    /// mixes it into the dataset fingerprint so edited local data reruns the stage.
    pub fn source_stamp(&self) -> Result<serde_json::Value, DataError> {
        self.source.stamp(&self.image_column, &self.read_policy())
    }

    /// The policy in force: [`Self::reads`], else the source's own files (named by whoever
    /// built the spec) and its folder (for image paths inside a table).
    pub(crate) fn read_policy(&self) -> ReadPolicy {
        if let Some(reads) = &self.reads {
            return reads.clone();
        }
        let (own, named): (&Path, Vec<&Path>) = match &self.source {
            SourceSpec::Folder { dir } | SourceSpec::ParquetDir { dir, .. } => {
                (dir.as_path(), vec![dir.as_path()])
            }
            SourceSpec::Csv { path } | SourceSpec::Jsonl { path } => (
                path.parent().unwrap_or(Path::new(".")),
                vec![path.as_path()],
            ),
            SourceSpec::Parquet { files } => (
                files
                    .first()
                    .and_then(|f| f.parent())
                    .unwrap_or(Path::new(".")),
                files.iter().map(std::path::PathBuf::as_path).collect(),
            ),
            SourceSpec::Synthetic(_) => (Path::new("."), Vec::new()),
        };
        named
            .into_iter()
            .fold(ReadPolicy::within(own), ReadPolicy::allowing)
    }

    /// A spec with the defaults (`image` column, labels from the source, no filters).
    pub fn new(source: SourceSpec) -> Self {
        Self {
            source,
            image_column: "image".to_owned(),
            label: LabelSpec::FromSource,
            classes: None,
            filters: FilterSpec::default(),
            check: ImageCheck::Header,
            threads: 0,
            reads: None,
        }
    }
}

/// What the dataset stage did (stored as the cache entry's metadata; shown by reports).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IngestReport {
    /// Rows the source yielded.
    pub rows_read: usize,
    /// Rows in `rows.parquet` with a usable image (its error rows are counted in `errors`).
    pub rows_kept: usize,
    /// Distinct images in `images.parquet`.
    pub images_stored: usize,
    /// Kept rows whose image bytes equal an earlier row's (stored once).
    pub duplicate_images: usize,
    /// Rows in `errors.parquet` (also in `rows.parquet`, with their reason and no image).
    pub errors: usize,
    /// The first few `(row id, reason)` of `errors.parquet`, for messages.
    pub error_examples: Vec<(String, String)>,
    /// Rows removed per filter (`drop`, `mode`, `max_image_size`).
    pub filtered: BTreeMap<String, usize>,
    /// `drop` ids that matched no row (likely a typo or a different dataset revision).
    pub unknown_drop_ids: Vec<String>,
    /// Files of a folder source skipped because they are not images (no image extension).
    #[serde(default)]
    pub skipped_non_images: usize,
    /// The first few of them, relative to the folder, for messages.
    #[serde(default)]
    pub skipped_examples: Vec<String>,
    /// Class list in `label_index` order.
    pub classes: Vec<String>,
    /// Kept rows with a usable image, per class.
    pub class_counts: BTreeMap<String, usize>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The columns of [`ERRORS_FILE`] and [`FILTERED_FILE`].
pub(super) const ERRORS_COLUMNS: [&str; 2] = ["row_id", "reason"];
pub(super) const FILTERED_COLUMNS: [&str; 3] = ["row_id", "filter", "detail"];

/// Error examples kept in the report (the full list is in `errors.parquet`).
const ERROR_EXAMPLES: usize = 10;

/// Runs the dataset stage, writing [`ROWS_FILE`], [`IMAGES_FILE`], [`ERRORS_FILE`] and
/// [`FILTERED_FILE`] into `out_dir`. `progress` is advanced by rows read.
pub fn ingest(
    spec: &DatasetSpec,
    out_dir: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<IngestReport, DataError> {
    let start = Instant::now();
    if let Some(total) = spec.source.row_count_hint() {
        progress.set_length(total);
    }
    let mut store = ImageStoreWriter::create(&out_dir.join(IMAGES_FILE))?;
    let checked = check_rows(spec, None, &mut store, progress)?;
    let images_stored = store.finish()?;
    let mut report = finish(spec, checked, images_stored, out_dir)?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// What reading and checking rows of a source gave, before the class list is known (a shard
/// of a dataset stops here; the merge of its shards goes on with [`finish`]).
#[derive(Default)]
pub(super) struct Checked {
    /// Rows for `rows.parquet` (error rows included), in source order.
    pub(super) kept: Vec<Kept>,
    /// `errors.parquet` rows: row id, reason.
    pub(super) errors: Vec<Vec<String>>,
    /// `filtered.parquet` rows: row id, filter, detail.
    pub(super) filtered: Vec<Vec<String>>,
    /// `drop` ids that matched a row.
    pub(super) seen_drops: BTreeSet<String>,
    /// Rows the source yielded (in the range asked for).
    pub(super) rows_read: usize,
    /// Files of a folder source that are not images: how many, and the first few.
    pub(super) skipped_non_images: usize,
    pub(super) skipped_examples: Vec<String>,
    /// Kept rows whose image an earlier kept row already stored.
    pub(super) duplicate_images: usize,
}

/// Which rows of a source to read: given the source's row count, the positions to keep.
pub(super) type RowRange<'a> = &'a dyn Fn(usize) -> Range<usize>;

/// Reads the source's rows (those at the positions `part` gives for the source's row count
/// only, when given: whole rows, in order), applies drops and labels, loads and probes each
/// image, applies the filters, and pushes each distinct kept image into `store`.
pub(super) fn check_rows(
    spec: &DatasetSpec,
    part: Option<RowRange<'_>>,
    store: &mut ImageStoreWriter,
    progress: &indicatif::ProgressBar,
) -> Result<Checked, DataError> {
    if let SourceSpec::Synthetic(synthetic) = &spec.source {
        synthetic.validate()?;
    }
    let threads = match spec.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
        n => n,
    };
    let drops: HashSet<&str> = spec.filters.drop.iter().map(String::as_str).collect();
    let mut stored_ids: HashSet<String> = HashSet::new();
    let mut checked = Checked::default();

    let reads = spec.read_policy();
    let opened = spec.source.open(&spec.image_column, &spec.label, &reads)?;
    checked.skipped_non_images = opened.skipped.len();
    checked.skipped_examples = opened.skipped.into_iter().take(ERROR_EXAMPLES).collect();
    let rows = match part {
        Some(part) => {
            let total = match opened.rows {
                Some(n) => n,
                None => count_rows(spec, &reads)?,
            };
            let range = part(total);
            progress.set_length(range.len() as u64);
            Some(range)
        }
        None => None,
    };
    // Position in the source of the next chunk's first row.
    let mut position = 0usize;
    for chunk in opened.chunks {
        if rows.as_ref().is_some_and(|r| position >= r.end) {
            // Past the range: the rest of the source is another shard's.
            break;
        }
        let chunk = chunk?;
        let first = position;
        position += chunk.len();
        let chunk: Vec<RawRow> = match &rows {
            Some(r) => chunk
                .into_iter()
                .enumerate()
                .filter(|(i, _)| r.contains(&(first + i)))
                .map(|(_, row)| row)
                .collect(),
            None => chunk,
        };
        checked.rows_read += chunk.len();
        progress.inc(chunk.len() as u64);
        let mut todo = Vec::with_capacity(chunk.len());
        for row in chunk {
            if drops.contains(row.row_id.as_str()) {
                checked.seen_drops.insert(row.row_id.clone());
                checked.filtered.push(vec![
                    row.row_id,
                    "drop".to_owned(),
                    "listed in `drop`".to_owned(),
                ]);
                continue;
            }
            let label = resolve_label(
                &row.row_id,
                &row.label,
                &spec.label,
                spec.classes.as_deref(),
            )?;
            todo.push((row.row_id, label, row.image));
        }
        let mut images: Vec<RawImage> = todo
            .iter_mut()
            .map(|t| std::mem::replace(&mut t.2, RawImage::Missing(String::new())))
            .collect();
        let probed = probe_parallel(&mut images, spec, &reads, threads);
        for ((row_id, label, _), outcome) in todo.into_iter().zip(probed) {
            let (id, bytes, info) = match outcome {
                Ok(ok) => ok,
                Err(reason) => {
                    checked.errors.push(vec![row_id.clone(), reason.clone()]);
                    // Kept as a row without an image: whatever evaluates it reports the reason.
                    checked.kept.push(Kept {
                        row_id,
                        image_id: String::new(),
                        label,
                        image_error: Some(reason),
                    });
                    continue;
                }
            };
            if let Some(modes) = &spec.filters.modes
                && !modes.contains(&info.mode)
            {
                let detail = format!("mode {} not in [{}]", info.mode, modes.join(", "));
                checked
                    .filtered
                    .push(vec![row_id, "mode".to_owned(), detail]);
                continue;
            }
            if let Some(limit) = spec.filters.max_image_size
                && info.width.max(info.height) > limit
            {
                let detail = format!("{}x{} exceeds {limit}", info.width, info.height);
                checked
                    .filtered
                    .push(vec![row_id, "max_image_size".to_owned(), detail]);
                continue;
            }
            if stored_ids.insert(id.clone()) {
                store.push(id.clone(), bytes, info)?;
            } else {
                checked.duplicate_images += 1;
            }
            checked.kept.push(Kept {
                row_id,
                image_id: id,
                label,
                image_error: None,
            });
        }
    }
    Ok(checked)
}

/// How many rows `spec`'s source yields: from the Parquet footers, else by reading it once.
fn count_rows(spec: &DatasetSpec, reads: &ReadPolicy) -> Result<usize, DataError> {
    if let Some(n) = spec
        .source
        .row_count_hint()
        .and_then(|n| usize::try_from(n).ok())
    {
        return Ok(n);
    }
    let mut total = 0;
    for chunk in spec
        .source
        .open(&spec.image_column, &spec.label, reads)?
        .chunks
    {
        total += chunk?.len();
    }
    Ok(total)
}

/// Assigns the class list and label indices to `checked`'s rows and writes [`ROWS_FILE`],
/// [`ERRORS_FILE`] and [`FILTERED_FILE`] into `out_dir` (the images are already stored:
/// `images_stored` of them); the report's `seconds` are left to the caller.
pub(super) fn finish(
    spec: &DatasetSpec,
    checked: Checked,
    images_stored: usize,
    out_dir: &Path,
) -> Result<IngestReport, DataError> {
    let Checked {
        kept,
        errors,
        filtered,
        seen_drops,
        rows_read,
        skipped_non_images,
        skipped_examples,
        duplicate_images,
    } = checked;
    let mut report = IngestReport {
        rows_read,
        images_stored,
        duplicate_images,
        skipped_non_images,
        skipped_examples,
        error_examples: errors
            .iter()
            .take(ERROR_EXAMPLES)
            .map(|e| (e[0].clone(), e[1].clone()))
            .collect(),
        ..IngestReport::default()
    };

    let classes = class_list(spec, &kept);
    let mut rows = Vec::with_capacity(kept.len());
    for Kept {
        row_id,
        image_id,
        label,
        image_error,
    } in kept
    {
        let Some(index) = classes.iter().position(|c| *c == label) else {
            if image_error.is_some() {
                // Only in `errors.parquet`: no class of this dataset to count it against.
                continue;
            }
            return Err(DataError::UnknownClass {
                row_id,
                label,
                known: classes.join(", "),
            });
        };
        if image_error.is_none() {
            *report.class_counts.entry(label.clone()).or_default() += 1;
            report.rows_kept += 1;
        }
        rows.push(RowRecord {
            row_id,
            image_id,
            label,
            label_index: u32::try_from(index).unwrap_or(u32::MAX),
            image_error,
        });
    }
    report.errors = errors.len();
    for row in &filtered {
        *report.filtered.entry(row[1].clone()).or_default() += 1;
    }
    report.unknown_drop_ids = spec
        .filters
        .drop
        .iter()
        .filter(|d| !seen_drops.contains(*d))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .cloned()
        .collect();
    report.classes = classes.clone();
    write_rows(&out_dir.join(ROWS_FILE), &RowTable { rows, classes })?;
    write_text_table(&out_dir.join(ERRORS_FILE), &ERRORS_COLUMNS, &errors)?;
    write_text_table(&out_dir.join(FILTERED_FILE), &FILTERED_COLUMNS, &filtered)?;
    Ok(report)
}

fn resolve_label(
    row_id: &str,
    raw: &RawLabel,
    spec: &LabelSpec,
    classes: Option<&[String]>,
) -> Result<String, DataError> {
    let missing = || DataError::MissingLabel {
        row_id: row_id.to_owned(),
    };
    let label = match spec {
        LabelSpec::Mapped { mapping, .. } => {
            let value = match raw {
                RawLabel::Int(v) => *v,
                RawLabel::Text(s) | RawLabel::Given(s) => {
                    s.parse::<i64>().map_err(|_| DataError::LabelNotInt {
                        row_id: row_id.to_owned(),
                        value: s.clone(),
                    })?
                }
                RawLabel::Missing => return Err(missing()),
            };
            mapping
                .get(&value)
                .cloned()
                .ok_or_else(|| DataError::UnmappedLabel {
                    row_id: row_id.to_owned(),
                    value: value.to_string(),
                    known: mapping
                        .iter()
                        .map(|(k, v)| format!("{k} → {v}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                })?
        }
        LabelSpec::Names { .. } | LabelSpec::FromSource => match raw {
            RawLabel::Int(v) => v.to_string(),
            RawLabel::Text(s) | RawLabel::Given(s) => s.clone(),
            RawLabel::Missing => return Err(missing()),
        },
    };
    if let Some(classes) = classes
        && !classes.contains(&label)
    {
        return Err(DataError::UnknownClass {
            row_id: row_id.to_owned(),
            label,
            known: classes.join(", "),
        });
    }
    Ok(label)
}

/// A row of `rows.parquet` before its label index is known.
pub(super) struct Kept {
    pub(super) row_id: String,
    /// Empty for an error row.
    pub(super) image_id: String,
    pub(super) label: String,
    pub(super) image_error: Option<String>,
}

fn class_list(spec: &DatasetSpec, kept: &[Kept]) -> Vec<String> {
    if let Some(classes) = &spec.classes {
        return classes.clone();
    }
    if let LabelSpec::Mapped { mapping, .. } = &spec.label {
        let mut out: Vec<String> = Vec::new();
        for name in mapping.values() {
            if !out.contains(name) {
                out.push(name.clone());
            }
        }
        return out;
    }
    if let SourceSpec::Synthetic(synthetic) = &spec.source {
        return synthetic.classes();
    }
    // From rows with an image: a class met only in error rows (a refused linked class folder)
    // would otherwise reach every prompt that lists the labels.
    let seen: BTreeSet<&str> = kept
        .iter()
        .filter(|k| k.image_error.is_none())
        .map(|k| k.label.as_str())
        .collect();
    seen.into_iter().map(str::to_owned).collect()
}

type Probed = Result<(String, Vec<u8>, ImageInfo), String>;

/// Loads and probes images on `threads` scoped threads, keeping the input order.
fn probe_parallel(
    images: &mut [RawImage],
    spec: &DatasetSpec,
    reads: &ReadPolicy,
    threads: usize,
) -> Vec<Probed> {
    let per_thread = images.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = images
            .chunks_mut(per_thread)
            .map(|part| {
                let len = part.len();
                let handle = scope.spawn(move || {
                    part.iter_mut()
                        .map(|img| {
                            let img = std::mem::replace(img, RawImage::Missing(String::new()));
                            load_and_probe(img, spec, reads)
                        })
                        .collect::<Vec<_>>()
                });
                (len, handle)
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(len, handle)| {
                // A panicking decoder costs its part's rows (recorded as errors), not the run.
                handle
                    .join()
                    .unwrap_or_else(|_| vec![Err("image decoder panicked".to_owned()); len])
            })
            .collect()
    })
}

fn load_and_probe(image: RawImage, spec: &DatasetSpec, reads: &ReadPolicy) -> Probed {
    let bytes = match image {
        RawImage::Bytes(bytes) => bytes,
        RawImage::File(path) => {
            // Sources refuse what they name outside already; this also covers Parquet path
            // columns and anything a source may add.
            reads.check(&path).map_err(|refused| refused.to_string())?;
            read_bounded(&path, ReadKind::Image)
                .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?
        }
        RawImage::Synthetic(i) => match &spec.source {
            SourceSpec::Synthetic(synthetic) => synthetic.render(i).map_err(|e| e.to_string())?,
            _ => return Err("synthetic image outside a synthetic source".to_owned()),
        },
        RawImage::Missing(reason) => return Err(reason),
    };
    let info = probe_image(&bytes, ImageCheck::Header)?;
    // An image over the pixel cap is kept here: whoever decodes it (an eval, a fine-tune)
    // refuses it from its header and records that sample as an error, counted as wrong.
    if spec.check == ImageCheck::Full {
        decode_image_capped(&bytes, spec.filters.max_pixels())
            .map_err(|e| format!("decode failed: {e}"))?;
    }
    Ok((image_id(&bytes), bytes, info))
}

/// Writes an all-utf8 table (errors, filtered rows).
pub(super) fn write_text_table(
    path: &Path,
    columns: &[&str],
    rows: &[Vec<String>],
) -> Result<(), DataError> {
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|c| Field::new(*c, DataType::Utf8, false))
            .collect::<Vec<_>>(),
    ));
    let file = File::create(path).map_err(FileError::create(path))?;
    let mut writer =
        ArrowWriter::try_new(file, schema.clone(), None).map_err(DataError::parquet(path))?;
    let arrays = (0..columns.len())
        .map(|c| {
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.get(c).map_or("", String::as_str)),
            )) as arrow::array::ArrayRef
        })
        .collect();
    let batch = RecordBatch::try_new(schema, arrays).map_err(DataError::arrow(path))?;
    writer.write(&batch).map_err(DataError::parquet(path))?;
    writer.close().map_err(DataError::parquet(path))?;
    Ok(())
}

/// Reads a table [`write_text_table`] wrote with `columns`.
pub(super) fn read_text_table(
    path: &Path,
    columns: &[&str],
) -> Result<Vec<Vec<String>>, DataError> {
    let file = File::open(path).map_err(FileError::read(path))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(DataError::parquet(path))?
        .build()
        .map_err(DataError::parquet(path))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(DataError::arrow(path))?;
        let arrays = columns
            .iter()
            .map(|name| {
                batch
                    .column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                    .ok_or_else(|| DataError::BadRowTable {
                        path: path.to_path_buf(),
                        message: format!("column `{name}` missing or not utf8"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for i in 0..batch.num_rows() {
            rows.push(arrays.iter().map(|a| a.value(i).to_owned()).collect());
        }
    }
    Ok(rows)
}
