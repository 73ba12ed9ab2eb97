//! The image store of a dataset: `images.parquet`, each distinct image once, keyed by content.
//!
//! `image_id` is the first 32 hex digits of the blake3 of the encoded bytes, so identical files
//! (a duplicated photo, the same image in two shards) are stored once and the id is the same on
//! every machine. Row groups are small (128 images) so fetching a few images for an eval reads
//! only the row groups that hold them.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, BinaryArray, RecordBatch, StringArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::{DataError, ImageInfo};
use crate::file_error::FileError;

/// Images per row group of `images.parquet`.
const ROW_GROUP_IMAGES: usize = 128;

/// The content id of encoded image bytes.
pub(crate) fn image_id(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex()[..32].to_owned()
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("image_id", DataType::Utf8, false),
        Field::new("bytes", DataType::Binary, false),
        Field::new("width", DataType::UInt32, false),
        Field::new("height", DataType::UInt32, false),
        Field::new("mode", DataType::Utf8, false),
        Field::new("format", DataType::Utf8, false),
    ]))
}

/// One image from the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredImage {
    pub image_id: String,
    /// The original encoded file, byte for byte.
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub mode: String,
    pub format: String,
}

impl StoredImage {
    /// Decodes the pixels.
    pub fn decode(&self) -> Result<image::DynamicImage, DataError> {
        image::load_from_memory(&self.bytes).map_err(|e| DataError::Decode {
            image_id: self.image_id.clone(),
            reason: e.to_string(),
        })
    }
}

/// Streams images into `images.parquet`.
pub(crate) struct ImageStoreWriter {
    path: PathBuf,
    writer: ArrowWriter<File>,
    pending: Vec<(String, Vec<u8>, ImageInfo)>,
    pub(crate) written: usize,
}

impl ImageStoreWriter {
    pub(crate) fn create(path: &Path) -> Result<Self, DataError> {
        // Encoded images are already compressed; recompressing them only costs time.
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_column_compression(ColumnPath::from("bytes"), Compression::UNCOMPRESSED)
            .set_column_dictionary_enabled(ColumnPath::from("bytes"), false)
            .set_column_dictionary_enabled(ColumnPath::from("image_id"), false)
            .set_max_row_group_row_count(Some(ROW_GROUP_IMAGES))
            .build();
        let file = File::create(path).map_err(FileError::create(path))?;
        let writer =
            ArrowWriter::try_new(file, schema(), Some(props)).map_err(DataError::parquet(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            writer,
            pending: Vec::new(),
            written: 0,
        })
    }

    pub(crate) fn push(
        &mut self,
        id: String,
        bytes: Vec<u8>,
        info: ImageInfo,
    ) -> Result<(), DataError> {
        self.pending.push((id, bytes, info));
        if self.pending.len() >= ROW_GROUP_IMAGES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DataError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let p = &self.pending;
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    p.iter().map(|x| x.0.as_str()),
                )),
                Arc::new(BinaryArray::from_iter_values(
                    p.iter().map(|x| x.1.as_slice()),
                )),
                Arc::new(UInt32Array::from_iter_values(p.iter().map(|x| x.2.width))),
                Arc::new(UInt32Array::from_iter_values(p.iter().map(|x| x.2.height))),
                Arc::new(StringArray::from_iter_values(
                    p.iter().map(|x| x.2.mode.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    p.iter().map(|x| x.2.format.as_str()),
                )),
            ],
        )
        .map_err(DataError::arrow(&self.path))?;
        self.writer
            .write(&batch)
            .map_err(DataError::parquet(&self.path))?;
        self.written += self.pending.len();
        self.pending.clear();
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<usize, DataError> {
        self.flush()?;
        self.writer
            .close()
            .map_err(DataError::parquet(&self.path))?;
        Ok(self.written)
    }
}

/// Read access to a dataset's `images.parquet`.
#[derive(Debug)]
pub struct ImageStore {
    path: PathBuf,
    /// image_id → (row group, index within it).
    index: HashMap<String, (usize, usize)>,
}

