"""Computes what transformers 5.x produces for the tiny checkpoints and writes the fixtures.

Two kinds of fixtures (see README.md for every tensor and key):
- model references `model/<case>.safetensors` + the processed views `model/<case>/view_NN.png`:
  the processor's outputs, the vision tower, projector, decoder, logits, greedy decoding and
  `generate`, for one prompt with one image on one checkpoint;
- processor references `processor/<image>.json` + `processor/<image>/view_NN.png`: the image
  processor and placeholder expansion alone, with the real LFM2-VL-450M settings, thumbnail on and off.

5.x, not 4.57: 4.57 swaps tile rows and columns in the prompt for non-square grids and expands a
single view to zero image tokens when the thumbnail is off.

Usage: .venv-5/bin/python tests/reference/compute_references.py [--only model|processor] [CASE ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

import common
from common import CHECKPOINTS, FIXTURES, IMAGES

PROMPT = "What is in this image?"
VET_SYSTEM = (
    "You are a veterinarian specialized in analyzing pictures of cats and dogs\n"
    "You excel at identifying the type of animal from a picture."
)
VET_USER = (
    "What animal in the following list is the one you see in the picture?\n- cat\n- dog\n\n"
    "Provide your answer as a single animal from the list without any additional text."
)

GREEDY_STEPS = 8
TOPK = 32  # greedy step logits of the 65536-entry vocabulary are stored as top-k only

# case -> (checkpoint, image, system text or None, user text)
MODEL_CASES: dict[str, tuple[str, str, str | None, str]] = {
    "thumb_tiny_40x30": ("tiny-thumb", "tiny_40x30", None, PROMPT),
    "thumb_photo_512x384": ("tiny-thumb", "photo_512x384", None, PROMPT),
    "thumb_wide_1500x500": ("tiny-thumb", "wide_1500x500", None, PROMPT),
    "thumb_strip_2000x60": ("tiny-thumb", "strip_2000x60", None, PROMPT),
    "thumb_gray_300x200": ("tiny-thumb", "gray_300x200", None, PROMPT),
    "thumb_system_333x251": ("tiny-thumb", "odd_333x251", VET_SYSTEM, VET_USER),
    "nothumb_tall_800x1400": ("tiny-nothumb", "tall_800x1400", None, PROMPT),
    "nothumb_photo_512x384": ("tiny-nothumb", "photo_512x384", None, PROMPT),
    "nothumb_tiny_40x30": ("tiny-nothumb", "tiny_40x30", None, PROMPT),
    "nothumb_alpha_200x150": ("tiny-nothumb", "alpha_200x150", None, PROMPT),
    "realtok_system_512x384": ("tiny-realtok", "photo_512x384", VET_SYSTEM, VET_USER),
    "realtok_wide_1500x500": ("tiny-realtok", "wide_1500x500", None, PROMPT),
    "thumb_eos_512x384": ("tiny-thumb", "photo_512x384", VET_SYSTEM, PROMPT),
    "variant_photo_512x384": ("tiny-variant", "photo_512x384", None, PROMPT),
    "variant_wide_1500x500": ("tiny-variant", "wide_1500x500", None, PROMPT),
}

# Random weights never pick the checkpoint's EOS, so these cases make `generate` stop at EOS by
# naming as EOS the greedy token of the given step (case -> step).
EOS_AT_STEP: dict[str, int] = {"thumb_eos_512x384": 3}

PROCESSOR_IMAGES = [
    "pixel_1x1",
    "thin_17x9",
    "tiny_40x30",
    "tallthin_100x333",
    "alpha_200x150",
    "gray_300x200",
    "odd_333x251",
    "square_400x400",
    "photo_512x384",
    "vga_640x480",
    "square_1000x1000",
    "wide_1500x500",
    "tall_800x1400",
    "hd_1920x1080",
    "strip_2000x60",
    "strip_60x2000",
]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def processor_settings(ckpt: Path) -> dict:
    """The Lfm2Vl image-processor settings a checkpoint declares.

    The real LFM2-VL-450M's preprocessor_config.json names `Siglip2ImageProcessor` (with do_resize
    false), and 5.x's AutoProcessor then builds that class, which neither tiles nor resizes like
    LFM2-VL; the LFM2-VL numbers live in processor_config.json. So read both, with the Lfm2Vl keys of
    processor_config.json winning, and build Lfm2VlImageProcessor explicitly.
    """
    keys = [
        "downsample_factor", "do_image_splitting", "min_tiles", "max_tiles", "use_thumbnail",
        "min_image_tokens", "max_image_tokens", "encoder_patch_size", "tile_size",
        "max_pixels_tolerance", "image_mean", "image_std", "rescale_factor", "resample",
    ]
    merged = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = ckpt / name
        if path.is_file():
            merged.update(json.loads(path.read_text()))
    return {k: merged[k] for k in keys if k in merged}


def load_processor(ckpt: Path):
    from transformers import AutoTokenizer, Lfm2VlImageProcessor, Lfm2VlProcessor

    image_processor = Lfm2VlImageProcessor(**processor_settings(ckpt))
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    template = (ckpt / "chat_template.jinja").read_text()
    return Lfm2VlProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def load_model(ckpt: Path, dtype=None):
    import torch
    from safetensors.torch import load_file
    from transformers import Lfm2VlForConditionalGeneration

    model = Lfm2VlForConditionalGeneration.from_pretrained(ckpt, dtype=dtype or torch.float32).eval()
    # 5.x renames Hub keys on load; prove every stored tensor landed where it belongs, since a
    # silently re-initialised weight would make every reference meaningless.
    params = dict(model.named_parameters())
    for key, value in load_file(ckpt / "model.safetensors").items():
        mapped = key.replace("model.vision_tower.vision_model.", "model.vision_tower.")
        assert mapped in params, f"{key} -> {mapped} not a parameter"
        assert torch.equal(params[mapped].detach().to(value.dtype), value), f"{key} differs after loading"
    return model


def messages_for(system: str | None, user: str) -> list[dict]:
    msgs = []
    if system is not None:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system}]})
    msgs.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]})
    return msgs


# ---------------------------------------------------------------------------------------------
# Views (the processor's resized uint8 images) as PNG
# ---------------------------------------------------------------------------------------------


def uint8_views(image_processor, image, kwargs: dict):
    """The processed views before rescale/normalise: patches [V, P, 768] as exact small integers,
    the mask and spatial shapes. Resizing happens on uint8 in torchvision, so these are the
    values that the normalised pixel_values come from."""
    raw = image_processor(
        [image], do_rescale=False, do_normalize=False, return_row_col_info=True, return_tensors="pt", **kwargs
    )
    patches = raw["pixel_values"].numpy()
    assert np.array_equal(patches, np.rint(patches)) and patches.min() >= 0 and patches.max() <= 255
    return raw, patches.astype(np.uint8)


def views_from_patches(patches_u8, spatial_shapes, patch: int) -> list[np.ndarray]:
    """Undoes the patchify: view v is [rows*patch, cols*patch, 3] from patches [v, :rows*cols, :]
    whose 768 values are in (y in patch, x in patch, channel) order, patches row-major."""
    views = []
    for v, (rows, cols) in enumerate(spatial_shapes.tolist()):
        p = patches_u8[v, : rows * cols].reshape(rows, cols, patch, patch, 3)
        views.append(p.transpose(0, 2, 1, 3, 4).reshape(rows * patch, cols * patch, 3))
    return views


def write_views(views: list[np.ndarray], dst: Path) -> list[str]:
    if dst.exists():
        for f in dst.iterdir():
            f.unlink()
    names = []
    for i, view in enumerate(views):
        name = f"view_{i:02d}.png"
        common.save_png(np.ascontiguousarray(view), dst / name)
        names.append(name)
    return names


def check_normalisation(pixel_values, patches_u8, mask) -> None:
    """The documented contract: pixel_values == (u8 - 127.5) / 127.5 in f32 on real patches, 0 on
    padding. transformers fuses rescale (1/255) and normalise (mean 0.5, std 0.5) into exactly this."""
    u8 = patches_u8.astype(np.float32)
    expected = ((u8 - np.float32(127.5)) / np.float32(127.5)).astype(np.float32)
    real = mask.astype(bool)
    got = pixel_values.numpy()
    assert np.array_equal(got[real], expected[real]), np.abs(got[real] - expected[real]).max()
    assert np.all(got[~real] == 0.0)


# ---------------------------------------------------------------------------------------------
# Model references
# ---------------------------------------------------------------------------------------------


def token_positions(input_ids: np.ndarray, image_token_id: int, vocab: int) -> list[int]:
    """The prompt positions whose logits and hidden states are stored: the first tokens, the
    image-token run's edges and the token after it, and the last six (the last is what generation
    uses). The 65536-entry vocabulary keeps only the token after the image and the last position."""
    n = len(input_ids)
    img = np.nonzero(input_ids == image_token_id)[0]
    first, last = int(img[0]), int(img[-1])
    if vocab > 4096:
        pos = [last + 1, n - 1]
    else:
        pos = [0, 1, 2, first, first + 1, last, last + 1] + list(range(n - 6, n))
    return sorted({p for p in pos if 0 <= p < n})


def greedy_with_cache(model, inputs: dict, steps: int):
    """Prefill with the cache, then feed one token at a time; returns tokens and the logits each
    token was chosen from (step 0: the prompt's last position)."""
    import torch

    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = out.cache
        logits = out.logits[0, -1]
        tokens, step_logits = [], []
        mask = inputs["attention_mask"]
        for _ in range(steps):
            tok = int(torch.argmax(logits))
            tokens.append(tok)
            step_logits.append(logits.clone())
            mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], dim=1)
            out = model(input_ids=torch.tensor([[tok]]), attention_mask=mask, cache=cache, use_cache=True)
            cache = out.cache
            logits = out.logits[0, -1]
    return tokens, torch.stack(step_logits)


