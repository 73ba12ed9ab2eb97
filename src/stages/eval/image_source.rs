//! Where reports and exports get images from: a lookup by `image_id`.

use std::collections::HashMap;

/// Gives the original bytes (any format the `image` crate decodes) of an image by its id.
///
/// Records hold only an id, so the dataset's image store (the lead plugs it in) stays the single
/// copy of the pixels. `None` means the image is unknown; reports show a placeholder for it.
pub trait ImageSource: Sync {
    /// The encoded bytes of `image_id`, or `None` when it is unknown.
    fn image_bytes(&self, image_id: &str) -> Option<Vec<u8>>;
}

impl<F> ImageSource for F
where
    F: Fn(&str) -> Option<Vec<u8>> + Sync,
{
    fn image_bytes(&self, image_id: &str) -> Option<Vec<u8>> {
        self(image_id)
    }
}

/// An image source with no images (reports then show placeholders).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoImages;

impl ImageSource for NoImages {
    fn image_bytes(&self, _image_id: &str) -> Option<Vec<u8>> {
        None
    }
}

/// An in-memory image source, handy for tests and small datasets.
#[derive(Clone, Debug, Default)]
pub struct MapImageSource {
    images: HashMap<String, Vec<u8>>,
}

impl MapImageSource {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the bytes of `image_id`.
    pub fn insert(&mut self, image_id: impl Into<String>, bytes: Vec<u8>) {
        self.images.insert(image_id.into(), bytes);
    }
}

impl ImageSource for MapImageSource {
    fn image_bytes(&self, image_id: &str) -> Option<Vec<u8>> {
        self.images.get(image_id).cloned()
    }
}
