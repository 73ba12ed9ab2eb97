//! Typed parameters of each node kind: what the executor and stages consume.
//!
//! Stages never see syntax: every value here is checked, defaulted and resolved (references are
//! node ids, label sets carry their values, local paths are resolved against the pipeline file).
//! Serialisation is the basis of [`crate::plan::Node::canonical_params`], so it names references
//! by their declared name and local paths as written, never machine-specific absolute paths.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Serialize, Serializer};
use serde_json::{Value, json};

use crate::plan::NodeId;

/// A reference to another node of the plan (serialised as the node's name).
#[derive(Clone, Debug, PartialEq)]
pub struct NodeRef {
    pub id: NodeId,
    pub name: String,
}

impl Serialize for NodeRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

/// A table-valued input: a dataset, sample or shuffle node, or one member of a split node.
#[derive(Clone, Debug, PartialEq)]
pub struct DataRef {
    pub node: NodeRef,
    /// `Some("train")` for `pets_split.train`; `None` for nodes with a single output.
    pub member: Option<String>,
}

impl DataRef {
    /// `pets_split.train` or `pets`.
    pub fn display_name(&self) -> String {
        match &self.member {
            Some(m) => format!("{}.{m}", self.node.name),
            None => self.node.name.clone(),
        }
    }
}

impl Serialize for DataRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.display_name())
    }
}

/// A path in the pipeline file, relative to that file; `resolved` is where it lies on this machine.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LocalPath {
    pub path: String,
    #[serde(skip)]
    pub resolved: PathBuf,
}

/// A scalar value of a `param`, a `--set` override or a free-form option.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl ParamValue {
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            ParamValue::Bool(_) => "a boolean",
            ParamValue::Int(_) => "an integer",
            ParamValue::Float(_) => "a number",
            ParamValue::Str(_) => "a string",
        }
    }
}

impl std::fmt::Display for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamValue::Bool(b) => write!(f, "{b}"),
            ParamValue::Int(i) => write!(f, "{i}"),
            ParamValue::Float(x) => write!(f, "{x}"),
            ParamValue::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// The label set an eval or fine-tune uses (the same list drives grammar, parsing and metrics).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LabelSet {
    pub node: NodeRef,
    pub values: Vec<String>,
}

/// Per-kind parameters.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeParams {
    Labels(LabelsParams),
    Dataset(DatasetParams),
    Split(SplitParams),
    Sample(SampleParams),
    Shuffle(ShuffleParams),
    Prompt(PromptParams),
    Model(ModelParams),
    Grammar(GrammarParams),
    Eval(EvalParams),
    Finetune(FinetuneParams),
    Export(ExportParams),
    Report(ReportParams),
}

/// `labels NAME = [...]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LabelsParams {
    pub values: Vec<String>,
}

/// `dataset NAME { ... }`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DatasetParams {
    pub source: DataSource,
    /// Column holding the image (Hub image struct, bytes or a path, depending on the source).
    pub image: String,
    pub label: LabelSpec,
    /// The label list the dataset's labels are checked against, when declared.
    pub labels: Option<LabelSet>,
    pub keep: KeepFilter,
    /// Images with a side larger than this are dropped (recorded, not silently lost).
    pub max_image_size: Option<u32>,
    /// Images declaring more pixels than this are never decoded: their samples are error rows
    /// (default: PIL's `MAX_IMAGE_PIXELS`, 89,478,485). Left out of the canonical form when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_image_pixels: Option<u64>,
    /// Row ids to drop (e.g. a known-bad sample).
    pub drop: Vec<String>,
    /// `shards = N`: check the images in N shards. An execution setting, so not serialised: it
    /// is not part of the stage's fingerprint (the merged entry equals an unsharded ingest's).
    #[serde(skip)]
    pub shards: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DataSource {
    /// The Parquet files of a Hugging Face dataset repo.
    Hf {
        repo: String,
        split: String,
        revision: Option<String>,
        config: Option<String>,
    },
    Parquet {
        path: LocalPath,
    },
    /// One sub-folder per class.
    Folder {
        path: LocalPath,
    },
    Csv {
        path: LocalPath,
    },
    Jsonl {
        path: LocalPath,
    },
    /// A dataset vlmpipe generates itself (seeded); `options` are kind-specific scalars.
    Synthetic {
        kind: String,
        n: u64,
        seed: u64,
        options: BTreeMap<String, ParamValue>,
    },
}