def capture_forward(model, inputs: dict):
    """One full forward (no cache) with hooks on every stage; returns a dict of tensors."""
    import torch

    captured: dict[str, object] = {}
    hooks = []
    inner = model.model
    hooks.append(inner.vision_tower.embeddings.register_forward_hook(
        lambda m, a, o: captured.__setitem__("vision_embeddings", o.detach().clone())))
    hooks.append(inner.vision_tower.post_layernorm.register_forward_hook(
        lambda m, a, o: captured.__setitem__("vision_last_hidden_state", o.detach().clone())))
    proj = inner.multi_modal_projector
    if proj.layer_norm is not None:
        hooks.append(proj.layer_norm.register_forward_hook(
            lambda m, a, o: captured.__setitem__("projector_ln_input", a[0].detach().clone())))
    hooks.append(inner.language_model.register_forward_pre_hook(
        lambda m, a, kw: captured.__setitem__("lm_inputs_embeds", kw["inputs_embeds"].detach().clone()),
        with_kwargs=True))
    layer_outs = []
    for layer in inner.language_model.layers:
        hooks.append(layer.register_forward_hook(
            lambda m, a, o: layer_outs.append((o[0] if isinstance(o, tuple) else o).detach().clone())))
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    captured["logits"] = out.logits.detach()
    captured["image_features"] = torch.cat(out.image_outputs.pooler_output, dim=0).detach()
    captured["lm_hidden_states"] = torch.stack([captured["lm_inputs_embeds"][0]] + [o[0] for o in layer_outs])
    return captured


