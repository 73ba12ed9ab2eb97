//! Issue 12, items 2 and 6: `vlmpipe export --gguf` checked against llama.cpp itself.
//!
//! llama.cpp comes from `tests/llama_cpp/build.sh` (the pinned `llama_cpp_python` sdist, built
//! into `$VLMPIPE_LLAMA_CPP_CACHE`, default `~/.cache/vlmpipe/llama.cpp-<version>`). The
//! cross-checks run llama.cpp's own converter (`convert_hf_to_gguf.py`, and with `--mmproj`) on
//! the same checkpoint vlmpipe exports and compare the two files through llama.cpp's own reader
//! (gguf-py, `tests/llama_cpp/gguf_dump.py`): header version, every metadata key with its type
//! and value, and every tensor's name, order, type, shape and bytes. They skip, saying why, where
//! the build is absent; the bad-input checks need nothing.
//!
//! Checkpoints: the real LFM2-VL-450M file set from `../shared` (tokenizer, chat template,
//! processor files; the converter recognises only known tokenizers) with random weights, at
//! narrow widths (seconds) and at the real 450M shapes.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vlmpipe::gguf::{self, GgufOptions, GgufQuant};

use crate::support::shared_path;

use crate::support::{llama_cpp_cache, random_450m_checkpoint, repo_root};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// llama.cpp's converter and reader (the Python side of the build).
pub(crate) struct Converter {
    python: PathBuf,
    script: PathBuf,
}

pub(crate) fn converter() -> Option<Converter> {
    let cache = llama_cpp_cache();
    let python = cache.join("venv/bin/python");
    let script = cache.join("src/convert_hf_to_gguf.py");
    if cache.join("venv/.ok").is_file() && cache.join("src/.ok").is_file() && python.is_file() {
        Some(Converter { python, script })
    } else {
        eprintln!(
            "skipping: llama.cpp's converter is not built in `{}` (run `bash \
             tests/llama_cpp/build.sh`, or set VLMPIPE_LLAMA_CPP_CACHE)",
            cache.display()
        );
        None
    }
}

pub(crate) fn real_450m() -> Option<PathBuf> {
    let dir = shared_path("models/LFM2-VL-450M");
    if dir.is_none() {
        eprintln!("skipping: ../shared/models/LFM2-VL-450M is not here");
    }
    dir
}

/// The checkpoint folder's name: the converter guesses metadata (`general.finetune`, …) from it,
/// and a plain word gives none.
const CHECKPOINT: &str = "checkpoint";

/// Vision layers of the narrow checkpoint: the converter maps the projector's `linear_2` through
/// the vision block numbering, so it needs at least 3.
const NARROW_VISION_LAYERS: usize = 3;