impl DataSource {}

/// Where the label comes from: a column, optionally mapped (`"labels" -> { 0: "cat" }`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LabelSpec {
    pub column: String,
    /// Sorted by key; `None` when the column already holds label strings.
    pub mapping: Option<Vec<LabelMapEntry>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LabelMapEntry {
    pub key: MapKey,
    pub label: String,
}

/// A column value in a label mapping.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(untagged)]
pub enum MapKey {
    Int(i64),
    Str(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepFilter {
    All,
    /// Only images whose decoded mode is RGB (drops greyscale, RGBA, CMYK).
    RgbOnly,
}

/// `split NAME = stratified(data, train: 0.9, test: 0.1, seed: 42)`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SplitParams {
    pub source: DataRef,
    pub method: SplitMethod,
    /// Member name (`train`, `test`, `validation`) → fraction; they sum to 1.
    pub ratios: BTreeMap<String, f64>,
    pub seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitMethod {
    /// Each label keeps its share in every member.
    Stratified,
    Random,
}

/// `sample(data, n, seed: s)`: `n` rows after a seeded shuffle.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SampleParams {
    pub source: DataRef,
    pub n: u64,
    pub seed: u64,
}

/// `shuffle(data, seed: s)`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShuffleParams {
    pub source: DataRef,
    pub seed: u64,
}

/// `prompt NAME { system = ...; user = ... }`: minijinja templates, compiled at check time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptParams {
    pub system: Option<String>,
    pub user: String,
}

/// `model NAME = hf(...) | local(...) | gguf(...) | init(...)`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelParams {
    pub source: ModelSource,
    pub dtype: Dtype,
    /// A PEFT LoRA adapter applied on top (`adapter:` of `hf(...)`/`local(...)`); left out of the
    /// canonical parameters when absent, so models without one keep their fingerprints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterSource>,
}

/// Where an `adapter:` comes from: a folder (relative to the pipeline file) or a Hub repo.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AdapterSource {
    Hf { repo: String, revision: String },
    Local { path: LocalPath },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ModelSource {
    Hf {
        repo: String,
        revision: String,
    },
    Local {
        path: LocalPath,
    },
    /// A GGUF pair (`<name>-<QUANT>.gguf` + `mmproj-….gguf`, llama.cpp's files) from a Hub repo
    /// (`repo`, `revision`) or a local folder (`path`); `quant` picks the text file, `mmproj`
    /// the mmproj (both upper-case names of [`crate::gguf::read::IMPORT_QUANTS`]).
    Gguf {
        #[serde(skip_serializing_if = "Option::is_none")]
        repo: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        revision: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        path: Option<LocalPath>,
        #[serde(skip_serializing_if = "Option::is_none")]
        quant: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        mmproj: Option<String>,
    },
    /// A model initialised by vlmpipe from a named size preset (random weights, seeded).
    Init {
        preset: String,
        seed: u64,
    },
}

/// The presets `init(preset: ...)` knows (the model stage's `Preset`), checked at check time.
pub const MODEL_PRESETS: &[&str] = &["tiny"];

/// The kinds `synthetic(kind: ...)` knows, and the shapes its `shapes:` option may list.
pub(crate) const SYNTHETIC_KINDS: &[&str] = &["shapes"];
pub(crate) const SYNTHETIC_SHAPES: &[&str] = &["circle", "square", "triangle"];

pub use crate::dtype::Dtype;

/// `grammar NAME = ...`: the constraint on a model's answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GrammarParams {
    pub spec: GrammarSpec,
    pub whitespace: Whitespace,
}

