//! Issue 12, item 3: GGUF in. A pair written by `vlmpipe export --gguf` (or llama.cpp's own
//! converter) loads into vlmpipe's runtime and answers as the safetensors checkpoint it came
//! from: the tokenizer rebuilt from `tokenizer.ggml.*` tokenizes like `tokenizer.json`, F32
//! logits equal the checkpoint's, F16 stays close, Q8_0 holds the same blocks as `--quant q8_0`;
//! bad files are refused at open, naming the file and the mismatch.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use image::RgbImage;
use vlmpipe::gguf::read::{GgufIn, find_pair};
use vlmpipe::gguf::tokenizer_read::read_tokenizer;
use vlmpipe::gguf::{self, GgufOptions, GgufQuant};
use vlmpipe::model::chat::Conversation;
use vlmpipe::model::checkpoint::LoadOptions;
use vlmpipe::model::generate::Sampling;
use vlmpipe::model::linear::LinearVisitor;
use vlmpipe::model::quant::Quant;
use vlmpipe::runner::{DecodeOptions, ModelRunner};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture_checkpoint(name: &str) -> PathBuf {
    repo_root().join(format!("tests/fixtures/reference/checkpoints/{name}"))
}

fn image(name: &str) -> RgbImage {
    image::open(repo_root().join(format!("tests/fixtures/reference/images/{name}")))
        .expect("fixture image")
        .to_rgb8()
}

/// `vlmpipe export --gguf` of `checkpoint` into a new folder.
fn export(checkpoint: &Path, quant: GgufQuant) -> Result<tempfile::TempDir, gguf::GgufError> {
    let out = tempfile::tempdir().expect("temp dir");
    gguf::export(
        checkpoint,
        out.path(),
        &GgufOptions {
            name: "tiny".into(),
            quant,
            mmproj_quant: quant,
            force: false,
        },
    )?;
    Ok(out)
}

/// Images covering one upscaled view, one view, and tiles with a thumbnail.
const IMAGES: [&str; 3] = ["lora_a_64x48.png", "photo_512x384.png", "hd_1920x1080.png"];

fn greedy() -> DecodeOptions {
    DecodeOptions {
        max_new_tokens: 8,
        sampling: Sampling::default(),
    }
}

/// The prompt's last logits, the greedy answer and the prompt's ids.
type Answer = (Vec<f32>, Vec<u32>, Vec<u32>);

/// The prompt's last logits and the greedy answer for one image question.
fn answer(runner: &ModelRunner, image: &RgbImage) -> Result<Answer, Box<dyn std::error::Error>> {
    let conversation = Conversation::image_question(Some("Answer briefly."), "Cat or dog?");
    let prompt = runner.prepare(&conversation, std::slice::from_ref(image))?;
    let run = runner.generate_with_details(&[&prompt], &greedy(), None)?;
    let logits = run.prompt_logits.flatten_all()?.to_vec1::<f32>()?;
    Ok((
        logits,
        run.answers[0].tokens.clone(),
        prompt.inputs.input_ids.clone(),
    ))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0f32, |m, x| m.max(x.abs()))
}

#[test]
fn f32_pair_answers_like_the_safetensors_checkpoint() -> TestResult {
    let tiny = fixture_checkpoint("tiny-thumb");
    let out = export(&tiny, GgufQuant::F32)?;
    let reference = ModelRunner::load(&tiny, &LoadOptions::default())?;
    // The folder, as `--model DIR` gives it.
    let imported = ModelRunner::load(out.path(), &LoadOptions::default())?;
    for name in IMAGES {
        let img = image(name);
        let (want_logits, want_answer, want_ids) = answer(&reference, &img)?;
        let (got_logits, got_answer, got_ids) = answer(&imported, &img)?;
        assert_eq!(got_ids, want_ids, "{name}: prompt tokens");
        let diff = max_abs_diff(&got_logits, &want_logits);
        assert!(
            diff <= 1e-5 * max_abs(&want_logits).max(1.0),
            "{name}: logits differ by {diff}"
        );
        assert_eq!(got_answer, want_answer, "{name}: greedy answer");
    }
    // The text file itself picks the same pair.
    let file = out.path().join("tiny-F32.gguf");
    let by_file = ModelRunner::load(&file, &LoadOptions::default())?;
    let img = image(IMAGES[0]);
    assert_eq!(answer(&by_file, &img)?.0, answer(&imported, &img)?.0);
    Ok(())
}