impl ImageStore {
    /// Opens the store, reading only the `image_id` column to build the index.
    pub fn open(path: &Path) -> Result<Self, DataError> {
        let file = File::open(path).map_err(FileError::read(path))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(DataError::parquet(path))?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), [0]);
        let group_sizes: Vec<usize> = builder
            .metadata()
            .row_groups()
            .iter()
            .map(|g| usize::try_from(g.num_rows()).unwrap_or(0))
            .collect();
        let reader = builder
            .with_projection(mask)
            .build()
            .map_err(DataError::parquet(path))?;
        let mut ids = Vec::new();
        for batch in reader {
            let batch = batch.map_err(DataError::arrow(path))?;
            let col = batch
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| DataError::BadRowTable {
                    path: path.to_path_buf(),
                    message: "`image_id` is not utf8".to_owned(),
                })?;
            ids.extend(col.iter().map(|v| v.unwrap_or_default().to_owned()));
        }
        let mut index = HashMap::with_capacity(ids.len());
        let mut ids = ids.into_iter();
        for (group, size) in group_sizes.into_iter().enumerate() {
            for within in 0..size {
                if let Some(id) = ids.next() {
                    index.insert(id, (group, within));
                }
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            index,
        })
    }

    /// Number of images in the store.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// One image.
    pub fn get(&self, image_id: &str) -> Result<StoredImage, DataError> {
        let mut got = self.get_many(&[image_id])?;
        got.pop().ok_or_else(|| DataError::ImageNotFound {
            image_id: image_id.to_owned(),
            path: self.path.clone(),
        })
    }

    /// Several images, in the order asked, reading each needed row group once.
    pub fn get_many(&self, image_ids: &[&str]) -> Result<Vec<StoredImage>, DataError> {
        let mut wanted: Vec<(usize, usize)> = Vec::with_capacity(image_ids.len());
        for id in image_ids {
            wanted.push(
                *self
                    .index
                    .get(*id)
                    .ok_or_else(|| DataError::ImageNotFound {
                        image_id: (*id).to_owned(),
                        path: self.path.clone(),
                    })?,
            );
        }
        let mut groups: Vec<usize> = wanted.iter().map(|w| w.0).collect();
        groups.sort_unstable();
        groups.dedup();
        let wanted_set: HashSet<(usize, usize)> = wanted.iter().copied().collect();
        let mut loaded: HashMap<(usize, usize), StoredImage> = HashMap::new();
        for group in groups {
            let file = File::open(&self.path).map_err(FileError::read(&self.path))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(DataError::parquet(&self.path))?
                .with_row_groups(vec![group])
                .with_batch_size(ROW_GROUP_IMAGES * 2)
                .build()
                .map_err(DataError::parquet(&self.path))?;
            let mut within = 0;
            for batch in reader {
                let batch = batch.map_err(DataError::arrow(&self.path))?;
                let images = batch_images(&batch, &self.path)?;
                for image in images {
                    if wanted_set.contains(&(group, within)) {
                        loaded.insert((group, within), image);
                    }
                    within += 1;
                }
            }
        }
        wanted
            .iter()
            .zip(image_ids)
            .map(|(key, id)| {
                loaded
                    .get(key)
                    .cloned()
                    .ok_or_else(|| DataError::ImageNotFound {
                        image_id: (*id).to_owned(),
                        path: self.path.clone(),
                    })
            })
            .collect()
    }
}

/// Every image of the store at `path`, in stored order, one row group at a time (a merge copies
/// stores through it without holding them in memory).
pub(crate) fn for_each_image(
    path: &Path,
    f: &mut dyn FnMut(StoredImage) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let file = File::open(path).map_err(FileError::read(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(DataError::parquet(path))?
        .with_batch_size(ROW_GROUP_IMAGES)
        .build()
        .map_err(DataError::parquet(path))?;
    for batch in reader {
        let batch = batch.map_err(DataError::arrow(path))?;
        for image in batch_images(&batch, path)? {
            f(image)?;
        }
    }
    Ok(())
}

fn batch_images(batch: &RecordBatch, path: &Path) -> Result<Vec<StoredImage>, DataError> {
    let bad = |column: &str| DataError::BadRowTable {
        path: path.to_path_buf(),
        message: format!("column `{column}` missing or of the wrong type"),
    };
    let text = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| bad(name))
    };
    let int = |name: &str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<UInt32Array>())
            .ok_or_else(|| bad(name))
    };
    let (ids, modes, formats) = (text("image_id")?, text("mode")?, text("format")?);
    let (widths, heights) = (int("width")?, int("height")?);
    let bytes = batch
        .column_by_name("bytes")
        .and_then(|c| c.as_any().downcast_ref::<BinaryArray>())
        .ok_or_else(|| bad("bytes"))?;
    Ok((0..batch.num_rows())
        .map(|i| StoredImage {
            image_id: ids.value(i).to_owned(),
            bytes: bytes.value(i).to_vec(),
            width: widths.value(i),
            height: heights.value(i),
            mode: modes.value(i).to_owned(),
            format: formats.value(i).to_owned(),
        })
        .collect())
}
