//! GGUF in: one file's header, metadata and tensors, checked before anything long starts, and
//! the `<name>-<QUANT>.gguf` + `mmproj-<name>-<QUANT>.gguf` pair a folder holds.
//!
//! The parsing is candle's (`candle_core::quantized::gguf_file`); this module adds what a user
//! needs when a file is wrong: every tensor's bytes must lie inside the file (a truncated
//! download fails at open, naming the tensor, not half-way through loading), every quantized
//! tensor's rows must be whole blocks of its type, and the architecture must be the one asked
//! for. Model building from the pair is `crate::model::load::gguf`.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::{GgmlDType, QTensor};

/// The file-type names llama.cpp writes into GGUF file names (`convert_hf_to_gguf.py --outtype`
/// and `llama-quantize`), whose tensor types candle can read: what `gguf(..., quant: …)` takes.
pub(crate) const IMPORT_QUANTS: &[&str] = &[
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M",
    "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
];

/// Why a GGUF file or pair cannot be used; each names the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum GgufReadError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is not a readable GGUF file: {message} (a truncated or partial download?)")]
    Header { path: PathBuf, message: String },
    #[error(
        "`{path}` is truncated: tensor `{tensor}` needs bytes up to {needs}, the file has {has} \
         (download it again)"
    )]
    Truncated {
        path: PathBuf,
        tensor: String,
        needs: u64,
        has: u64,
    },
    #[error(
        "`{path}`: tensor `{tensor}` is {dtype} with rows of {row} values, not whole blocks of \
         {block}; no GGUF writer makes such a tensor (the file is damaged or was written wrongly)"
    )]
    RowWidth {
        path: PathBuf,
        tensor: String,
        dtype: &'static str,
        row: usize,
        block: usize,
    },
    #[error("`{path}` is a `{found}` GGUF; {expected}")]
    Architecture {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("`{path}` has no `{key}` ({hint})")]
    MissingKey {
        path: PathBuf,
        key: String,
        hint: &'static str,
    },
    #[error("`{path}`: `{key}` {message}")]
    BadKey {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("`{path}` has no tensor `{tensor}`{hint}")]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        hint: String,
    },
    #[error(
        "`{mmproj}` does not fit `{text}`: {mismatch} (use the mmproj published with this text \
         model, or export both from one checkpoint)"
    )]
    Mismatch {
        text: PathBuf,
        mmproj: PathBuf,
        mismatch: String,
    },
    #[error("{message} in `{dir}`{hint}")]
    Pair {
        dir: PathBuf,
        message: String,
        hint: String,
    },
    #[error("`{path}`: {message}")]
    Tensor { path: PathBuf, message: String },
}

/// One open GGUF file: its metadata and tensor table, the tensors read on demand.
pub struct GgufIn {
    path: PathBuf,
    content: Content,
    reader: Mutex<BufReader<File>>,
}

impl std::fmt::Debug for GgufIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufIn").field("path", &self.path).finish()
    }
}