impl Converter {
    /// llama.cpp's files for `checkpoint` at `quant` (`--outtype`), named `name`.
    pub(crate) fn convert(
        &self,
        checkpoint: &Path,
        quant: GgufQuant,
        name: &str,
        out: &Path,
    ) -> TestResult {
        let outtype = quant.name().to_ascii_lowercase();
        let (text, mmproj) = gguf::file_names(name, quant, quant);
        for (file, extra) in [(text, None), (mmproj, Some("--mmproj"))] {
            let mut cmd = Command::new(&self.python);
            cmd.arg(&self.script)
                .arg(checkpoint)
                .args(["--outtype", &outtype, "--model-name", name, "--outfile"])
                .arg(out.join(&file));
            if let Some(flag) = extra {
                cmd.arg(flag);
            }
            let output = cmd.output()?;
            assert!(
                output.status.success(),
                "convert_hf_to_gguf.py {file}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// `gguf_dump.py`: the file as llama.cpp's reader sees it.
    pub(crate) fn dump(&self, file: &Path) -> Result<Value, Box<dyn std::error::Error>> {
        let output = Command::new(&self.python)
            .arg(repo_root().join("tests/llama_cpp/gguf_dump.py"))
            .arg(file)
            .output()?;
        assert!(
            output.status.success(),
            "gguf_dump.py {}: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(serde_json::from_slice(&output.stdout)?)
    }
}

/// Every difference between two dumps, described for the assertion message.
fn differences(ours: &Value, theirs: &Value) -> Vec<String> {
    differences_in(
        ours,
        theirs,
        &["version", "alignment", "kv_order", "tensor_order"],
    )
}

/// [`differences`] over the `fields` given (and every key and tensor).
fn differences_in(ours: &Value, theirs: &Value, fields: &[&str]) -> Vec<String> {
    let mut diffs = Vec::new();
    for &field in fields {
        if ours[field] != theirs[field] {
            diffs.push(format!(
                "{field}: vlmpipe {} vs llama.cpp {}",
                ours[field], theirs[field]
            ));
        }
    }
    for section in ["kv", "tensors"] {
        let (a, b) = (&ours[section], &theirs[section]);
        let keys: std::collections::BTreeSet<&String> = a
            .as_object()
            .into_iter()
            .chain(b.as_object())
            .flat_map(|m| m.keys())
            .collect();
        for key in keys {
            if a.get(key) != b.get(key) {
                diffs.push(format!(
                    "{section} `{key}`: vlmpipe {} vs llama.cpp {}",
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null)
                ));
            }
        }
    }
    diffs
}

/// Exports `checkpoint` with vlmpipe and with llama.cpp's converter at each quant and asserts the
/// two pairs are the same files: metadata, tensor names, shapes, types and bytes.
fn assert_same_as_converter(
    conv: &Converter,
    checkpoint: &Path,
    quants: &[GgufQuant],
) -> TestResult {
    let name = "lfm2-vl-test";
    for &quant in quants {
        let ours = tempfile::tempdir()?;
        let theirs = tempfile::tempdir()?;
        let opts = GgufOptions {
            name: name.into(),
            quant,
            mmproj_quant: quant,
            force: false,
        };
        let written = gguf::export(checkpoint, ours.path(), &opts)?;
        conv.convert(checkpoint, quant, name, theirs.path())?;
        for ours_file in [&written.text, &written.mmproj] {
            let file_name = ours_file.path.file_name().unwrap();
            let theirs_file = theirs.path().join(file_name);
            let diffs = differences(&conv.dump(&ours_file.path)?, &conv.dump(&theirs_file)?);
            assert!(
                diffs.is_empty(),
                "{quant} {}: {} differences:\n{}",
                file_name.to_string_lossy(),
                diffs.len(),
                diffs.join("\n")
            );
            let (a, b) = (
                ours_file.bytes as f64,
                std::fs::metadata(&theirs_file)?.len() as f64,
            );
            assert!(
                (a - b).abs() / b < 0.02,
                "{quant} {}: {a} bytes vs llama.cpp's {b}",
                file_name.to_string_lossy()
            );
            assert!(ours_file.fallbacks.is_empty(), "{:?}", ours_file.fallbacks);
        }
    }
    Ok(())
}

/// Random checkpoints in the 450M layout against llama.cpp's converter, a row per checkpoint:
/// the narrow one (few vision layers) at every plain quant, and the 450M shapes at Q8_0, which
/// writes 0.9 GB of random weights that both exporters then read (minutes). A failure names
/// its quant and file.
#[test]
fn random_checkpoints_match_the_converter() -> TestResult {
    let (Some(real), Some(conv)) = (real_450m(), converter()) else {
        return Ok(());
    };
    let rows: [(Option<usize>, &[GgufQuant]); 2] = [
        (
            Some(NARROW_VISION_LAYERS),
            &[
                GgufQuant::F16,
                GgufQuant::Q8_0,
                GgufQuant::F32,
                GgufQuant::BF16,
            ],
        ),
        (None, &[GgufQuant::Q8_0]),
    ];
    for (vision_layers, quants) in rows {
        let tmp = tempfile::tempdir()?;
        let ckpt = tmp.path().join(CHECKPOINT);
        random_450m_checkpoint(&real, &ckpt, vision_layers, 12)?;
        assert_same_as_converter(&conv, &ckpt, quants)?;
    }
    Ok(())
}

/// A committed tiny checkpoint (hidden size 48): a weight whose rows are 48 values cannot be
/// Q8_0's 32-value blocks, so each such tensor falls back to F16, named, as the converter does
/// (its 96-wide rows stay Q8_0); llama.cpp's reader reads the result. Its trimmed vocabulary is
/// one the converter itself refuses (unknown check hash), so there is no converter file here.
#[test]
fn rows_that_are_not_whole_blocks_fall_back_per_tensor() -> TestResult {
    let ckpt = repo_root().join("tests/fixtures/reference/checkpoints/tiny-nothumb");
    let out = tempfile::tempdir()?;
    let opts = GgufOptions {
        name: "tiny".into(),
        quant: GgufQuant::Q8_0,
        mmproj_quant: GgufQuant::Q8_0,
        force: false,
    };
    let written = gguf::export(&ckpt, out.path(), &opts)?;
    let fallen: Vec<&str> = written
        .text
        .fallbacks
        .iter()
        .map(|f| f.tensor.as_str())
        .collect();
    // Rows of 48 (the hidden size) do not fill Q8_0's 32-value blocks; rows of 96 do.
    assert!(fallen.contains(&"token_embd.weight"), "{fallen:?}");
    assert!(fallen.contains(&"blk.0.ffn_gate.weight"), "{fallen:?}");
    assert!(!fallen.contains(&"blk.0.ffn_down.weight"), "{fallen:?}");
    assert!(
        written.text.fallbacks.iter().all(|f| f.row % 32 != 0),
        "{:?}",
        written.text.fallbacks
    );
    let Some(conv) = converter() else {
        return Ok(());
    };
    let dump = conv.dump(&written.text.path)?;
    assert_eq!(dump["tensors"]["token_embd.weight"]["type"], "F16");
    assert_eq!(dump["tensors"]["blk.0.ffn_down.weight"]["type"], "Q8_0");
    assert_eq!(dump["kv"]["tokenizer.ggml.pre"]["value"], "lfm2");
    assert_eq!(dump["kv"]["general.file_type"]["value"], 7);
    let dump = conv.dump(&written.mmproj.path)?;
    assert_eq!(dump["kv"]["clip.projector_type"]["value"], "lfm2");
    Ok(())
}

fn vlmpipe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vlmpipe"))
        .args(args)
        .output()
        .expect("run vlmpipe")
}

#[test]
fn unknown_quant_lists_the_known_ones() {
    let tiny = repo_root().join("tests/fixtures/reference/checkpoints/tiny-thumb");
    let out = tempfile::tempdir().unwrap();
    let output = vlmpipe(&[
        "export",
        "--gguf",
        &out.path().to_string_lossy(),
        "--model",
        &tiny.to_string_lossy(),
        "--quant",
        "q9_0",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr
            .contains("unknown GGUF type `q9_0`; the known ones are F32, F16, BF16, Q8_0, Q4_K_M"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn another_architecture_is_refused_before_any_weight_is_read() {
    let model = tempfile::tempdir().unwrap();
    std::fs::write(
        model.path().join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#,
    )
    .unwrap();
    // No weights at all: the refusal must come from config.json alone.
    std::fs::write(model.path().join("model.safetensors"), b"").unwrap();
    let out = tempfile::tempdir().unwrap();
    let output = vlmpipe(&[
        "export",
        "--gguf",
        &out.path().to_string_lossy(),
        "--model",
        &model.path().to_string_lossy(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr
            .contains("is a `LlamaForCausalLM` checkpoint; GGUF export takes LFM2-VL checkpoints"),
        "{stderr}"
    );
}

#[test]
fn existing_files_are_not_overwritten_without_force() {
    let tiny = repo_root().join("tests/fixtures/reference/checkpoints/tiny-thumb");
    let out = tempfile::tempdir().unwrap();
    let theirs = out.path().join("tiny-thumb-F16.gguf");
    std::fs::write(&theirs, b"not ours").unwrap();
    let args = [
        "export",
        "--gguf",
        &out.path().to_string_lossy(),
        "--model",
        &tiny.to_string_lossy(),
    ];
    let output = vlmpipe(&args);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("does not overwrite"), "{stderr}");
    assert_eq!(std::fs::read(&theirs).unwrap(), b"not ours");

    let mut forced = args.to_vec();
    forced.push("--force");
    let output = vlmpipe(&forced);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let files: Vec<&str> = stdout.lines().collect();
    assert_eq!(files.len(), 2, "{stdout}");
    assert!(files[0].ends_with("tiny-thumb-F16.gguf"), "{stdout}");
    assert!(files[1].ends_with("mmproj-tiny-thumb-F16.gguf"), "{stdout}");
    assert_eq!(&std::fs::read(&theirs).unwrap()[..4], b"GGUF");
}

/// `export FILE STAGE --gguf` on a model with a LoRA adapter: the adapter is merged in f32
/// first, so the files equal the GGUF export of the f32 `--merged` checkpoint byte for byte,
/// and they differ from the base model's (the update is in the weights).
#[test]
fn a_stage_with_an_adapter_is_merged_in_f32_before_export() -> TestResult {
    let fixtures = repo_root().join("tests/fixtures/reference");
    let project = tempfile::tempdir()?;
    let base = fixtures.join("checkpoints/tiny-nothumb");
    let adapter = fixtures.join("lora/adapter_trained");
    std::fs::write(
        project.path().join("pipeline.vp"),
        format!(
            "pipeline demo {{}}\nmodel tuned = local(\"{}\", adapter: \"{}\")\n",
            base.display(),
            adapter.display()
        ),
    )?;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let pipeline = path(&project.path().join("pipeline.vp"));
    let run = |args: &[&str]| -> Result<(), Box<dyn std::error::Error>> {
        let output = Command::new(env!("CARGO_BIN_EXE_vlmpipe"))
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .output()?;
        assert!(
            output.status.success(),
            "vlmpipe {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    };
    let staged = project.path().join("staged");
    let merged = project.path().join("merged");
    let from_merged = project.path().join("from_merged");
    let from_base = project.path().join("from_base");
    let common = ["--quant", "F32", "--name", "t", "--quiet"];
    run(&[
        &["export", &pipeline, "tuned", "--gguf", &path(&staged)][..],
        &["--allow-read", &path(&fixtures)],
        &common[..],
    ]
    .concat())?;
    run(&[
        "export",
        &pipeline,
        "tuned",
        "--merged",
        &path(&merged),
        "--quiet",
        "--allow-read",
        &path(&fixtures),
    ])?;
    let m = path(&merged);
    run(&[
        &["export", "--model", &m, "--gguf", &path(&from_merged)],
        &common[..],
    ]
    .concat())?;
    let b = path(&base);
    run(&[
        &["export", "--model", &b, "--gguf", &path(&from_base)],
        &common[..],
    ]
    .concat())?;
    for file in ["t-F32.gguf", "mmproj-t-F32.gguf"] {
        let staged_bytes = std::fs::read(staged.join(file))?;
        assert!(
            staged_bytes == std::fs::read(from_merged.join(file))?,
            "{file}: the stage's export differs from the merged checkpoint's"
        );
        let same_as_base = staged_bytes == std::fs::read(from_base.join(file))?;
        // The adapter leaves the vision tower alone (`exclude_modules: .*vision_tower.*`).
        assert_eq!(same_as_base, file.starts_with("mmproj"), "{file}");
    }
    Ok(())
}

/// `llama-quantize` from the build cache, or `None` (saying why) where it is not built.
fn llama_quantize() -> Option<PathBuf> {
    let cache = llama_cpp_cache();
    let bin = cache.join("bin/llama-quantize");
    if cache.join("bin/.ok").is_file() && bin.is_file() {
        Some(bin)
    } else {
        eprintln!(
            "skipping: llama-quantize is not built in `{}` (run `bash tests/llama_cpp/build.sh \
             bins`, or set VLMPIPE_LLAMA_CPP_CACHE)",
            cache.display()
        );
        None
    }
}

/// `export --gguf --quant Q4_K_M` writes the file `llama-quantize F16.gguf OUT.gguf Q4_K_M` (its
/// per-tensor mixture, no `--pure`) makes of vlmpipe's F16 export of the same checkpoint: every
/// metadata key and value, every tensor's name, shape, type and bytes, through llama.cpp's
/// reader; only the tensor order differs (llama-quantize writes the loader's layer order), and
/// the sizes are within 2%. The mmproj beside it is the F16 one. Narrow (the fallbacks:
/// Q4_K → Q5_0, Q6_K → Q8_0, the tied embeddings Q8_0) and at the 450M shapes (Q4_K and Q6_K
/// by the `use_more_bits` layers).
#[test]
fn q4_k_m_export_equals_llama_quantize_of_the_f16_export() -> TestResult {
    let (Some(real), Some(conv), Some(quantize)) = (real_450m(), converter(), llama_quantize())
    else {
        return Ok(());
    };
    for vision_layers in [Some(NARROW_VISION_LAYERS), None] {
        let tmp = tempfile::tempdir()?;
        let ckpt = tmp.path().join(CHECKPOINT);
        random_450m_checkpoint(&real, &ckpt, vision_layers, 13)?;
        let export = |quant: GgufQuant, dir: &str| {
            gguf::export(
                &ckpt,
                &tmp.path().join(dir),
                &GgufOptions {
                    name: "lfm2-vl-test".into(),
                    quant,
                    mmproj_quant: quant.default_mmproj(),
                    force: false,
                },
            )
        };
        let ours = export(GgufQuant::Q4KM, "ours")?;
        let f16 = export(GgufQuant::F16, "f16")?;
        let theirs = tmp.path().join("theirs-Q4_K_M.gguf");
        let output = Command::new(&quantize)
            .arg(&f16.text.path)
            .arg(&theirs)
            .args(["Q4_K_M", "2"])
            .output()?;
        assert!(
            output.status.success(),
            "llama-quantize: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let (a, b) = (conv.dump(&ours.text.path)?, conv.dump(&theirs)?);
        let diffs = differences_in(&a, &b, &["version", "alignment"]);
        assert!(
            diffs.is_empty(),
            "{vision_layers:?}: {} differences:\n{}",
            diffs.len(),
            diffs.join("\n")
        );
        let types: std::collections::BTreeSet<&str> = a["tensors"]
            .as_object()
            .ok_or("tensors")?
            .values()
            .filter_map(|t| t["type"].as_str())
            .collect();
        let want: &[&str] = match vision_layers {
            // Rows of 64 (hidden) fall back; `ffn_down`'s rows of 256 (the auto-adjusted FFN
            // width) take Q4_K, or Q6_K in a `use_more_bits` layer.
            Some(_) => &["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"],
            None => &["F32", "Q4_K", "Q6_K"],
        };
        assert_eq!(types.into_iter().collect::<Vec<_>>(), want);
        assert_eq!(a["kv"]["general.file_type"]["value"], 15);
        let (x, y) = (
            ours.text.bytes as f64,
            std::fs::metadata(&theirs)?.len() as f64,
        );
        assert!(
            (x - y).abs() / y < 0.02,
            "{x} bytes vs llama-quantize's {y}"
        );
        assert_eq!(ours.mmproj.path.file_name(), f16.mmproj.path.file_name());
        assert!(std::fs::read(&ours.mmproj.path)? == std::fs::read(&f16.mmproj.path)?);
        eprintln!(
            "{vision_layers:?}: Q4_K_M {} bytes, llama-quantize {} bytes, {} fallbacks",
            ours.text.bytes,
            y,
            ours.text.fallbacks.len()
        );
    }
    Ok(())
}

/// A k-quant mixture is a text-model type: `--mmproj-quant Q4_K_M` is refused, naming the types
/// an mmproj takes, before anything is written.
#[test]
fn an_mmproj_takes_no_k_quant_mixture() {
    let tiny = repo_root().join("tests/fixtures/reference/checkpoints/tiny-thumb");
    let out = tempfile::tempdir().unwrap();
    let output = vlmpipe(&[
        "export",
        "--gguf",
        &out.path().to_string_lossy(),
        "--model",
        &tiny.to_string_lossy(),
        "--quant",
        "q4_k_m",
        "--mmproj-quant",
        "Q4_K_M",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the known ones are F32, F16, BF16, Q8_0 (an mmproj takes no k-quant"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}
