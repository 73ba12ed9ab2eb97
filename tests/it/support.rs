//! Helpers shared by several test modules.

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