#[test]
fn f16_pair_stays_close_to_the_checkpoint() -> TestResult {
    let tiny = fixture_checkpoint("tiny-thumb");
    let out = export(&tiny, GgufQuant::F16)?;
    let reference = ModelRunner::load(&tiny, &LoadOptions::default())?;
    let imported = ModelRunner::load(out.path(), &LoadOptions::default())?;
    for name in IMAGES {
        let img = image(name);
        let (want, _, _) = answer(&reference, &img)?;
        let (got, _, _) = answer(&imported, &img)?;
        let diff = max_abs_diff(&got, &want);
        let scale = max_abs(&want);
        eprintln!("{name}: F16 max |Δlogit| {diff} (max |logit| {scale})");
        assert!(diff > 0.0, "{name}: F16 weights change something");
        assert!(
            diff < 0.01 * scale.max(1.0),
            "{name}: F16 logits off by {diff}"
        );
    }
    Ok(())
}

/// The Q8_0 pair holds the blocks `--quant q8_0` makes from the same checkpoint (ggml's
/// reference quantizer on both sides), so every quantized projection dequantizes to the same
/// values. The one difference is llama.cpp's: the mmproj keeps the patch embedding (a
/// convolution there) in F32, where `--quant q8_0` quantizes it too, so logits are close, not
/// equal.
#[test]
fn q8_0_pair_holds_the_blocks_of_quant_q8_0() -> TestResult {
    let tiny = fixture_checkpoint("tiny-thumb");
    let out = export(&tiny, GgufQuant::Q8_0)?;
    let (quantized, _) =
        ModelRunner::load_quantized(&tiny, None, &LoadOptions::default(), Quant::Q8_0)?;
    let full = ModelRunner::load(&tiny, &LoadOptions::default())?;
    let imported = ModelRunner::load(out.path(), &LoadOptions::default())?;

    let weights = |runner: &ModelRunner| {
        let mut out = Vec::new();
        runner.model().visit_linears(&mut |l| {
            let w = l.weight().expect("weight");
            out.push((l.name().to_owned(), w.flatten_all().expect("flat")));
        });
        out
    };
    let (ours, theirs, dense) = (weights(&imported), weights(&quantized), weights(&full));
    assert_eq!(ours.len(), theirs.len());
    let mut compared = 0;
    for ((name, a), ((_, b), (_, f))) in ours.iter().zip(theirs.iter().zip(&dense)) {
        let (a, b, f) = (
            a.to_vec1::<f32>()?,
            b.to_vec1::<f32>()?,
            f.to_vec1::<f32>()?,
        );
        if name.ends_with("patch_embedding") {
            assert_eq!(a, f, "{name}: the mmproj keeps the patch embedding in F32");
            continue;
        }
        assert_eq!(a, b, "{name}: same Q8_0 blocks as --quant q8_0");
        assert_ne!(a, f, "{name}: quantized");
        compared += 1;
    }
    assert!(compared > 20, "{compared} projections compared");

    for name in IMAGES {
        let img = image(name);
        let (reference, _, _) = answer(&full, &img)?;
        let (runtime, _, _) = answer(&quantized, &img)?;
        let (got, _, _) = answer(&imported, &img)?;
        let ours = max_abs_diff(&got, &reference);
        let theirs = max_abs_diff(&runtime, &reference);
        eprintln!(
            "{name}: max |Δlogit| from f32: Q8_0 GGUF {ours}, --quant q8_0 {theirs}; between \
             them {} (max |logit| {})",
            max_abs_diff(&got, &runtime),
            max_abs(&reference)
        );
        // Same blocks; the pair differs from `--quant q8_0` only in its F32 patch embedding,
        // which moves the logits less than half as far as quantizing does. (Not "no further
        // from f32": since Q8_0 prefill is the exact f32 product over the dequantized blocks,
        // neither is systematically closer, and the order flips from photo to photo.)
        let between = max_abs_diff(&got, &runtime);
        assert!(
            between <= 0.5 * theirs,
            "{name}: {between} between them vs {theirs} from f32 (the pair: {ours})"
        );
    }
    Ok(())
}

