//! Hostile images (issue 14): decompression bombs, headers declaring huge sizes, corrupt
//! deflate streams and broken folder entries. Each is one error row with its reason; nothing
//! allocates what a header claims, and no single file fails a dataset or an eval.

use std::path::Path;
use std::process::Command;

use crate::data_support::hostile;
use crate::data_support::{encode, read_text_table};
use image::{DynamicImage, ImageFormat};
use vlmpipe::model::processor::{ImageError, decode_image, decode_image_capped};
use vlmpipe::stages::data::{
    DatasetSpec, ERRORS_FILE, ImageCheck, ROWS_FILE, SourceSpec, ingest, read_rows,
};
use vlmpipe::stages::eval::read_records_parquet;

const BIN: &str = env!("CARGO_BIN_EXE_vlmpipe");

fn png(w: u32, h: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([shade, 100, 200]));
    encode(DynamicImage::ImageRgb8(img), ImageFormat::Png)
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// `row_id -> reason` of a dataset's `errors.parquet`.
fn error_rows(out: &Path) -> Vec<(String, String)> {
    read_text_table(&out.join(ERRORS_FILE))
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect()
}

#[test]
fn regression_issue14_declared_sizes_over_the_pixel_cap_are_refused_from_the_header() {
    // 10000 x 9000 is just over PIL's cap: 270 MB of RGB, under the image crate's own 512 MB
    // allocation limit, so without the cap it was allocated before the data ran out.
    let mut files = hostile::six();
    files.retain(|(name, _)| *name != "corrupt_deflate.png");
    files.push((
        "declares_10000x9000.png",
        hostile::png_declaring(10_000, 9_000),
    ));
    for (name, bytes) in files {
        let err = decode_image(&bytes).expect_err(name);
        assert!(matches!(err, ImageError::TooLarge(_)), "{name}: {err}");
    }
    // The message names the cap and how to raise it.
    let err = decode_image(&hostile::png_declaring(10_000, 9_000)).unwrap_err();
    assert!(
        err.to_string()
            .contains("10000x9000 is 90000000 pixels, more than the limit of 89478485"),
        "{err}"
    );
    let err = decode_image(&hostile::png_corrupt_deflate()).expect_err("corrupt deflate");
    assert!(matches!(err, ImageError::Decode(_)), "{err}");
}

#[test]
fn the_pixel_cap_is_configurable() {
    let bytes = png(200, 200, 1);
    assert_eq!(decode_image(&bytes).unwrap().dimensions(), (200, 200));
    let err = decode_image_capped(&bytes, 39_999).expect_err("over a 39,999-pixel cap");
    assert!(matches!(err, ImageError::TooLarge(_)), "{err}");
    assert_eq!(
        decode_image_capped(&bytes, 40_000).unwrap().dimensions(),
        (200, 200)
    );
}

#[test]
fn regression_issue14_a_full_check_refuses_bombs_from_their_headers() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    write(&photos.join("cat/ok.png"), &png(10, 10, 1));
    write(&photos.join("dog/ok.png"), &png(30, 10, 2));
    for (name, bytes) in hostile::six() {
        write(&photos.join("dog").join(name), &bytes);
    }
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut spec = DatasetSpec::new(SourceSpec::Folder {
        dir: photos.clone(),
    });
    spec.check = ImageCheck::Full;
    let report = ingest(&spec, &out, &indicatif::ProgressBar::hidden()).unwrap();
    let rows = read_rows(&out.join(ROWS_FILE)).unwrap();
    let kept: Vec<&str> = rows.rows.iter().map(|r| r.row_id.as_str()).collect();
    assert_eq!(kept, ["cat/ok.png", "dog/ok.png"]);
    let errors = error_rows(&out);
    assert_eq!(report.errors, 6, "{errors:?}");
    let reason = |id: &str| errors.iter().find(|e| e.0 == id).unwrap().1.clone();
    assert!(reason("dog/corrupt_deflate.png").contains("decode failed"));
    // The sizes a decoder can read before allocating are refused by the cap, by name.
    for id in [
        "dog/huge_20000.png",
        "dog/declares_60000.png",
        "dog/declares_65000.jpg",
        "dog/declares_50000.bmp",
    ] {
        assert!(
            reason(id).contains("max_image_pixels"),
            "{id}: {}",
            reason(id)
        );
    }

    // A small configured cap turns the 30x10 image (300 pixels) into an error row as well.
    spec.filters.max_image_pixels = Some(299);
    ingest(&spec, &out, &indicatif::ProgressBar::hidden()).unwrap();
    let rows = read_rows(&out.join(ROWS_FILE)).unwrap();
    let kept: Vec<&str> = rows.rows.iter().map(|r| r.row_id.as_str()).collect();
    assert_eq!(kept, ["cat/ok.png"]);
    let errors = error_rows(&out);
    let reason = |id: &str| errors.iter().find(|e| e.0 == id).unwrap().1.clone();
    assert!(reason("dog/ok.png").contains("30x10 is 300 pixels, more than the limit of 299"));
}