def projector_unshuffled(ln_input, spatial_shapes, factor: int):
    """Rows of the projector LayerNorm's input that belong to image tokens, in token order.
    (5.x gathers a padded block grid; token t of view v is real when t < (rows/f)*(cols/f).)"""
    feats = ln_input.reshape(-1, ln_input.shape[-1])
    n_views = spatial_shapes.shape[0]
    per_view = feats.shape[0] // n_views
    keep = []
    for v, (rows, cols) in enumerate(spatial_shapes.tolist()):
        n_tok = (rows // factor) * (cols // factor)
        keep.extend(range(v * per_view, v * per_view + n_tok))
    return feats[keep]


def model_case(name: str, ckpt_name: str, image_name: str, system: str | None, user: str, ckpt_root: Path):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ckpt = ckpt_root / ckpt_name
    processor = load_processor(ckpt)
    model = load_model(ckpt)
    cfg = model.config
    image = common.load_image(IMAGES / f"{image_name}.png")
    text = processor.apply_chat_template(messages_for(system, user), add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[[image]], text=[text], return_tensors="pt", do_convert_rgb=True)
    inputs = {k: v for k, v in inputs.items()}
    raw, patches_u8 = uint8_views(processor.image_processor, image, {"do_convert_rgb": True})
    check_normalisation(inputs["pixel_values"], patches_u8, inputs["pixel_attention_mask"].numpy())
    spatial = inputs["spatial_shapes"]
    views = views_from_patches(patches_u8, spatial, processor.image_processor.encoder_patch_size)
    view_files = write_views(views, FIXTURES / "model" / name)

    cap = capture_forward(model, inputs)
    input_ids = inputs["input_ids"][0].numpy()
    vocab = cfg.text_config.vocab_size
    positions = token_positions(input_ids, cfg.image_token_id, vocab)
    pos_t = torch.tensor(positions)
    real = inputs["pixel_attention_mask"].bool()

    tokens, step_logits = greedy_with_cache(model, inputs, GREEDY_STEPS)
    eos_override = None
    if name in EOS_AT_STEP:
        step = EOS_AT_STEP[name]
        eos_override = tokens[step]
        assert eos_override not in tokens[:step], ("the EOS token must first appear at its step", tokens)
    with torch.no_grad():
        extra = {} if eos_override is None else {"eos_token_id": eos_override}
        gen = model.generate(**inputs, do_sample=False, max_new_tokens=GREEDY_STEPS, **extra)
    generated = gen[0, input_ids.shape[0]:].tolist()
    # generate stops at <|im_end|>; up to there it must agree with the cached greedy loop.
    assert generated == tokens[: len(generated)], (generated, tokens)
    # The cached loop must agree with a cache-free forward over the prompt plus its tokens.
    with torch.no_grad():
        full = model(**{**inputs, "input_ids": torch.cat([inputs["input_ids"], torch.tensor([tokens[:-1]])], 1),
                        "attention_mask": torch.ones((1, input_ids.shape[0] + len(tokens) - 1), dtype=torch.long)})
    cache_drift = float((full.logits[0, input_ids.shape[0] - 1:] - step_logits).abs().max())
    assert cache_drift < 1e-3, cache_drift
    top2 = torch.topk(step_logits, 2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()

    # f64 drift: the same forward in double precision bounds what f32 can be expected to match.
    model64 = load_model(ckpt, dtype=torch.float64)
    inputs64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    cap64 = capture_forward(model64, inputs64)
    drift = {
        key: float((cap[key].double() - cap64[key]).abs().max())
        for key in ("vision_last_hidden_state", "image_features", "lm_hidden_states", "logits")
    }

    tensors = {
        "input_ids": inputs["input_ids"].to(torch.int64),
        "attention_mask": inputs["attention_mask"].to(torch.int64),
        "pixel_attention_mask": inputs["pixel_attention_mask"].to(torch.int64),
        "spatial_shapes": spatial.to(torch.int64),
        "vision_last_hidden_state_valid": cap["vision_last_hidden_state"][real],
        "image_features": cap["image_features"],
        "positions": pos_t.to(torch.int64),
        "lm_inputs_embeds": cap["lm_inputs_embeds"][0, pos_t],
        "lm_hidden_states": cap["lm_hidden_states"][:, pos_t],
        "logits": cap["logits"][0, pos_t],
        "greedy_tokens": torch.tensor(tokens, dtype=torch.int64),
        "generate_ids": gen.to(torch.int64),
    }
    if spatial.shape[0] == 1:
        # Single views only: tiled cases repeat the same computations at several times the size,
        # and their last hidden state already depends on the embeddings.
        tensors["vision_embeddings_valid"] = cap["vision_embeddings"][real]
    if spatial.shape[0] == 1 and "projector_ln_input" in cap:
        tensors["projector_unshuffled"] = projector_unshuffled(cap["projector_ln_input"], spatial, cfg.downsample_factor)
    if vocab > 4096:
        top = torch.topk(step_logits, TOPK, dim=-1)
        tensors["greedy_step_topk_values"] = top.values
        tensors["greedy_step_topk_indices"] = top.indices.to(torch.int64)
    else:
        tensors["greedy_step_logits"] = step_logits

    tok = processor.tokenizer
    ip = processor.image_processor
    rows = int(raw["image_rows"][0])
    cols = int(raw["image_cols"][0])
    n_image_tokens = int((inputs["input_ids"] == cfg.image_token_id).sum())
    harness = {
        "case": name,
        "checkpoint": ckpt_name,
        "image": f"images/{image_name}.png",
        "image_size": list(image.size),
        "image_mode": image.mode,
        "system": system,
        "prompt": user,
        "text": text,
        "expanded_text": tok.decode(input_ids.tolist(), skip_special_tokens=False),
        "num_tokens": int(input_ids.shape[0]),
        "num_image_tokens": n_image_tokens,
        "grid_rows": rows,
        "grid_cols": cols,
        "num_views": int(spatial.shape[0]),
        "resized_size_hw": [int(x) for x in raw["image_sizes"][0]],
        "views": [f"model/{name}/{v}" for v in view_files],
        "tile_markers": [t for t in tok.convert_ids_to_tokens(input_ids.tolist()) if t.startswith("<|img_")],
        "processor": {k: getattr(ip, k) for k in (
            "downsample_factor", "do_image_splitting", "min_tiles", "max_tiles", "use_thumbnail",
            "min_image_tokens", "max_image_tokens", "encoder_patch_size", "tile_size",
            "max_pixels_tolerance", "max_num_patches")} | {"do_convert_rgb": True},
        "generated_text": tok.decode(tokens, skip_special_tokens=False),
        "generate_stopped_at_eos": len(generated) < GREEDY_STEPS,
        "generate_eos_token_id": eos_override,
        "greedy_margins": margins,
        "min_greedy_margin": min(margins),
        "cache_vs_full_logits_max_abs": cache_drift,
        "f32_vs_f64_max_abs": drift,
        "max_abs_logit": float(cap["logits"].abs().max()),
        "versions": common.versions(),
    }
    out = FIXTURES / "model" / f"{name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out,
              metadata={"harness": json.dumps(harness, sort_keys=True)})
    print(f"{name}: L={harness['num_tokens']} image tokens={n_image_tokens} views={harness['num_views']} "
          f"grid={rows}x{cols} greedy={tokens} min margin={min(margins):.3f} drift={drift}")


# ---------------------------------------------------------------------------------------------
# Processor references (real LFM2-VL-450M settings, no model)
# ---------------------------------------------------------------------------------------------


def processor_case(image_name: str, processor) -> None:
    """Thumbnail on and off share every tile, so views are stored once (thumbnail-on set, the
    thumbnail last); the thumbnail-off entry lists the subset that setting produces."""
    image = common.load_image(IMAGES / f"{image_name}.png")
    ip = processor.image_processor
    record = {
        "image": f"images/{image_name}.png",
        "image_size": list(image.size),
        "image_mode": image.mode,
        "settings": {k: getattr(ip, k) for k in (
            "downsample_factor", "do_image_splitting", "min_tiles", "max_tiles", "min_image_tokens",
            "max_image_tokens", "encoder_patch_size", "tile_size", "max_pixels_tolerance",
            "max_num_patches")} | {"do_convert_rgb": True},
        "versions": common.versions(),
    }
    views_on = None
    for thumb in (True, False):
        inputs = processor(images=[[image]], text=["<image>"], return_tensors="pt", do_convert_rgb=True,
                           use_thumbnail=thumb)
        raw, patches_u8 = uint8_views(ip, image, {"do_convert_rgb": True, "use_thumbnail": thumb})
        check_normalisation(inputs["pixel_values"], patches_u8, inputs["pixel_attention_mask"].numpy())
        spatial = inputs["spatial_shapes"]
        views = views_from_patches(patches_u8, spatial, ip.encoder_patch_size)
        ids = inputs["input_ids"][0].tolist()
        mask = inputs["pixel_attention_mask"]
        entry = {
            "input_ids": ids,
            "num_image_tokens": int(sum(1 for i in ids if i == processor.image_token_id)),
            "expanded_text": processor.tokenizer.decode(ids, skip_special_tokens=False),
            "grid_rows": int(raw["image_rows"][0]),
            "grid_cols": int(raw["image_cols"][0]),
            "resized_size_hw": [int(x) for x in raw["image_sizes"][0]],
            "spatial_shapes": spatial.tolist(),
            "num_valid_patches": mask.sum(dim=1).tolist(),
            "pixel_values_shape": list(inputs["pixel_values"].shape),
            # f64 sums of the normalised pixel_values per view: a cheap whole-tensor check.
            "pixel_values_sum": inputs["pixel_values"].double().sum(dim=(1, 2)).tolist(),
            "pixel_values_abs_sum": inputs["pixel_values"].double().abs().sum(dim=(1, 2)).tolist(),
        }
        if thumb:
            views_on = views
            names = write_views(views, FIXTURES / "processor" / image_name)
            entry["views"] = [f"processor/{image_name}/{n}" for n in names]
        else:
            # Every thumbnail-off view equals the thumbnail-on view with the same index.
            for i, v in enumerate(views):
                assert np.array_equal(v, views_on[i]), (image_name, i)
            entry["views"] = record["thumbnail_on"]["views"][: len(views)]
        record["thumbnail_on" if thumb else "thumbnail_off"] = entry
    common.write_json(FIXTURES / "processor" / f"{image_name}.json", record)
    on, off = record["thumbnail_on"], record["thumbnail_off"]
    print(f"{image_name}: on {on['num_image_tokens']} tokens {len(on['views'])} views; "
          f"off {off['num_image_tokens']} tokens {len(off['views'])} views; grid {on['grid_rows']}x{on['grid_cols']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["model", "processor"])
    parser.add_argument("cases", nargs="*", help="model cases or processor images to (re)compute")
    args = parser.parse_args()
    common.setup_torch()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt_root = Path(tmp)
        # Synthetic checkpoints are used in place; realtok is assembled with the real tokenizer.
        for name in ("tiny-thumb", "tiny-nothumb", "tiny-variant"):
            (ckpt_root / name).symlink_to(CHECKPOINTS / name)
        common.assemble_realtok(ckpt_root / "tiny-realtok")
        if args.only in (None, "model"):
            for name, (ckpt, image, system, user) in MODEL_CASES.items():
                if args.cases and name not in args.cases:
                    continue
                model_case(name, ckpt, image, system, user, ckpt_root)
        if args.only in (None, "processor"):
            processor = load_processor(ckpt_root / "tiny-realtok")
            for image in PROCESSOR_IMAGES:
                if args.cases and image not in args.cases:
                    continue
                processor_case(image, processor)


if __name__ == "__main__":
    main()