impl GgufIn {
    /// Reads the header, metadata and tensor table, and checks that every tensor lies inside
    /// the file in whole blocks (reading no tensor data).
    pub fn open(path: &Path) -> Result<Self, GgufReadError> {
        let io = |source| GgufReadError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| GgufReadError::Header {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut infos: Vec<(&String, &TensorInfo)> = content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        for (name, info) in infos {
            let dtype = info.ggml_dtype;
            let row = info.shape.dims().last().copied().unwrap_or(1);
            if !row.is_multiple_of(dtype.block_size()) {
                return Err(GgufReadError::RowWidth {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    dtype: crate::model::quant::ggml_name(dtype),
                    row,
                    block: dtype.block_size(),
                });
            }
            let bytes = (info.shape.elem_count() / dtype.block_size() * dtype.type_size()) as u64;
            let end = content.tensor_data_offset + info.offset + bytes;
            if end > len {
                return Err(GgufReadError::Truncated {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    needs: end,
                    has: len,
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader: Mutex::new(reader),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `general.architecture`.
    pub(crate) fn architecture(&self) -> &str {
        self.content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .map_or("unknown", String::as_str)
    }

    /// Refuses a file whose architecture is not `arch`; `expected` says what was wanted.
    pub(crate) fn expect_architecture(
        &self,
        arch: &str,
        expected: &str,
    ) -> Result<(), GgufReadError> {
        if self.architecture() == arch {
            return Ok(());
        }
        Err(GgufReadError::Architecture {
            path: self.path.clone(),
            found: self.architecture().to_owned(),
            expected: expected.to_owned(),
        })
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn missing(&self, key: &str, hint: &'static str) -> GgufReadError {
        GgufReadError::MissingKey {
            path: self.path.clone(),
            key: key.to_owned(),
            hint,
        }
    }

    fn bad(&self, key: &str, message: impl Into<String>) -> GgufReadError {
        GgufReadError::BadKey {
            path: self.path.clone(),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    /// An unsigned integer key of any width.
    pub(crate) fn u64_opt(&self, key: &str) -> Result<Option<u64>, GgufReadError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(n) => u64::from(*n),
            Value::U16(n) => u64::from(*n),
            Value::U32(n) => u64::from(*n),
            Value::U64(n) => *n,
            Value::I8(n) if *n >= 0 => *n as u64,
            Value::I16(n) if *n >= 0 => *n as u64,
            Value::I32(n) if *n >= 0 => *n as u64,
            Value::I64(n) if *n >= 0 => *n as u64,
            other => return Err(self.bad(key, format!("is {other:?}, not a count"))),
        };
        Ok(Some(n))
    }

    pub(crate) fn usize(&self, key: &str, hint: &'static str) -> Result<usize, GgufReadError> {
        self.u64_opt(key)?
            .map(|n| n as usize)
            .ok_or_else(|| self.missing(key, hint))
    }

    /// A float key, returned as the shortest decimal that reads back as the stored f32 (so
    /// `1e-5` stored as f32 comes back as the config's `1e-5`, not `9.99999974738e-06`).
    pub(crate) fn f64_opt(&self, key: &str) -> Result<Option<f64>, GgufReadError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(shortest_f64(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(other) => Err(self.bad(key, format!("is {other:?}, not a number"))),
        }
    }

    pub(crate) fn bool_opt(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.to_bool().ok())
    }

    pub(crate) fn string_opt(&self, key: &str) -> Result<Option<&str>, GgufReadError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.bad(key, format!("is {other:?}, not a string"))),
        }
    }

    pub(crate) fn array(&self, key: &str, hint: &'static str) -> Result<&[Value], GgufReadError> {
        match self.get(key) {
            None => Err(self.missing(key, hint)),
            Some(Value::Array(items)) => Ok(items),
            Some(other) => Err(self.bad(key, format!("is {other:?}, not an array"))),
        }
    }

    /// Strings of an array key.
    pub(crate) fn strings(
        &self,
        key: &str,
        hint: &'static str,
    ) -> Result<Vec<&str>, GgufReadError> {
        self.array(key, hint)?
            .iter()
            .map(|v| {
                v.to_string()
                    .map(String::as_str)
                    .map_err(|_| self.bad(key, "holds a value that is not a string"))
            })
            .collect()
    }

    /// Floats of an array key.
    pub(crate) fn floats(&self, key: &str, hint: &'static str) -> Result<Vec<f64>, GgufReadError> {
        self.array(key, hint)?
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(shortest_f64(*x)),
                Value::F64(x) => Ok(*x),
                _ => Err(self.bad(key, "holds a value that is not a number")),
            })
            .collect()
    }

    /// Integers of an array key (any integer type).
    pub(crate) fn ints(&self, key: &str, hint: &'static str) -> Result<Vec<i64>, GgufReadError> {
        self.array(key, hint)?
            .iter()
            .map(|v| match v {
                Value::U8(n) => Ok(i64::from(*n)),
                Value::I8(n) => Ok(i64::from(*n)),
                Value::U16(n) => Ok(i64::from(*n)),
                Value::I16(n) => Ok(i64::from(*n)),
                Value::U32(n) => Ok(i64::from(*n)),
                Value::I32(n) => Ok(i64::from(*n)),
                Value::I64(n) => Ok(*n),
                Value::U64(n) => Ok(*n as i64),
                _ => Err(self.bad(key, "holds a value that is not an integer")),
            })
            .collect()
    }

    pub(crate) fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Type and dims of `name`.
    pub(crate) fn tensor_info(&self, name: &str) -> Option<(GgmlDType, &[usize])> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| (i.ggml_dtype, i.shape.dims()))
    }

    /// Reads tensor `name` (its blocks as stored) onto `device`.
    /// The tensor table: name → (type, dims in candle's order, outermost first).
    pub fn tensor_infos(&self) -> std::collections::BTreeMap<&str, (GgmlDType, &[usize])> {
        self.content
            .tensor_infos
            .iter()
            .map(|(n, i)| (n.as_str(), (i.ggml_dtype, i.shape.dims())))
            .collect()
    }

    pub fn tensor(&self, name: &str, device: &Device) -> Result<QTensor, GgufReadError> {
        if !self.has_tensor(name) {
            return Err(GgufReadError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_owned(),
                hint: String::new(),
            });
        }
        let mut reader = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.content
            .tensor(&mut *reader, name, device)
            .map_err(|e| GgufReadError::Tensor {
                path: self.path.clone(),
                message: format!("tensor `{name}`: {e}"),
            })
    }
}