#[cfg(unix)]
#[test]
fn regression_issue14_dangling_links_and_loops_in_a_folder_are_error_rows_or_skipped() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    write(&photos.join("cat/a.png"), &png(8, 8, 1));
    write(&photos.join("dog/b.png"), &png(8, 8, 2));
    symlink(dir.path().join("nowhere.png"), photos.join("cat/gone.png")).unwrap();
    symlink(dir.path().join("nowhere.txt"), photos.join("README.txt")).unwrap();
    symlink(dir.path().join("nowhere.txt"), photos.join("dog/notes.txt")).unwrap();
    // A link to an ancestor: followed naively, the walk never ends.
    symlink(&photos, photos.join("dog/loop")).unwrap();

    let spec = DatasetSpec::new(SourceSpec::Folder {
        dir: photos.clone(),
    });
    spec.source_stamp()
        .expect("the fingerprint's stamp survives broken entries");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let report = ingest(&spec, &out, &indicatif::ProgressBar::hidden()).unwrap();
    let rows = read_rows(&out.join(ROWS_FILE)).unwrap();
    let kept: Vec<&str> = rows.rows.iter().map(|r| r.row_id.as_str()).collect();
    assert_eq!(kept, ["cat/a.png", "dog/b.png"]);
    // Non-images (dangling or not) are skipped; the dangling image and the loop are reported.
    let errors = error_rows(&out);
    assert_eq!(report.errors, errors.len());
    let ids: Vec<&str> = errors.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(ids, ["cat/gone.png", "dog/loop"], "{errors:?}");
    assert!(errors[1].1.contains("loop"), "{errors:?}");
}

#[test]
fn regression_issue14_an_eval_over_hostile_images_succeeds_with_error_rows() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    write(&photos.join("cat/ok.png"), &png(10, 10, 1));
    write(&photos.join("dog/ok.png"), &png(100, 60, 2));
    for (name, bytes) in hostile::six() {
        write(&photos.join("dog").join(name), &bytes);
    }
    let pipeline = dir.path().join("hostile.vp");
    std::fs::write(
        &pipeline,
        r#"pipeline hostile { seed = 1 }
labels animals = ["cat", "dog"]
dataset photos { source = folder("photos")  labels = animals  max_image_pixels = 5000 }
prompt ask { user = "Cat or dog?" }
model tiny = init(preset: "tiny", seed: 1)
eval check { model = tiny  data = photos  prompt = ask  labels = animals  max_new_tokens = 4 }
"#,
    )
    .unwrap();
    for _ in 0..2 {
        let output = Command::new(BIN)
            .arg("run")
            .arg(&pipeline)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--evals-dir")
            .arg(dir.path().join("evals"))
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let evals = dir.path().join("evals/check");
    let records = read_records_parquet(&evals.join("records.parquet"))
        .unwrap()
        .records;
    // Every image is a record; each hostile one is an error row with its reason, counted wrong.
    assert_eq!(records.len(), 8);
    let reason = |id: &str| {
        let r = records.iter().find(|r| r.row_id == id).unwrap();
        assert!(!r.valid && !r.correct, "{id}");
        r.raw_output.clone()
    };
    assert!(reason("dog/corrupt_deflate.png").contains("image error: cannot decode image"));
    for id in [
        "dog/huge_20000.png",
        "dog/declares_60000.png",
        "dog/declares_65000.jpg",
        "dog/declares_50000.bmp",
    ] {
        assert!(
            reason(id).contains("set `max_image_pixels`"),
            "{id}: {}",
            reason(id)
        );
    }
    assert!(reason("dog/declares_2p31.png").contains("image too large"));
    // The dataset's cap reaches the eval: 100x60 is over 5000 pixels, 10x10 is not.
    assert!(reason("dog/ok.png").contains("100x60 is 6000 pixels, more than the limit of 5000"));
    let cat = records.iter().find(|r| r.row_id == "cat/ok.png").unwrap();
    assert!(
        !cat.raw_output.contains("image error"),
        "{}",
        cat.raw_output
    );
    let csv = std::fs::read_to_string(evals.join("predictions.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + records.len());
    assert!(evals.join("report.html").is_file());
}
