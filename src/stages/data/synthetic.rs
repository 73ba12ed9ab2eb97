//! A seeded generator of labelled shape images for the offline quickstart and fine-tune tests.
//!
//! Each image is one filled shape (circle, square or triangle) in a named colour on a plain
//! background whose brightness contrasts with the shape, with the shape's size and position
//! jittered. Classes are every `colour shape` pair, colour-major (`red circle`, `red square`, …);
//! row `i` has class `i % classes`, so classes are balanced. Images are PNG; the same spec gives
//! byte-identical files on every machine (integer geometry, the fixed [`SplitMix64`] stream).

use std::io::Cursor;

use image::{ImageFormat, Rgb, RgbImage};

use super::{DataError, SplitMix64};

/// A shape the generator draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    /// Parses `circle`, `square` or `triangle`.
    pub(crate) fn parse(name: &str) -> Option<Self> {
        [Shape::Circle, Shape::Square, Shape::Triangle]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

/// Colours the generator knows, with their RGB values.
const PALETTE: &[(&str, [u8; 3])] = &[
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 200, 30]),
    ("purple", [140, 60, 180]),
    ("orange", [240, 130, 30]),
    ("black", [20, 20, 20]),
    ("white", [245, 245, 245]),
];

/// Parameters of a synthetic dataset.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyntheticSpec {
    /// Number of images.
    pub n: usize,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// Colour names from the palette (red, green, blue, yellow, purple, orange, black, white).
    pub colors: Vec<String>,
    pub shapes: Vec<Shape>,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            n: 400,
            seed: 1,
            width: 128,
            height: 128,
            colors: vec!["red".to_owned(), "blue".to_owned()],
            shapes: vec![Shape::Circle, Shape::Square],
        }
    }
}

impl SyntheticSpec {
    /// Checks colours, shapes and size.
    pub(crate) fn validate(&self) -> Result<(), DataError> {
        if self.colors.is_empty() || self.shapes.is_empty() {
            return Err(DataError::Param(
                "synthetic data needs at least one colour and one shape".to_owned(),
            ));
        }
        if self.width < 16 || self.height < 16 || self.width > 4096 || self.height > 4096 {
            return Err(DataError::Param(format!(
                "synthetic image size {}x{} is outside 16..=4096",
                self.width, self.height
            )));
        }
        for color in &self.colors {
            if rgb_of(color).is_none() {
                let known: Vec<&str> = PALETTE.iter().map(|p| p.0).collect();
                return Err(DataError::Param(format!(
                    "unknown colour `{color}` (known: {})",
                    known.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Class names, colour-major.
    pub(crate) fn classes(&self) -> Vec<String> {
        self.colors
            .iter()
            .flat_map(|c| self.shapes.iter().map(move |s| format!("{c} {}", s.name())))
            .collect()
    }

    /// The class of image `i`.
    pub fn class_of(&self, i: usize) -> String {
        let classes = self.classes();
        if classes.is_empty() {
            return String::new();
        }
        classes[i % classes.len()].clone()
    }

    /// Draws image `i` and encodes it as PNG.
    pub fn render(&self, i: usize) -> Result<Vec<u8>, DataError> {
        self.validate()?;
        let per_color = self.shapes.len();
        let class = i % (self.colors.len() * per_color);
        let color = rgb_of(&self.colors[class / per_color]).unwrap_or([0, 0, 0]);
        let shape = self.shapes[class % per_color];
        // One independent stream per image, so image i does not depend on n.
        let mut rng = SplitMix64::new(self.seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let luma =
            (u32::from(color[0]) * 299 + u32::from(color[1]) * 587 + u32::from(color[2]) * 114)
                / 1000;
        let (lo, hi): (u64, u64) = if luma > 128 { (20, 90) } else { (170, 235) };
        let base = lo + rng.below(hi - lo);
        let mut background = [0u8; 3];
        for c in &mut background {
            // At most 235 + 19, so the cast cannot wrap.
            *c = (base + rng.below(20)) as u8;
        }
        let (w, h) = (i64::from(self.width), i64::from(self.height));
        let min_side = w.min(h);
        // Radius 18–32 % of the short side; the centre keeps the shape fully inside.
        let r = min_side * 18 / 100 + rng.below((min_side * 14 / 100).max(1) as u64) as i64;
        let cx = r + rng.below((w - 2 * r).max(1) as u64) as i64;
        let cy = r + rng.below((h - 2 * r).max(1) as u64) as i64;
        let mut img = RgbImage::from_pixel(self.width, self.height, Rgb(background));
        for y in 0..h {
            for x in 0..w {
                let (dx, dy) = (x - cx, y - cy);
                let inside = match shape {
                    Shape::Circle => dx * dx + dy * dy <= r * r,
                    Shape::Square => dx.abs() * 20 <= r * 17 && dy.abs() * 20 <= r * 17,
                    Shape::Triangle => in_triangle(dx, dy, r),
                };
                if inside {
                    img.put_pixel(x as u32, y as u32, Rgb(color));
                }
            }
        }
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png)
            .map_err(|e| DataError::Param(format!("png encoding failed: {e}")))?;
        Ok(out.into_inner())
    }
}

fn rgb_of(name: &str) -> Option<[u8; 3]> {
    PALETTE.iter().find(|p| p.0 == name).map(|p| p.1)
}

/// An upward triangle with apex `(0, -r)` and base corners `(±0.95r, 0.8r)`, in integers.
fn in_triangle(x: i64, y: i64, r: i64) -> bool {
    let (ax, ay) = (0, -r * 20);
    let (bx, by) = (-r * 19, r * 16);
    let (cx, cy) = (r * 19, r * 16);
    let (px, py) = (x * 20, y * 20);
    let side = |x1: i64, y1: i64, x2: i64, y2: i64| (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1);
    let (d1, d2, d3) = (
        side(ax, ay, bx, by),
        side(bx, by, cx, cy),
        side(cx, cy, ax, ay),
    );
    let negative = d1 < 0 || d2 < 0 || d3 < 0;
    let positive = d1 > 0 || d2 > 0 || d3 > 0;
    !(negative && positive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_balanced_and_drawn() {
        let spec = SyntheticSpec {
            n: 8,
            seed: 3,
            width: 32,
            height: 24,
            colors: vec!["red".to_owned(), "white".to_owned()],
            shapes: vec![Shape::Circle, Shape::Triangle],
        };
        assert_eq!(
            spec.classes(),
            [
                "red circle",
                "red triangle",
                "white circle",
                "white triangle"
            ]
        );
        assert_eq!(spec.class_of(5), "red triangle");
        let a = spec.render(5).unwrap();
        assert_eq!(a, spec.render(5).unwrap());
        assert_ne!(a, spec.render(1).unwrap());
        let img = image::load_from_memory(&a).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (32, 24));
        let red = img.pixels().filter(|p| p.0 == [220, 40, 40]).count();
        assert!(red > 20 && red < 32 * 24 / 2, "red pixels: {red}");
        let bad = SyntheticSpec {
            colors: vec!["teal".to_owned()],
            ..spec
        };
        assert!(bad.validate().is_err());
    }
}
