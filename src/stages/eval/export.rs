//! CSV export in the format of the Python tutorial vlmpipe replaces, so its notebooks keep working.
//!
//! Columns, exactly: `image_base64` (the image file exactly as the dataset holds it, JPEG or PNG
//! or whatever it was, standard base64: the bytes the model's pixels were decoded from, so a
//! notebook's `Image.open` sees the model's input), `ground_truth`, `predicted` (the parsed label,
//! or the raw output when the answer is invalid, as the tutorial did), `correct` (`True`/`False`,
//! Python's spelling, so pandas reads booleans).

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::{EvalError, EvalRecord, ImageSource};
use crate::file_error::FileError;

/// The header row, in order.
pub const CSV_HEADER: [&str; 4] = ["image_base64", "ground_truth", "predicted", "correct"];

/// Writes the tutorial-format CSV of `records` to `path`, fetching each image from `images`.
///
/// A record without an image (an image error row, empty `image_id`) has an empty image cell; one
/// whose image the source does not know, or whose bytes are not an image format, is an error:
/// the notebooks decode every other cell.
pub fn write_csv_export(
    path: &Path,
    records: &[EvalRecord],
    images: &dyn ImageSource,
) -> Result<(), EvalError> {
    let csv_err = |source| EvalError::Csv {
        path: path.to_path_buf(),
        source,
    };
    let mut writer = csv::Writer::from_path(path).map_err(csv_err)?;
    writer.write_record(CSV_HEADER).map_err(csv_err)?;
    for record in records {
        let image = if record.image_id.is_empty() {
            String::new()
        } else {
            original_base64(&record.image_id, images)?
        };
        let predicted = match (&record.parsed_label, record.valid) {
            (Some(label), true) => label.as_str(),
            _ => record.raw_output.as_str(),
        };
        let correct = if record.correct { "True" } else { "False" };
        writer
            .write_record([
                image.as_str(),
                record.ground_truth.as_str(),
                predicted,
                correct,
            ])
            .map_err(csv_err)?;
    }
    writer.flush().map_err(FileError::write(path))?;
    Ok(())
}

/// The image's original bytes, base64. Re-encoding would change the pixels (another decoder than
/// the model's) and multiply the size; the format is checked from the header only.
fn original_base64(image_id: &str, images: &dyn ImageSource) -> Result<String, EvalError> {
    let bytes = images
        .image_bytes(image_id)
        .ok_or_else(|| EvalError::MissingImage {
            image_id: image_id.to_string(),
        })?;
    image::guess_format(&bytes).map_err(|source| EvalError::Image {
        image_id: image_id.to_string(),
        source,
    })?;
    Ok(STANDARD.encode(bytes))
}
