//! Where a stage reads a table of rows: an input slot, the file of that entry, and the slot of
//! the root dataset whose `images.parquet` the rows reference by id.

use super::{IMAGES_FILE, ImageStore, RowTable, read_rows};
use crate::exec::{StageContext, StageError};

/// One data input of a stage, resolved by lowering.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataInput {
    /// How the pipeline names the data (`parts.train`, `sample(parts.test,32,23)`), for messages.
    pub name: String,
    /// The input slot of the entry holding the rows.
    pub slot: usize,
    /// The file of that entry holding the rows (`rows.parquet`, or a split member's file).
    pub file: String,
    /// The input slot of the root dataset, whose entry holds the images.
    pub dataset_slot: usize,
}

impl DataInput {
    /// The rows.
    pub(crate) fn read_rows(&self, ctx: &StageContext<'_>) -> Result<RowTable, StageError> {
        Ok(read_rows(&ctx.input(self.slot)?.path(&self.file))?)
    }

    /// The images the rows reference.
    pub(crate) fn open_images(&self, ctx: &StageContext<'_>) -> Result<ImageStore, StageError> {
        Ok(ImageStore::open(
            &ctx.input(self.dataset_slot)?.path(IMAGES_FILE),
        )?)
    }
}
