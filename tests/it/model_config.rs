//! The real LFM2-VL-450M `config.json` (transformers 4.55 spelling) resolves to the right sizes.

use crate::support::shared_path;
use candle_core::DType;
use vlmpipe::model::config::{Activation, Config, LayerKind};

#[test]
fn lfm2_vl_450m_config() {
    let Some(path) = shared_path("models/LFM2-VL-450M/config.json") else {
        return;
    };
    let cfg = Config::from_json(&std::fs::read_to_string(path).unwrap()).unwrap();
    // `image_token_index` spelling, `lfm2-vl` model type, bf16 `torch_dtype`.
    assert_eq!(cfg.image_token_id, 396);
    assert_eq!(cfg.checkpoint_dtype, Some(DType::BF16));
    // block_ff_dim 6656 with auto-adjust -> 4608.
    assert_eq!(cfg.text.ffn_dim, 4608);
    assert_eq!(cfg.text.hidden_size, 1024);
    assert_eq!(cfg.text.num_heads, 16);
    assert_eq!(cfg.text.num_kv_heads, 8);
    assert_eq!(cfg.text.head_dim, 64);
    assert_eq!(cfg.text.vocab_size, 65536);
    assert_eq!(cfg.text.conv_kernel, 3);
    assert_eq!(cfg.text.eos_token_ids, vec![7]);
    assert_eq!(cfg.text.rope_theta, 1_000_000.0);
    let attn: Vec<usize> = cfg
        .text
        .layer_kinds
        .iter()
        .enumerate()
        .filter(|(_, k)| **k == LayerKind::Attention)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(attn, vec![2, 5, 8, 10, 12, 14]);
    assert_eq!(cfg.vision.hidden_size, 768);
    assert_eq!(cfg.vision.num_layers, 12);
    assert_eq!(cfg.vision.num_heads, 12);
    assert_eq!(cfg.vision.patch_dim(), 768);
    assert_eq!(cfg.vision.position_grid, 16);
    assert_eq!(cfg.vision.act, Activation::GeluTanh);
    assert_eq!(cfg.projector.in_dim, 3072);
    assert_eq!(cfg.projector.hidden_size, 2560);
    assert_eq!(cfg.projector.out_dim, 1024);
    assert_eq!(cfg.projector.act, Activation::GeluErf);
    assert_eq!(cfg.projector.layer_norm_eps, 1e-5);
}

#[test]
fn tiny_reference_config() {
    let Some(path) = shared_path("reference/tiny-lfm2vl/config.json") else {
        return;
    };
    let cfg = Config::from_json(&std::fs::read_to_string(path).unwrap()).unwrap();
    // `lfm2_vl` model type, `dtype` key, FFN 200 -> 160.
    assert_eq!(cfg.checkpoint_dtype, Some(DType::F32));
    assert_eq!(cfg.text.ffn_dim, 160);
    assert_eq!(cfg.text.head_dim, 16);
}
