//! Helpers shared by several test modules: the `../shared` data folder, the test device, JSON
//! and tensor comparison.

use std::path::PathBuf;

/// Equality of two serialisable values up to 1e-12 relative error in floats: serde_json's default
/// parser may differ from the written decimal in the last bit.
pub fn assert_json_close<T: serde::Serialize>(a: &T, b: &T) {
    fn walk(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
        use serde_json::Value;
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => {
                let (x, y) = (
                    x.as_f64().unwrap_or(f64::NAN),
                    y.as_f64().unwrap_or(f64::NAN),
                );
                assert!(
                    (x - y).abs() <= 1e-12 * x.abs().max(1.0),
                    "{at}: {x} != {y}"
                );
            }
            (Value::Array(x), Value::Array(y)) => {
                assert_eq!(x.len(), y.len(), "{at}: lengths");
                for (i, (x, y)) in x.iter().zip(y).enumerate() {
                    walk(x, y, &format!("{at}[{i}]"));
                }
            }
            (Value::Object(x), Value::Object(y)) => {
                assert_eq!(x.len(), y.len(), "{at}: keys");
                for (k, x) in x {
                    walk(x, &y[k], &format!("{at}.{k}"));
                }
            }
            _ => assert_eq!(a, b, "{at}"),
        }
    }
    let a = serde_json::to_value(a).expect("serialise");
    let b = serde_json::to_value(b).expect("serialise");
    walk(&a, &b, "$");
}

/// The real LFM2-VL-450M `config.json` at narrow widths with `vision_layers` vision layers: same
/// keys, vocabulary, token ids and processor settings, so the real file set loads around it.
pub fn narrow_450m_config(real: &serde_json::Value, vision_layers: usize) -> serde_json::Value {
    use serde_json::json;
    let mut cfg = real.clone();
    cfg["vision_config"]["hidden_size"] = json!(64);
    cfg["vision_config"]["intermediate_size"] = json!(128);
    cfg["vision_config"]["num_hidden_layers"] = json!(vision_layers);
    cfg["vision_config"]["num_attention_heads"] = json!(4);
    cfg["projector_hidden_size"] = json!(96);
    let text = &mut cfg["text_config"];
    for key in ["hidden_size", "block_dim", "conv_dim", "conv_dim_out"] {
        text[key] = json!(64);
    }
    text["block_ff_dim"] = json!(192);
    text["intermediate_size"] = json!(192);
    text["num_attention_heads"] = json!(4);
    text["num_heads"] = json!(4);
    text["num_key_value_heads"] = json!(2);
    text["layer_types"] = json!(["conv", "full_attention", "conv"]);
    text["num_hidden_layers"] = json!(3);
    cfg
}

/// The `shared/` folder beside the checkout (or `VLMPIPE_SHARED`), if present.
///
/// Tests that need real photos, the real tokenizer or the transformers references call this and
/// skip with a message when it returns `None`, so the suite still passes on a bare clone.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("VLMPIPE_SHARED") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    };
    dir.is_dir().then_some(dir)
}

/// Like [`shared_dir`] joined with `rel`, printing why the calling test is skipped when absent.
pub fn shared_path(rel: &str) -> Option<PathBuf> {
    let Some(dir) = shared_dir() else {
        eprintln!("skipping: ../shared not found (set VLMPIPE_SHARED to the shared data folder)");
        return None;
    };
    let path = dir.join(rel);
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "skipping: {} not found (set VLMPIPE_SHARED to the shared data folder)",
            path.display()
        );
        None
    }
}

/// The device model tests run on: `VLMPIPE_TEST_DEVICE` (any `--device` spelling), the CPU when
/// unset. A GPU machine runs the parity suite with, e.g.,
/// `VLMPIPE_TEST_DEVICE=cuda cargo test --features cuda --test it model_parity_committed`.
///
/// Panics with the reason when the variable names a device this build or machine cannot open:
/// a test asked to run on a GPU must not quietly pass on the CPU.
pub fn test_device() -> candle_core::Device {
    let Some(choice) = std::env::var("VLMPIPE_TEST_DEVICE")
        .ok()
        .filter(|s| !s.trim().is_empty())
    else {
        return candle_core::Device::Cpu;
    };
    let resolved = choice
        .parse::<vlmpipe::model::DeviceChoice>()
        .map_err(|e| e.to_string())
        .and_then(|c| c.resolve().map_err(|e| e.to_string()));
    match resolved {
        Ok(device) => device,
        Err(e) => panic!("VLMPIPE_TEST_DEVICE={choice}: {e}"),
    }
}

/// The largest absolute difference between two tensors of the same shape, as f32; panics on a
/// shape mismatch or a failed op (a test helper).
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let diff = (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.to_dtype(candle_core::DType::F32))
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>());
    diff.unwrap_or_else(|e| panic!("max_abs_diff: {e}"))
}

/// `vlmpipe` (the binary under test) to run in `dir` offline: no `VLMPIPE_CACHE` from the
/// environment, a Hub cache inside `dir`, no colours. The caller adds the arguments.
pub fn offline_vlmpipe(dir: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vlmpipe"));
    command
        .current_dir(dir)
        .env_remove("VLMPIPE_CACHE")
        .env("HF_HOME", dir.join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .env("NO_COLOR", "1");
    command
}

/// The repository's root folder.
pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The llama.cpp version `tests/llama_cpp/build.sh` pins, read from the script so the two never
/// disagree.
pub fn llama_cpp_version() -> String {
    let script = std::fs::read_to_string(repo_root().join("tests/llama_cpp/build.sh"))
        .expect("tests/llama_cpp/build.sh");
    script
        .lines()
        .find_map(|l| l.strip_prefix("VERSION="))
        .expect("VERSION= in build.sh")
        .trim()
        .to_owned()
}

/// Where `build.sh` puts llama.cpp (`VLMPIPE_LLAMA_CPP_CACHE`, or `~/.cache/vlmpipe/…`).
pub fn llama_cpp_cache() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(dir) = std::env::var_os("VLMPIPE_LLAMA_CPP_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(format!(".cache/vlmpipe/llama.cpp-{}", llama_cpp_version()))
}

/// Writes a random-weight checkpoint (bf16, like the Hub's) with the real LFM2-VL-450M file set
/// `real` into `out`: at the real shapes, or narrow ([`narrow_450m_config`]) with
/// `narrow_vision_layers` vision layers.
pub fn random_450m_checkpoint(
    real: &std::path::Path,
    out: &std::path::Path,
    narrow_vision_layers: Option<usize>,
    seed: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let source = tempfile::tempdir()?;
    for entry in std::fs::read_dir(real)? {
        let entry = entry?;
        std::fs::copy(entry.path(), source.path().join(entry.file_name()))?;
    }
    if let Some(layers) = narrow_vision_layers {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(real.join("config.json"))?)?;
        let path = source.path().join("config.json");
        let mut perms = std::fs::metadata(&path)?.permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&path, perms)?;
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&narrow_450m_config(&config, layers))?,
        )?;
    }
    vlmpipe::model::random_checkpoint::write_random_checkpoint(
        source.path(),
        out,
        candle_core::DType::BF16,
        seed,
    )?;
    Ok(())
}