impl GrammarParams {
    /// The decoder's form of the grammar: what `decode` compiles into token masks (the one
    /// conversion, used by the checker's compile check and by lowering).
    pub(crate) fn decode_spec(&self) -> crate::decode::GrammarSpec {
        use crate::decode::{GrammarSpec as Decode, Whitespace as DecodeWhitespace};
        let whitespace = match self.whitespace {
            Whitespace::Flexible => DecodeWhitespace::Flexible,
            Whitespace::Compact => DecodeWhitespace::Compact,
        };
        match &self.spec {
            GrammarSpec::OneOf { values, .. } => Decode::Choice {
                labels: values.clone(),
            },
            GrammarSpec::Json { schema } => Decode::Json {
                schema: schema.to_json_schema(),
                whitespace,
            },
            GrammarSpec::JsonSchema { schema, .. } => Decode::Json {
                schema: schema.clone(),
                whitespace,
            },
            GrammarSpec::Regex { pattern } => Decode::Regex(pattern.clone()),
            GrammarSpec::Lark { grammar } => Decode::Lark(grammar.clone()),
        }
    }
}

/// Whether JSON output may contain blanks between tokens (`{"a": 1}`) or must be compact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Whitespace {
    Flexible,
    Compact,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GrammarSpec {
    /// The whole answer is one of the labels.
    OneOf {
        labels: Option<NodeRef>,
        values: Vec<String>,
    },
    /// A JSON value of the given type (usually an object).
    Json {
        schema: JsonType,
    },
    Regex {
        pattern: String,
    },
    /// A raw JSON Schema, inline or read from `file` at check time.
    JsonSchema {
        schema: Value,
        file: Option<LocalPath>,
    },
    /// A context-free grammar in Lark syntax.
    Lark {
        grammar: String,
    },
}

/// A type in a `json { ... }` grammar.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JsonType {
    Object {
        fields: Vec<JsonField>,
    },
    Array {
        items: Box<JsonType>,
        min_items: Option<u64>,
        max_items: Option<u64>,
    },
    String {
        max_len: Option<u64>,
        pattern: Option<String>,
    },
    Integer {
        min: Option<i64>,
        max: Option<i64>,
    },
    Number {
        min: Option<f64>,
        max: Option<f64>,
    },
    Boolean,
    /// One of a label set (`one_of(animals)`) or of literal strings.
    Enum {
        labels: Option<NodeRef>,
        values: Vec<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JsonField {
    pub name: String,
    pub ty: JsonType,
    pub optional: bool,
}

impl JsonType {
    /// The equivalent JSON Schema (fields in declaration order, no extra properties allowed).
    pub fn to_json_schema(&self) -> Value {
        match self {
            JsonType::Object { fields } => {
                let mut properties = serde_json::Map::new();
                let mut required = Vec::new();
                for f in fields {
                    properties.insert(f.name.clone(), f.ty.to_json_schema());
                    if !f.optional {
                        required.push(Value::String(f.name.clone()));
                    }
                }
                json!({
                    "type": "object",
                    "properties": properties,
                    "required": required,
                    "additionalProperties": false,
                })
            }
            JsonType::Array {
                items,
                min_items,
                max_items,
            } => {
                let mut v = json!({ "type": "array", "items": items.to_json_schema() });
                insert_opt(&mut v, "minItems", min_items.map(Value::from));
                insert_opt(&mut v, "maxItems", max_items.map(Value::from));
                v
            }
            JsonType::String { max_len, pattern } => {
                let mut v = json!({ "type": "string" });
                insert_opt(&mut v, "maxLength", max_len.map(Value::from));
                insert_opt(&mut v, "pattern", pattern.clone().map(Value::from));
                v
            }
            JsonType::Integer { min, max } => {
                let mut v = json!({ "type": "integer" });
                insert_opt(&mut v, "minimum", min.map(Value::from));
                insert_opt(&mut v, "maximum", max.map(Value::from));
                v
            }
            JsonType::Number { min, max } => {
                let mut v = json!({ "type": "number" });
                insert_opt(&mut v, "minimum", min.map(Value::from));
                insert_opt(&mut v, "maximum", max.map(Value::from));
                v
            }
            JsonType::Boolean => json!({ "type": "boolean" }),
            JsonType::Enum { values, .. } => json!({ "enum": values }),
        }
    }
}

fn insert_opt(v: &mut Value, key: &str, value: Option<Value>) {
    if let (Some(obj), Some(value)) = (v.as_object_mut(), value) {
        obj.insert(key.to_owned(), value);
    }
}

/// `eval NAME { ... }`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalParams {
    /// A model or a fine-tune.
    pub model: NodeRef,
    pub data: DataRef,
    pub prompt: NodeRef,
    pub labels: LabelSet,
    /// The output grammar, if the answer is constrained.
    pub output: Option<NodeRef>,
    pub scoring: Scoring,
    pub max_new_tokens: u32,
    pub batch_size: u32,
    /// 0 means greedy.
    pub temperature: f64,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// The class whose recall is reported first (imbalanced data).
    pub positive_class: Option<String>,
    /// `shards = N`: compute the rows in N shards. An execution setting, so not serialised: it is
    /// not part of the stage's fingerprint (the merged output equals an unsharded run's).
    #[serde(skip)]
    pub shards: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// Decode an answer (constrained when `output` is set) and parse it.
    Generate,
    /// Score every label continuation exactly and normalise over the labels.
    Labels,
}