/// `x` as the f64 of its shortest round-tripping decimal.
fn shortest_f64(x: f32) -> f64 {
    format!("{x}").parse().unwrap_or(f64::from(x))
}

/// A text GGUF and the mmproj that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufPair {
    pub text: PathBuf,
    pub mmproj: PathBuf,
}

/// The quant part of a GGUF file name (`LFM2-VL-450M-Q8_0.gguf` → `Q8_0`), upper-cased, when
/// the name ends in one of [`IMPORT_QUANTS`].
pub(crate) fn quant_of_file_name(name: &str) -> Option<&'static str> {
    let stem = name.strip_suffix(".gguf")?.to_ascii_uppercase();
    IMPORT_QUANTS
        .iter()
        .copied()
        .filter(|q| stem.ends_with(&format!("-{q}")) || stem.ends_with(&format!(".{q}")))
        .max_by_key(|q| q.len())
}

/// Whether `dir` holds `.gguf` files (and so is a GGUF folder, not a Hub-layout checkpoint).
pub(crate) fn has_gguf_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".gguf"))
    })
}

/// The `.gguf` files of `dir`: text models and mmprojs, each sorted by name.
fn list_gguf(dir: &Path) -> Result<(Vec<String>, Vec<String>), GgufReadError> {
    let entries = std::fs::read_dir(dir).map_err(|source| GgufReadError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    Ok(split_gguf(&names))
}

/// `names` (file names or repo paths) split into text GGUFs and mmprojs, each sorted; other
/// files and files in subfolders are left out.
fn split_gguf(names: &[String]) -> (Vec<String>, Vec<String>) {
    let mut texts = Vec::new();
    let mut mmprojs = Vec::new();
    for name in names {
        let lower = name.to_ascii_lowercase();
        if !lower.ends_with(".gguf") || name.contains('/') {
            continue;
        }
        if lower.starts_with("mmproj") {
            mmprojs.push(name.clone());
        } else {
            texts.push(name.clone());
        }
    }
    texts.sort();
    mmprojs.sort();
    (texts, mmprojs)
}

fn listed(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn quants(names: &[String]) -> String {
    names
        .iter()
        .filter_map(|n| quant_of_file_name(n))
        .collect::<Vec<_>>()
        .join(", ")
}

fn pair_err(dir: &Path, message: String, hint: String) -> GgufReadError {
    GgufReadError::Pair {
        dir: dir.to_path_buf(),
        message,
        hint,
    }
}

/// The one file of `names` whose quant is `want`.
fn pick(dir: &Path, names: &[String], want: &str, what: &str) -> Result<String, GgufReadError> {
    let want = want.trim().to_ascii_uppercase();
    let hits: Vec<String> = names
        .iter()
        .filter(|n| quant_of_file_name(n) == Some(want.as_str()))
        .cloned()
        .collect();
    match hits.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(pair_err(
            dir,
            format!("no {what} GGUF of quant `{want}`"),
            format!(
                "; the {what} files here are {} (quants: {})",
                listed(names),
                quants(names)
            ),
        )),
        many => Err(pair_err(
            dir,
            format!("several {what} GGUF files of quant `{want}`"),
            format!(": {}", listed(many)),
        )),
    }
}

/// The mmproj of `dir`: the one asked for, the only one, else the F16 one.
fn pick_mmproj(
    dir: &Path,
    mmprojs: &[String],
    mmproj: Option<&str>,
) -> Result<String, GgufReadError> {
    match (mmproj, mmprojs) {
        (_, []) => Err(pair_err(
            dir,
            "no mmproj GGUF (`mmproj-<name>-<QUANT>.gguf`, the vision tower and projector)"
                .to_owned(),
            "; an LFM2-VL GGUF model is a pair of files, as llama.cpp's convert_hf_to_gguf.py \
             (and with --mmproj) or `vlmpipe export --gguf` writes them"
                .to_owned(),
        )),
        (Some(q), _) => pick(dir, mmprojs, q, "mmproj"),
        (None, [one]) => Ok(one.clone()),
        (None, many) => pick(dir, many, "F16", "mmproj").map_err(|_| {
            pair_err(
                dir,
                format!("several mmproj GGUF files ({})", listed(many)),
                "; say which one to load (`mmproj: \"Q8_0\"` in a pipeline's gguf(...))".to_owned(),
            )
        }),
    }
}

/// Which pair of the files in `dir` to load.
///
/// `quant` picks the text file by its name's quant (`Q8_0`, case-insensitive); without it the
/// folder must hold exactly one text GGUF. `mmproj` picks the mmproj the same way; without it
/// the folder's only mmproj, else its F16 one (what LiquidAI and the converter publish).
pub fn find_pair(
    dir: &Path,
    quant: Option<&str>,
    mmproj: Option<&str>,
) -> Result<GgufPair, GgufReadError> {
    let (texts, mmprojs) = list_gguf(dir)?;
    let (text, mmproj) = choose(dir, &texts, &mmprojs, quant, mmproj)?;
    Ok(GgufPair {
        text: dir.join(text),
        mmproj: dir.join(mmproj),
    })
}

/// [`find_pair`] over the file names of a listing (a Hub repo's); `place` names it in errors.
pub(crate) fn choose_pair(
    place: &Path,
    names: &[String],
    quant: Option<&str>,
    mmproj: Option<&str>,
) -> Result<(String, String), GgufReadError> {
    let (texts, mmprojs) = split_gguf(names);
    choose(place, &texts, &mmprojs, quant, mmproj)
}

fn choose(
    dir: &Path,
    texts: &[String],
    mmprojs: &[String],
    quant: Option<&str>,
    mmproj: Option<&str>,
) -> Result<(String, String), GgufReadError> {
    let text = match (quant, texts) {
        (_, []) => {
            return Err(pair_err(
                dir,
                "no text-model GGUF (`<name>-<QUANT>.gguf`)".to_owned(),
                "; an LFM2-VL GGUF model is a pair of files, as llama.cpp's \
                 convert_hf_to_gguf.py (and with --mmproj) or `vlmpipe export --gguf` writes them"
                    .to_owned(),
            ));
        }
        (Some(q), _) => pick(dir, texts, q, "text")?,
        (None, [one]) => one.clone(),
        (None, many) => {
            return Err(pair_err(
                dir,
                format!("several text GGUF files ({})", listed(many)),
                format!(
                    "; say which quant to load (`gguf(\"DIR\", quant: \"Q8_0\")` in a pipeline, \
                     or give the `.gguf` file itself as `--model`); quants here: {}",
                    quants(many)
                ),
            ));
        }
    };
    let mmproj = pick_mmproj(dir, mmprojs, mmproj)?;
    Ok((text, mmproj))
}

/// The pair for a text `.gguf` file given directly: the file and the mmproj beside it.
pub(crate) fn pair_for_text_file(
    path: &Path,
    mmproj: Option<&str>,
) -> Result<GgufPair, GgufReadError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.to_ascii_lowercase().starts_with("mmproj") {
        return Err(pair_err(
            dir,
            format!("`{name}` is an mmproj, not a text model"),
            "; give the text-model GGUF (its mmproj is found beside it)".to_owned(),
        ));
    }
    let (_, mmprojs) = list_gguf(dir)?;
    let mmproj = pick_mmproj(dir, &mmprojs, mmproj)?;
    Ok(GgufPair {
        text: path.to_path_buf(),
        mmproj: dir.join(mmproj),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quants_come_from_file_names() {
        assert_eq!(quant_of_file_name("LFM2-VL-450M-Q8_0.gguf"), Some("Q8_0"));
        assert_eq!(
            quant_of_file_name("mmproj-LFM2-VL-450M-F16.gguf"),
            Some("F16")
        );
        assert_eq!(quant_of_file_name("x-q4_k_m.gguf"), Some("Q4_K_M"));
        assert_eq!(quant_of_file_name("x-BF16.gguf"), Some("BF16"));
        assert_eq!(quant_of_file_name("model.gguf"), None);
    }

    #[test]
    fn floats_come_back_as_their_shortest_decimal() {
        assert_eq!(shortest_f64(1e-5), 1e-5);
        assert_eq!(shortest_f64(1e6), 1e6);
        assert_eq!(shortest_f64(0.5), 0.5);
    }
}
