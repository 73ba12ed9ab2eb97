"""Writes the tiny LFM2-VL checkpoints and the synthetic input images (run with transformers 4.57.6).

4.57.6 is used because its `save_pretrained` writes the Hugging Face Hub layout that the real
LiquidAI checkpoints have (`model.vision_tower.vision_model.*`, flat processor config, no lm_head);
5.x writes a different layout. References are computed from these files by compute_references.py.

Usage: .venv-457/bin/python tests/reference/make_checkpoints.py
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import common
from common import CHECKPOINT_SPECS, CHECKPOINTS, write_json


def scaled_init(model, seed: int) -> None:
    """Re-initialises every parameter with unit-scale statistics.

    transformers' default init (std 0.02) leaves a random model with near-tied logits that repeats
    one token, which hides cache bugs; with these scales the greedy output varies and the top-1
    margins are large enough for an f32 port to reproduce the tokens exactly.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith("conv.conv.weight"):
                # Depthwise kernel [C, 1, L]: fan-in is the kernel length.
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                # Norm weights: near one, but not one, so a port that drops them fails.
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))


def build_config(spec: dict):
    from transformers import Lfm2VlConfig

    vision = dict(
        model_type="siglip2_vision_model",
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        num_channels=3,
        patch_size=16,
        attention_dropout=0.0,
        vision_use_head=False,
    )
    vision.update(spec["vision"])
    text = dict(
        model_type="lfm2",
        num_hidden_layers=len(spec["text"]["layer_types"]),
        conv_L_cache=3,
        conv_bias=False,
        norm_eps=1e-5,
        max_position_embeddings=128000,
        block_ffn_dim_multiplier=1.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=7,
        pad_token_id=0,
        **spec["text"],
    )
    return Lfm2VlConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=396,
        projector_hidden_size=spec["projector_hidden_size"],
        projector_hidden_act="gelu",
        projector_bias=True,
        downsample_factor=spec["processor"]["downsample_factor"],
        projector_use_layernorm=spec.get("projector_use_layernorm", True),
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=7,
        pad_token_id=0,
    )


def build_processor(spec: dict, tokenizer_dir: Path):
    from transformers import AutoTokenizer, Lfm2VlImageProcessorFast, Lfm2VlProcessor

    p = spec["processor"]
    image_processor = Lfm2VlImageProcessorFast(
        downsample_factor=p["downsample_factor"],
        do_image_splitting=p["do_image_splitting"],
        min_tiles=p["min_tiles"],
        max_tiles=p["max_tiles"],
        use_thumbnail=p["use_thumbnail"],
        min_image_tokens=p["min_image_tokens"],
        max_image_tokens=p["max_image_tokens"],
        encoder_patch_size=p["encoder_patch_size"],
        tile_size=p["tile_size"],
        max_pixels_tolerance=p["max_pixels_tolerance"],
        max_num_patches=p["max_num_patches"],
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return Lfm2VlProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=common.CHAT_TEMPLATE)


def save_synthetic_tokenizer(dst: Path) -> None:
    """The synthetic BPE as a PreTrainedTokenizerFast with LFM2-VL's special-token attributes."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=common.build_synthetic_tokenizer(),
        bos_token="<|startoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        model_max_length=128000,
        clean_up_tokenization_spaces=False,
        extra_special_tokens={
            "image_token": "<image>",
            "image_start_token": "<|image_start|>",
            "image_end_token": "<|image_end|>",
            "image_thumbnail": "<|img_thumbnail|>",
        },
    )
    tok.save_pretrained(dst)


def make_checkpoint(name: str, spec: dict) -> Path:
    import torch
    from transformers import Lfm2VlForConditionalGeneration

    torch.manual_seed(spec["seed"])
    dst = CHECKPOINTS / name
    if dst.exists():
        for f in dst.iterdir():
            f.unlink()
    dst.mkdir(parents=True, exist_ok=True)

    model = Lfm2VlForConditionalGeneration(build_config(spec)).eval()
    if not spec.get("projector_use_layernorm", True):
        # 4.57.6 always builds the projector LayerNorm; a checkpoint without one has no weights.
        del model.model.multi_modal_projector.layer_norm
    scaled_init(model, spec["seed"])
    model.save_pretrained(dst, safe_serialization=True)

    if spec["tokenizer"] == "synthetic":
        with tempfile.TemporaryDirectory() as tmp:
            save_synthetic_tokenizer(Path(tmp))
            build_processor(spec, Path(tmp)).save_pretrained(dst)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n_params} parameters -> {dst}")
    return dst


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="checkpoints to (re)make; all, with the images, by default")
    args = parser.parse_args()
    common.setup_torch()
    common.check_special_tokens_against_real()
    if not args.names:
        images = common.make_images()
        print(f"{len(images)} images -> {common.IMAGES}")
    for name, spec in CHECKPOINT_SPECS.items():
        if not args.names or name in args.names:
            make_checkpoint(name, spec)
    write_json(CHECKPOINTS / "specs.json", CHECKPOINT_SPECS)


if __name__ == "__main__":
    main()
