//! Fixtures shared by the data and cache integration tests: encoded images and Parquet files in
//! the Hugging Face Hub layout, built in temp folders (nothing is copied from `../shared`).

#![allow(dead_code)]

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, StructArray};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use image::{DynamicImage, ImageFormat};
use parquet::arrow::ArrowWriter;

/// An encoded solid-colour RGB image; `shade` makes the bytes distinct.
pub fn rgb_jpeg(w: u32, h: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([shade, 255 - shade, 90]));
    encode(DynamicImage::ImageRgb8(img), ImageFormat::Jpeg)
}

/// An encoded grayscale JPEG (PIL mode `L`).
pub fn gray_jpeg(w: u32, h: u32, shade: u8) -> Vec<u8> {
    let img = image::GrayImage::from_pixel(w, h, image::Luma([shade]));
    encode(DynamicImage::ImageLuma8(img), ImageFormat::Jpeg)
}

/// An encoded RGBA PNG (PIL mode `RGBA`).
pub fn rgba_png(w: u32, h: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbaImage::from_pixel(w, h, image::Rgba([shade, 10, 20, 128]));
    encode(DynamicImage::ImageRgba8(img), ImageFormat::Png)
}

pub fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format)
        .expect("encoding a test image");
    out.into_inner()
}

/// Writes a Parquet file shaped like a Hub image dataset: `image` struct {bytes, path} and an
/// int64 `labels` column. `None` bytes make a null image; `None` label a null label.
pub fn write_hub_parquet(path: &Path, rows: &[(Option<Vec<u8>>, Option<i64>)]) {
    let struct_fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", DataType::Struct(struct_fields.clone()), true),
        Field::new("labels", DataType::Int64, true),
    ]));
    let bytes: BinaryArray = rows.iter().map(|r| r.0.as_deref()).collect();
    let paths: StringArray = rows
        .iter()
        .enumerate()
        .map(|(i, _)| Some(format!("{i}.jpg")))
        .collect();
    let image = StructArray::new(
        struct_fields,
        vec![Arc::new(bytes) as ArrayRef, Arc::new(paths) as ArrayRef],
        None,
    );
    let labels: Int64Array = rows.iter().map(|r| r.1).collect();
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(image), Arc::new(labels)])
        .expect("test batch");
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("test folder");
    }
    let file = std::fs::File::create(path).expect("test parquet file");
    let mut writer = ArrowWriter::try_new(file, schema, None).expect("parquet writer");
    writer.write(&batch).expect("parquet write");
    writer.close().expect("parquet close");
}

/// Writes a Parquet file with a plain binary `img` column and a string `class` column.
pub fn write_binary_parquet(path: &Path, rows: &[(Vec<u8>, &str)]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("img", DataType::Binary, false),
        Field::new("class", DataType::Utf8, false),
    ]));
    let bytes: BinaryArray = rows.iter().map(|r| Some(r.0.as_slice())).collect();
    let class: StringArray = rows.iter().map(|r| Some(r.1)).collect();
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(bytes), Arc::new(class)])
        .expect("test batch");
    let file = std::fs::File::create(path).expect("test parquet file");
    let mut writer = ArrowWriter::try_new(file, schema, None).expect("parquet writer");
    writer.write(&batch).expect("parquet write");
    writer.close().expect("parquet close");
}

/// Reads an all-utf8 table (errors, filtered) as rows of strings.
pub fn read_text_table(path: &Path) -> Vec<Vec<String>> {
    let file = std::fs::File::open(path).expect("table file");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("parquet")
        .build()
        .expect("reader");
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.expect("batch");
        for i in 0..batch.num_rows() {
            rows.push(
                batch
                    .columns()
                    .iter()
                    .map(|c| {
                        c.as_any()
                            .downcast_ref::<StringArray>()
                            .expect("utf8 column")
                            .value(i)
                            .to_owned()
                    })
                    .collect(),
            );
        }
    }
    rows
}

/// A commit hash for snapshots in a Hub cache built on disk (any 40 hex digits).
pub const HUB_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Puts `files` into `hub/<folder>/snapshots/HUB_COMMIT/` (e.g. folder
/// `models--LiquidAI--LFM2-VL-450M`) and points `refs/main` at it, as `huggingface_hub` does.
pub fn put_hub_snapshot(hub: &Path, folder: &str, files: &[(String, Vec<u8>)]) {
    let base = hub.join(folder);
    let snapshot = base.join("snapshots").join(HUB_COMMIT);
    for (rel, bytes) in files {
        let path = snapshot.join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("snapshot folder");
        std::fs::write(path, bytes).expect("snapshot file");
    }
    std::fs::create_dir_all(base.join("refs")).expect("refs");
    std::fs::write(base.join("refs/main"), HUB_COMMIT).expect("refs/main");
}

/// The `tiny-thumb` reference checkpoint's files (random weights, LFM2-VL-450M's processor
/// settings), as a model repo holds them.
pub fn tiny_checkpoint_files() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference/checkpoints/tiny-thumb");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("tiny-thumb fixture")
        .filter_map(Result::ok)
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("fixture file"),
            )
        })
        .collect();
    files.sort();
    files
}