/// Encodes and decodes `texts` with both tokenizers and compares ids and text.
fn assert_same_tokenization(real: &tokenizers::Tokenizer, ours: &tokenizers::Tokenizer) {
    let texts = [
        "Hello world",
        "<|startoftext|><|im_start|>user\n<image>Cat or dog?<|im_end|>\n<|im_start|>assistant\n",
        "  leading and   internal    spaces\t\ttabs\n\n\nnewlines  ",
        "Ünïcödé: naïve café — “quotes” 日本語のテキスト 🚀🦙 emoji 😶‍🌫️",
        "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
        "3 33 333 3333 33333 3.3 3..3 1,000,000.00",
        "<|img_row_1_col_2|><|image_start|><|image_end|><|img_thumbnail|>",
        "{\"label\": \"cat\", \"confidence\": 0.93}",
        "python Mathias pythonic",
        "",
        " ",
        "\u{a0}non-breaking\u{2009}thin\u{200b}zero-width",
        "кот или собака? קט או כלב? قطة أم كلب؟",
    ];
    for text in texts {
        for special in [true, false] {
            let a = real.encode(text, special).expect("real encode");
            let b = ours.encode(text, special).expect("our encode");
            assert_eq!(
                b.get_ids(),
                a.get_ids(),
                "{text:?} (add special tokens: {special})"
            );
            for skip in [true, false] {
                assert_eq!(
                    ours.decode(a.get_ids(), skip).expect("decode"),
                    real.decode(a.get_ids(), skip).expect("decode"),
                    "{text:?} decoded (skip special: {skip})"
                );
            }
        }
    }
    // Every id decodes alike, one at a time.
    let n = real.get_vocab_size(true) as u32;
    assert_eq!(ours.get_vocab_size(true) as u32, n);
    for id in 0..n {
        assert_eq!(
            ours.decode(&[id], false).ok(),
            real.decode(&[id], false).ok(),
            "id {id}"
        );
    }
}

/// A text GGUF holding only the tokenizer metadata of the checkpoint in `dir`.
fn tokenizer_only_gguf(dir: &Path, out: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let vocab_size = config["text_config"]["vocab_size"]
        .as_u64()
        .unwrap_or(65536) as usize;
    let vocab = gguf::tokenizer::read_vocab(dir, vocab_size)?;
    let kv = gguf::metadata::text_metadata(
        &dir.join("config.json"),
        &config,
        &vocab,
        "tok",
        GgufQuant::F16,
        0,
    )?;
    let path = out.join("tok-F16.gguf");
    gguf::write::write_file(&path, &kv, &[])?;
    Ok(path)
}

