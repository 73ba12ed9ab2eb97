//! A dataset ingested in shards (issue 16): each shard reads, checks and stores the images of a
//! contiguous run of the source's rows into its own folder ([`ingest_shard`]), and
//! [`merge_shards`] writes from the shards exactly the files an unsharded [`super::ingest`]
//! writes: rows (error rows included) and errors in source order, each distinct image once in
//! first-seen order.
//!
//! A shard cannot assign label indices: without a declared class list the classes are the
//! labels seen in every row, so a shard keeps its rows' labels as text ([`SHARD_ROWS_FILE`]) and
//! the merge decides the classes, as `ingest` does after reading the last row.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::image_store::{ImageStoreWriter, for_each_image};
use super::ingest::{
    Checked, ERRORS_COLUMNS, FILTERED_COLUMNS, Kept, RowRange, check_rows, finish, read_text_table,
    write_text_table,
};
use super::{
    DataError, DatasetSpec, ERRORS_FILE, FILTERED_FILE, IMAGES_FILE, ImageInfo, IngestReport,
    RowRecord, RowTable, read_rows, write_rows,
};

/// A shard's rows in the `rows.parquet` schema, with no class list and every `label_index`
/// `u32::MAX`: the merge assigns them.
pub(crate) const SHARD_ROWS_FILE: &str = "shard_rows.parquet";

/// What a shard did besides its files (its entry's metadata; the merge reads it back).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ShardIngest {
    /// The source positions of the shard's rows: `first_row..first_row + rows_read`.
    pub(crate) first_row: usize,
    pub(crate) rows_read: usize,
    /// `drop` ids that matched one of its rows.
    pub(crate) seen_drops: Vec<String>,
    /// Its rows in `errors.parquet`.
    pub(crate) errors: usize,
    /// Files of a folder source that are not images (the whole source's: every shard lists it).
    pub(crate) skipped_non_images: usize,
    pub(crate) skipped_examples: Vec<String>,
    /// Wall-clock seconds.
    pub(crate) seconds: f64,
}

/// Ingests the rows at the positions `part` gives for the source's row count into `out_dir`:
/// [`SHARD_ROWS_FILE`], [`IMAGES_FILE`] (its distinct images), [`ERRORS_FILE`],
/// [`FILTERED_FILE`].
pub(crate) fn ingest_shard(
    spec: &DatasetSpec,
    part: RowRange<'_>,
    out_dir: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<ShardIngest, DataError> {
    let start = Instant::now();
    let mut store = ImageStoreWriter::create(&out_dir.join(IMAGES_FILE))?;
    let first_row = std::cell::Cell::new(0);
    let checked = check_rows(
        spec,
        Some(&|total| {
            let range = part(total);
            first_row.set(range.start);
            range
        }),
        &mut store,
        progress,
    )?;
    store.finish()?;
    let rows = checked
        .kept
        .iter()
        .map(|k| RowRecord {
            row_id: k.row_id.clone(),
            image_id: k.image_id.clone(),
            label: k.label.clone(),
            label_index: u32::MAX,
            image_error: k.image_error.clone(),
        })
        .collect();
    write_rows(
        &out_dir.join(SHARD_ROWS_FILE),
        &RowTable {
            rows,
            classes: Vec::new(),
        },
    )?;
    write_text_table(&out_dir.join(ERRORS_FILE), &ERRORS_COLUMNS, &checked.errors)?;
    write_text_table(
        &out_dir.join(FILTERED_FILE),
        &FILTERED_COLUMNS,
        &checked.filtered,
    )?;
    Ok(ShardIngest {
        first_row: first_row.get(),
        rows_read: checked.rows_read,
        seen_drops: checked.seen_drops.into_iter().collect(),
        errors: checked.errors.len(),
        skipped_non_images: checked.skipped_non_images,
        skipped_examples: checked.skipped_examples,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// One shard to merge: the folder holding its files and what it reported.
#[derive(Clone, Debug)]
pub(crate) struct ShardPart {
    pub(crate) dir: PathBuf,
    pub(crate) report: ShardIngest,
}

/// Writes the dataset's four files into `out_dir` from its shards, given in shard order; the
/// report equals an unsharded ingest's but for `seconds` (the shards' sum).
pub(crate) fn merge_shards(
    spec: &DatasetSpec,
    shards: &[ShardPart],
    out_dir: &Path,
) -> Result<IngestReport, DataError> {
    let mut checked = Checked::default();
    if let Some(first) = shards.first() {
        checked.skipped_non_images = first.report.skipped_non_images;
        checked.skipped_examples = first.report.skipped_examples.clone();
    }
    let mut store = ImageStoreWriter::create(&out_dir.join(IMAGES_FILE))?;
    let mut stored: HashSet<String> = HashSet::new();
    let mut next_row = 0;
    for shard in shards {
        let ShardPart { dir, report } = shard;
        // Contiguous runs in order, or the merge would not be the unsharded output.
        if report.rows_read > 0 && report.first_row != next_row {
            return Err(DataError::Param(format!(
                "the shard in `{}` starts at row {} where row {next_row} was expected",
                dir.display(),
                report.first_row
            )));
        }
        next_row += report.rows_read;
        checked.rows_read += report.rows_read;
        checked.seen_drops.extend(report.seen_drops.iter().cloned());
        checked.kept.extend(
            read_rows(&dir.join(SHARD_ROWS_FILE))?
                .rows
                .into_iter()
                .map(|row| Kept {
                    row_id: row.row_id,
                    image_id: row.image_id,
                    label: row.label,
                    image_error: row.image_error,
                }),
        );
        checked
            .errors
            .extend(read_text_table(&dir.join(ERRORS_FILE), &ERRORS_COLUMNS)?);
        checked.filtered.extend(read_text_table(
            &dir.join(FILTERED_FILE),
            &FILTERED_COLUMNS,
        )?);
        // A shard's store holds its images in first-seen order, so skipping those an earlier
        // shard stored gives the unsharded store's order.
        for_each_image(&dir.join(IMAGES_FILE), &mut |image| {
            if stored.insert(image.image_id.clone()) {
                let info = ImageInfo {
                    format: image.format,
                    width: image.width,
                    height: image.height,
                    mode: image.mode,
                };
                store.push(image.image_id, image.bytes, info)?;
            }
            Ok(())
        })?;
    }
    let images_stored = store.finish()?;
    // Every kept row with an image either stored it or found it stored.
    let with_image = checked
        .kept
        .iter()
        .filter(|k| k.image_error.is_none())
        .count();
    checked.duplicate_images = with_image.saturating_sub(images_stored);
    let mut report = finish(spec, checked, images_stored, out_dir)?;
    report.seconds = shards.iter().map(|s| s.report.seconds).sum();
    Ok(report)
}