/// Hostile image files (issue 14): headers that declare huge sizes over a few bytes of data,
/// and a PNG whose deflate stream is corrupt. All are small; none should ever be decoded.
pub mod hostile {
    use super::{DynamicImage, ImageFormat, encode};

    /// CRC-32 (ISO-HDLC, PNG's), bitwise: fine for a few bytes.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }

    /// An 8-bit RGB PNG whose (valid, CRC-checked) IHDR declares `width` x `height`, followed
    /// by a tiny zlib stream of zero rows and IEND: a bomb's header without its body.
    pub fn png_declaring(width: u32, height: u32) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        // zlib header, then a stored empty final block, then Adler-32 of nothing.
        chunk(
            &mut out,
            b"IDAT",
            &[0x78, 0x01, 0x01, 0, 0, 0xFF, 0xFF, 0, 0, 0, 1],
        );
        chunk(&mut out, b"IEND", &[]);
        out
    }

    /// A real 64x64 PNG with the middle of its IDAT data overwritten (CRC recomputed, so the
    /// chunk is well-formed and only the deflate stream is corrupt).
    pub fn png_corrupt_deflate() -> Vec<u8> {
        let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut png = encode(DynamicImage::ImageRgb8(img), ImageFormat::Png);
        let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
        let len = u32::from_be_bytes(png[idat - 4..idat].try_into().unwrap()) as usize;
        let data = idat + 4;
        for b in &mut png[data + 2..data + len - 4] {
            *b = 0xFF;
        }
        let crc = crc32(&png[idat..data + len]);
        png[data + len..data + len + 4].copy_from_slice(&crc.to_be_bytes());
        png
    }

    /// A real small JPEG whose frame header declares `width` x `height` (at most 65535).
    pub fn jpeg_declaring(width: u16, height: u16) -> Vec<u8> {
        let mut jpeg = super::rgb_jpeg(16, 16, 40);
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
        jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
        jpeg
    }

    /// A real small BMP whose header declares `width` x `height`.
    pub fn bmp_declaring(width: i32, height: i32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3]));
        let mut bmp = encode(DynamicImage::ImageRgb8(img), ImageFormat::Bmp);
        bmp[18..22].copy_from_slice(&width.to_le_bytes());
        bmp[22..26].copy_from_slice(&height.to_le_bytes());
        bmp
    }

    /// A real, valid 8-bit RGB PNG of `width` x `height` black pixels, built without
    /// allocating them: its zlib stream is one fixed-Huffman block of a literal zero followed by
    /// 258-byte copies (13 bits each), so 20000 x 20000 (1.2 GB of pixels) is about 7.6 MB.
    pub fn png_zeros(width: u32, height: u32) -> Vec<u8> {
        struct Bits {
            out: Vec<u8>,
            acc: u64,
            n: u32,
        }
        impl Bits {
            // Deflate packs bits from the least significant end; Huffman codes go MSB first.
            fn put(&mut self, value: u64, count: u32) {
                self.acc |= value << self.n;
                self.n += count;
                while self.n >= 8 {
                    self.out.push(self.acc as u8);
                    self.acc >>= 8;
                    self.n -= 8;
                }
            }
            fn code(&mut self, code: u32, len: u32) {
                let reversed = code.reverse_bits() >> (32 - len);
                self.put(u64::from(reversed), len);
            }
        }
        let raw = u64::from(height) * (1 + 3 * u64::from(width)); // a filter byte per row
        let mut bits = Bits {
            out: vec![0x78, 0x01],
            acc: 0,
            n: 0,
        };
        bits.put(0b011, 3); // BFINAL, fixed Huffman
        bits.code(0x30, 8); // literal 0
        let matches = (raw - 1) / 258;
        for _ in 0..matches {
            bits.code(0xC5, 8); // length 258 (code 285)
            bits.code(0, 5); // distance 1
        }
        for _ in 0..(raw - 1) % 258 {
            bits.code(0x30, 8);
        }
        bits.code(0, 7); // end of block
        if bits.n > 0 {
            bits.put(0, 8 - bits.n);
        }
        let mut zlib = bits.out;
        // Adler-32 of zeros: a stays 1, b adds 1 per byte.
        let b = (raw % 65_521) as u32;
        zlib.extend_from_slice(&((b << 16) | 1).to_be_bytes());

        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &zlib);
        chunk(&mut out, b"IEND", &[]);
        out
    }

    /// The six hostile files, by name: `(file name, bytes)`.
    pub fn six() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("huge_20000.png", png_declaring(20_000, 20_000)),
            ("corrupt_deflate.png", png_corrupt_deflate()),
            ("declares_60000.png", png_declaring(60_000, 60_000)),
            ("declares_2p31.png", png_declaring(1 << 31, 1 << 31)),
            ("declares_65000.jpg", jpeg_declaring(65_000, 65_000)),
            ("declares_50000.bmp", bmp_declaring(50_000, 50_000)),
        ]
    }
}