#[test]
fn tokenizer_rebuilt_from_the_gguf_tokenizes_like_tokenizer_json() -> TestResult {
    let mut dirs = vec![fixture_checkpoint("tiny-thumb")];
    match crate::support::shared_path("models/LFM2-VL-450M") {
        Some(real) => dirs.push(real),
        None => eprintln!("skipping the real LFM2 tokenizer: ../shared is not here"),
    }
    for dir in dirs {
        let out = tempfile::tempdir()?;
        let path = tokenizer_only_gguf(&dir, out.path())?;
        let rebuilt = read_tokenizer(&GgufIn::open(&path)?)?;
        let real = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| e.to_string())?;
        assert_same_tokenization(&real, &rebuilt.tokenizer()?);
        let template = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
        if template.is_some() {
            assert_eq!(rebuilt.chat_template, template, "{}", dir.display());
        }
        assert_eq!(rebuilt.eos.as_deref(), Some("<|im_end|>"));
        assert_eq!(rebuilt.bos.as_deref(), Some("<|startoftext|>"));
    }
    Ok(())
}

/// Rewrites a GGUF file through candle's reader and writer, changing its metadata.
fn rewrite(
    from: &Path,
    to: &Path,
    edit: impl Fn(&mut Vec<(String, gguf_file::Value)>),
) -> TestResult {
    let mut reader = std::io::BufReader::new(std::fs::File::open(from)?);
    let content = gguf_file::Content::read(&mut reader)?;
    let mut kv: Vec<(String, gguf_file::Value)> = content.metadata.clone().into_iter().collect();
    kv.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut kv);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = names
        .iter()
        .map(|n| {
            let t = content.tensor(&mut reader, n, &candle_core::Device::Cpu)?;
            Ok(((*n).clone(), t))
        })
        .collect::<candle_core::Result<_>>()?;
    gguf::write::write_file(to, &kv, &tensors)?;
    Ok(())
}