/// `finetune NAME { ... }`: LoRA training; the node yields a model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FinetuneParams {
    /// A model or another fine-tune.
    pub base: NodeRef,
    pub data: DataRef,
    pub eval_data: Option<DataRef>,
    pub prompt: NodeRef,
    pub labels: Option<LabelSet>,
    /// The answer format (the assistant turn is rendered to match it).
    pub output: Option<NodeRef>,
    pub lora: LoraParams,
    pub lr: f64,
    /// Passes over the training data; ignored when `max_steps` is set.
    pub epochs: u32,
    /// The exact number of optimizer steps (the data is cycled as needed); replaces `epochs`.
    pub max_steps: Option<u64>,
    pub batch_size: u32,
    pub grad_accum: u32,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
    pub max_grad_norm: f64,
    /// Evaluate on `eval_data` every N steps; it is always evaluated after the last step.
    pub eval_every: Option<u64>,
    /// Save a resumable checkpoint at least every N steps (never changes the result).
    pub checkpoint_every: u64,
    /// … and at least every this many minutes of training (never changes the result).
    pub checkpoint_minutes: f64,
    pub seed: u64,
    pub loss: LossOn,
}

/// Checkpoint at least every this many optimizer steps unless `checkpoint_every` says otherwise.
pub(crate) const DEFAULT_CHECKPOINT_EVERY: u64 = 50;
/// Checkpoint at least every this many minutes unless `checkpoint_minutes` says otherwise.
pub(crate) const DEFAULT_CHECKPOINT_MINUTES: f64 = 1.0;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoraParams {
    pub r: u32,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<String>,
    pub rslora: bool,
}

/// Module names of LFM2-VL's language model (and its vision tower and projector) that LoRA can
/// target; the default targets are every linear layer of the language model.
pub(crate) const LFM2_TEXT_TARGETS: &[&str] = &[
    "q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3",
];
pub(crate) const LFM2_VL_OTHER_TARGETS: &[&str] = &["fc1", "fc2", "linear_1", "linear_2"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// Which tokens the training loss covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossOn {
    Answer,
    All,
}

/// `export NAME { model = m  format = "gguf"  quant = "q8_0"  mmproj = "f16" }`: a model or a
/// fine-tune (its adapter merged in f32) written as files another runtime loads; the node yields
/// a model an eval can take.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExportParams {
    /// A model or a fine-tune.
    pub model: NodeRef,
    pub format: ExportFormat,
    /// The text model's type, as llama.cpp names it (`Q8_0`, `F16`: `crate::gguf::GgufQuant`).
    pub quant: String,
    /// The mmproj's type (the vision tower and projector).
    pub mmproj: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// llama.cpp's pair: `<name>-<QUANT>.gguf` and `mmproj-<name>-<QUANT>.gguf`.
    Gguf,
}

/// The formats `export` knows, checked at check time.
pub(crate) const EXPORT_FORMATS: &[&str] = &["gguf"];

/// `report NAME { compare = [a, b] }`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReportParams {
    pub compare: Vec<NodeRef>,
    pub title: Option<String>,
}