fn load_err(path: &Path) -> String {
    match ModelRunner::load(path, &LoadOptions::default()) {
        Ok(_) => panic!("`{}` loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_truncated_file_is_refused_naming_it_and_the_tensor() -> TestResult {
    let out = export(&fixture_checkpoint("tiny-thumb"), GgufQuant::F16)?;
    let text = out.path().join("tiny-F16.gguf");
    let bytes = std::fs::read(&text)?;
    std::fs::write(&text, &bytes[..bytes.len() - 1000])?;
    let err = load_err(out.path());
    assert!(
        err.contains("tiny-F16.gguf` is truncated: tensor `"),
        "{err}"
    );
    assert!(err.contains("download it again"), "{err}");
    // Cut inside the header: still the file's name and what is wrong.
    std::fs::write(&text, &bytes[..100])?;
    let err = load_err(out.path());
    assert!(
        err.contains("tiny-F16.gguf` is not a readable GGUF file"),
        "{err}"
    );
    Ok(())
}

#[test]
fn another_architecture_is_refused() -> TestResult {
    let out = export(&fixture_checkpoint("tiny-thumb"), GgufQuant::F16)?;
    let text = out.path().join("tiny-F16.gguf");
    rewrite(&text.clone(), &text, |kv| {
        for (k, v) in kv.iter_mut() {
            if k == "general.architecture" {
                *v = gguf_file::Value::String("llama".into());
            }
        }
    })?;
    let err = load_err(out.path());
    assert!(
        err.contains("tiny-F16.gguf` is a `llama` GGUF; vlmpipe reads LFM2-VL"),
        "{err}"
    );
    // An mmproj where the text model goes.
    let mmproj = out.path().join("mmproj-tiny-F16.gguf");
    let swapped = tempfile::tempdir()?;
    std::fs::copy(&mmproj, swapped.path().join("a-F16.gguf"))?;
    std::fs::copy(&mmproj, swapped.path().join("mmproj-a-F16.gguf"))?;
    let err = load_err(swapped.path());
    assert!(
        err.contains("a-F16.gguf` is a `clip` GGUF; it is an mmproj"),
        "{err}"
    );
    Ok(())
}

#[test]
fn an_mmproj_of_another_model_is_refused() -> TestResult {
    // tiny-thumb's text model is 64 wide; tiny-variant's projector outputs 32.
    let ours = export(&fixture_checkpoint("tiny-thumb"), GgufQuant::F16)?;
    let other = export(&fixture_checkpoint("tiny-variant"), GgufQuant::F16)?;
    std::fs::copy(
        other.path().join("mmproj-tiny-F16.gguf"),
        ours.path().join("mmproj-tiny-F16.gguf"),
    )?;
    let err = load_err(ours.path());
    assert!(
        err.contains("mmproj-tiny-F16.gguf` does not fit `")
            && err.contains("its projector outputs 32 values a token")
            && err.contains("the text model embeds tokens in 64"),
        "{err}"
    );
    assert!(
        err.contains("use the mmproj published with this text model"),
        "{err}"
    );
    Ok(())
}

/// Offset of tensor `name`'s dims in a GGUF v3 header: after its name (u64 length + bytes) and
/// its dimension count (u32).
fn dims_offset(bytes: &[u8], name: &str) -> usize {
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .expect("tensor name in the header");
    at + key.len() + 4
}

#[test]
fn a_quantized_row_that_is_not_whole_blocks_is_refused() -> TestResult {
    let out = export(&fixture_checkpoint("tiny-thumb"), GgufQuant::Q8_0)?;
    let text = out.path().join("tiny-Q8_0.gguf");
    let mut bytes = std::fs::read(&text)?;
    // `blk.0.ffn_up.weight` is [ne0 64, ne1 n] Q8_0; declare rows of 16 (same bytes: [16, 4n]).
    let at = dims_offset(&bytes, "blk.0.ffn_up.weight");
    let ne0 = u64::from_le_bytes(bytes[at..at + 8].try_into()?);
    let ne1 = u64::from_le_bytes(bytes[at + 8..at + 16].try_into()?);
    assert_eq!(ne0, 64);
    bytes[at..at + 8].copy_from_slice(&16u64.to_le_bytes());
    bytes[at + 8..at + 16].copy_from_slice(&(ne1 * 4).to_le_bytes());
    std::fs::write(&text, &bytes)?;
    let err = load_err(out.path());
    assert!(
        err.contains(
            "tensor `blk.0.ffn_up.weight` is Q8_0 with rows of 16 values, not whole blocks of 32"
        ),
        "{err}"
    );
    Ok(())
}

#[test]
fn folders_without_one_pair_say_what_they_hold() -> TestResult {
    let f16 = export(&fixture_checkpoint("tiny-thumb"), GgufQuant::F16)?;
    let dir = tempfile::tempdir()?;
    // Only a text file.
    std::fs::copy(
        f16.path().join("tiny-F16.gguf"),
        dir.path().join("tiny-F16.gguf"),
    )?;
    let err = load_err(dir.path());
    assert!(err.contains("no mmproj GGUF"), "{err}");
    // Two text files: ambiguous without a quant, and a quant picks one.
    let q8 = export(&fixture_checkpoint("tiny-thumb"), GgufQuant::Q8_0)?;
    std::fs::copy(
        q8.path().join("tiny-Q8_0.gguf"),
        dir.path().join("tiny-Q8_0.gguf"),
    )?;
    std::fs::copy(
        f16.path().join("mmproj-tiny-F16.gguf"),
        dir.path().join("mmproj-tiny-F16.gguf"),
    )?;
    let err = load_err(dir.path());
    assert!(
        err.contains("several text GGUF files (`tiny-F16.gguf`, `tiny-Q8_0.gguf`)")
            && err.contains("quants here: F16, Q8_0"),
        "{err}"
    );
    let pair = find_pair(dir.path(), Some("q8_0"), None)?;
    assert_eq!(pair.text, dir.path().join("tiny-Q8_0.gguf"));
    assert_eq!(pair.mmproj, dir.path().join("mmproj-tiny-F16.gguf"));
    let err = find_pair(dir.path(), Some("Q4_0"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no text GGUF of quant `Q4_0`"), "{err}");
    // The Q8_0 text with the F16 mmproj is a pair llama.cpp runs too.
    ModelRunner::load_gguf(&pair, &LoadOptions::default())?;
    // An empty folder is not a GGUF folder: the checkpoint loader says what it misses.
    let empty = tempfile::tempdir()?;
    let err = load_err(empty.path());
    assert!(err.contains("config.json"), "{err}");
    Ok(())
}

#[test]
fn a_gguf_model_refuses_an_adapter_and_quant() -> TestResult {
    let out = export(&fixture_checkpoint("tiny-thumb"), GgufQuant::F16)?;
    let err = ModelRunner::load_quantized(out.path(), None, &LoadOptions::default(), Quant::Q8_0)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("is a GGUF model, already stored in its own types"),
        "{err}"
    );
    Ok(())
}

fn vlmpipe(args: &[&str]) -> std::process::Output {
    let cache = tempfile::tempdir().expect("temp dir");
    std::process::Command::new(env!("CARGO_BIN_EXE_vlmpipe"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .expect("run vlmpipe")
}

/// `infer --model DIR` and `bench model --model DIR` take a GGUF folder as they take a
/// checkpoint folder; infer answers as the checkpoint does.
#[test]
fn infer_and_bench_take_a_gguf_folder() -> TestResult {
    let tiny = fixture_checkpoint("tiny-thumb");
    let out = export(&tiny, GgufQuant::F32)?;
    let image = repo_root().join("tests/fixtures/reference/images/photo_512x384.png");
    let infer = |model: &Path| {
        let output = vlmpipe(&[
            "infer",
            "--model",
            &model.to_string_lossy(),
            "--image",
            &image.to_string_lossy(),
            "--prompt",
            "Cat or dog?",
            "--max-new-tokens",
            "6",
            "--json",
        ]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
        report
    };
    let want = infer(&tiny);
    let got = infer(out.path());
    assert_eq!(got["token_ids"], want["token_ids"]);
    assert_eq!(got["text"], want["text"]);
    assert_eq!(got["prompt_tokens"], want["prompt_tokens"]);

    let bench = vlmpipe(&[
        "bench",
        "model",
        "--model",
        &out.path().to_string_lossy(),
        "--image",
        &image.to_string_lossy(),
        "--repeats",
        "1",
        "--decode-steps",
        "2",
    ]);
    assert!(
        bench.status.success(),
        "{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    Ok(())
}

/// llama.cpp's own converter's pair (F32 and Q8_0) of a narrow random checkpoint with the real
/// LFM2-VL-450M file set loads and answers like the checkpoint (F32) and like vlmpipe's own
/// export (Q8_0: the same bytes, so the same logits).
#[test]
fn the_converters_pair_loads_like_vlmpipes() -> TestResult {
    let (Some(converter), Some(real)) = (
        crate::gguf_export::converter(),
        crate::gguf_export::real_450m(),
    ) else {
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    let checkpoint = work.path().join("checkpoint");
    crate::support::random_450m_checkpoint(&real, &checkpoint, Some(3), 12)?;
    let reference = ModelRunner::load(&checkpoint, &LoadOptions::default())?;
    let images = [image(IMAGES[0]), image(IMAGES[1])];
    for quant in [GgufQuant::F32, GgufQuant::Q8_0] {
        let theirs = tempfile::tempdir()?;
        converter.convert(&checkpoint, quant, "narrow", theirs.path())?;
        let from_converter = ModelRunner::load(theirs.path(), &LoadOptions::default())?;
        let ours = export(&checkpoint, quant)?;
        let from_export = ModelRunner::load(ours.path(), &LoadOptions::default())?;
        for img in &images {
            let (got, got_answer, _) = answer(&from_converter, img)?;
            let (exported, exported_answer, _) = answer(&from_export, img)?;
            assert_eq!(got, exported, "{quant}: converter's pair vs vlmpipe's");
            assert_eq!(got_answer, exported_answer, "{quant}");
            if quant == GgufQuant::F32 {
                let (want, want_answer, _) = answer(&reference, img)?;
                let diff = max_abs_diff(&got, &want);
                assert!(
                    diff <= 1e-5 * max_abs(&want).max(1.0),
                    "F32: {diff} from the checkpoint"
                );
                assert_eq!(got_answer, want_answer);
            }
        }
    }
    Ok(())
}

/// A pipeline comparing a safetensors model with `gguf_model` on the same synthetic pictures.
fn pipeline(gguf_model: &str) -> String {
    format!(
        r#"
pipeline g {{ seed = 5 }}
labels shapes = ["red circle", "red square", "blue circle", "blue square"]
dataset pictures {{
  source = synthetic(kind: "shapes", n: 8, seed: 3, size: 32, colors: "red,blue", shapes: "circle,square")
  label  = "class"
  labels = shapes
}}
prompt ask {{ user = "Which shape is in the picture?" }}
grammar answer = one_of(shapes)
model full = local("models/base")
model shipped = {gguf_model}
eval full_eval {{ model = full  data = pictures  prompt = ask  labels = shapes  scoring = labels  output = answer }}
eval shipped_eval {{ model = shipped  data = pictures  prompt = ask  labels = shapes  scoring = labels  output = answer }}
"#
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// A project with `models/base` (tiny-thumb) and `models/gguf` (its F32 and Q8_0 text files and
/// F32 mmproj), and the pipeline with `gguf_model`.
fn gguf_project(gguf_model: &str) -> Result<tempfile::TempDir, Box<dyn std::error::Error>> {
    let root = tempfile::tempdir()?;
    let tiny = fixture_checkpoint("tiny-thumb");
    copy_dir(&tiny, &root.path().join("models/base"));
    let gguf_dir = root.path().join("models/gguf");
    for quant in [GgufQuant::F32, GgufQuant::Q8_0] {
        let out = export(&tiny, quant)?;
        copy_dir(out.path(), &gguf_dir);
    }
    std::fs::remove_file(gguf_dir.join("mmproj-tiny-Q8_0.gguf"))?;
    std::fs::write(root.path().join("pipeline.vp"), pipeline(gguf_model))?;
    Ok(root)
}

fn project_command(root: &Path, verb: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vlmpipe"));
    cmd.arg(verb)
        .arg(root.join("pipeline.vp"))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", root.join("hub-cache"))
        .env_remove("VLMPIPE_CACHE");
    cmd
}

fn metrics(root: &Path, eval: &str) -> serde_json::Value {
    let path = root.join("evals/g").join(eval).join("metrics.json");
    serde_json::from_slice(&std::fs::read(&path).expect("metrics.json")).expect("metrics json")
}

/// `gguf("folder", quant: …)` in a pipeline: the F32 pair's eval equals the checkpoint's.
#[test]
fn a_local_gguf_model_evaluates_like_its_checkpoint() -> TestResult {
    let root = gguf_project(r#"gguf("models/gguf", quant: "f32")"#)?;
    let output = project_command(root.path(), "run")
        .arg("--quiet")
        .output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (full, shipped) = (
        metrics(root.path(), "full_eval"),
        metrics(root.path(), "shipped_eval"),
    );
    assert_eq!(full["confusion_matrix"], shipped["confusion_matrix"]);
    let (a, b) = (full["log_loss"].as_f64(), shipped["log_loss"].as_f64());
    assert!(
        a.zip(b).is_some_and(|(x, y)| (x - y).abs() < 1e-5),
        "log loss {a:?} vs {b:?}"
    );
    Ok(())
}

fn check_error(gguf_model: &str) -> Result<String, Box<dyn std::error::Error>> {
    let root = gguf_project(gguf_model)?;
    let output = project_command(root.path(), "check").output()?;
    assert!(!output.status.success(), "`{gguf_model}` passed the check");
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Quant names and the folder's pair are checked by `vlmpipe check`, before anything runs.
#[test]
fn gguf_sources_are_checked_at_check_time() -> TestResult {
    let err = check_error(r#"gguf("models/gguf", quant: "Q8_1")"#)?;
    assert!(
        err.contains("unknown GGUF quant `Q8_1` for `quant`")
            && err.contains("did you mean `Q8_0`?")
            && err.contains("the known ones are F32, F16, BF16, Q8_0"),
        "{err}"
    );
    assert!(err.contains("pipeline.vp:"), "{err}");
    let err = check_error(r#"gguf("models/gguf")"#)?;
    assert!(
        err.contains("several text GGUF files (`tiny-F32.gguf`, `tiny-Q8_0.gguf`)"),
        "{err}"
    );
    let err = check_error(r#"gguf("models/gguf", quant: "Q8_0", mmproj: "Q8_0")"#)?;
    assert!(err.contains("no mmproj GGUF of quant `Q8_0`"), "{err}");
    let err = check_error(r#"gguf("models/gguf", quant: "F32", revision: "v1")"#)?;
    assert!(
        err.contains("`revision` is for a Hub repo, not a folder"),
        "{err}"
    );

    // A folder outside the pipeline's tree is not read without `--allow-read`.
    let outside = gguf_project(r#"gguf("models/gguf", quant: "F32")"#)?;
    let model = outside.path().join("models/gguf").display().to_string();
    let err = check_error(&format!("gguf(\"{model}\", quant: \"F32\")"))?;
    assert!(err.contains("cannot read path `"), "{err}");
    assert!(err.contains("--allow-read"), "{err}");
    Ok(())
}

/// `gguf("org/name", quant: …)` from the (fake, loopback) Hub: only the chosen pair is
/// downloaded, the eval runs on it, and a second run (offline) is all cached.
#[test]
fn a_hub_gguf_model_downloads_only_its_pair() -> TestResult {
    use crate::hub_support::{FakeHub, FakeRepo};
    let root = gguf_project(r#"gguf("org/tiny-GGUF", quant: "Q8_0")"#)?;
    let gguf_dir = root.path().join("models/gguf");
    let mut files = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(&gguf_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        files.insert(name, std::fs::read(entry.path())?);
    }
    files.insert("README.md".into(), b"# tiny, as GGUF".to_vec());
    let server = FakeHub::start(vec![FakeRepo::model(
        "org/tiny-GGUF",
        "0123456789abcdef0123456789abcdef01234567",
        files,
    )]);
    let run = |offline: bool| {
        let mut cmd = project_command(root.path(), "run");
        cmd.env("HF_ENDPOINT", server.endpoint())
            .arg("--quiet")
            .arg("--summary-json")
            .arg(root.path().join("summary.json"));
        if !offline {
            cmd.env_remove("HF_HUB_OFFLINE");
        }
        let output = cmd.output().expect("run vlmpipe");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(false);
    let downloaded: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.contains("/resolve/"))
        .collect();
    assert!(
        downloaded.iter().any(|r| r.contains("/tiny-Q8_0.gguf"))
            && downloaded
                .iter()
                .any(|r| r.contains("/mmproj-tiny-F32.gguf")),
        "{downloaded:?}"
    );
    assert!(
        !downloaded.iter().any(|r| r.contains("/tiny-F32.gguf")),
        "only the pair asked for: {downloaded:?}"
    );
    assert!(metrics(root.path(), "shipped_eval")["log_loss"].is_number());
    let before = server.requests().len();
    run(true);
    assert_eq!(
        server.requests().len(),
        before,
        "offline rerun asks nothing"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.path().join("summary.json"))?)?;
    let stages = summary["stages"].as_array().expect("stages");
    assert!(stages.iter().all(|s| s["status"] == "cached"), "{stages:?}");
    Ok(())
}
