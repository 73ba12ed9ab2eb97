"""Shared pieces of the reference generator: environment, paths, synthetic images, the synthetic
tokenizer, the tiny checkpoint specs and the cases.

Everything here is deterministic: the same versions and seeds give byte-identical images and
checkpoints, so regenerating the fixtures only changes them when something real changed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# Offline before transformers is imported anywhere: only PyPI is reachable, never the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "reference"
CHECKPOINTS = FIXTURES / "checkpoints"
IMAGES = FIXTURES / "images"
SHARED = Path(os.environ.get("VLMPIPE_SHARED", REPO.parent / "shared"))
REAL_450M = SHARED / "models" / "LFM2-VL-450M"

THREADS = 2


def setup_torch(seed: int = 0):
    """Pins threads and seeds so two runs on the same machine agree bit for bit."""
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch


def require_real_450m() -> Path:
    """The real LFM2-VL-450M file set (no weights), or a clear exit when ../shared is absent."""
    if not (REAL_450M / "tokenizer.json").is_file():
        raise SystemExit(f"missing {REAL_450M}: set VLMPIPE_SHARED to the shared data folder")
    return REAL_450M


# ---------------------------------------------------------------------------------------------
# Synthetic images
# ---------------------------------------------------------------------------------------------


def synthetic_image(width: int, height: int, seed: int) -> np.ndarray:
    """An RGB uint8 image [H, W, 3] with smooth gradients, hard-edged shapes and a fine stripe band.

    Gradients compress well in PNG and survive resizing; hard edges and 2-pixel stripes make
    antialiased resizing differ visibly from plain bilinear, so a port that skips antialias fails.
    No noise: it would bloat the committed PNGs without testing anything more.
    """
    rng = np.random.default_rng(seed)
    y = (np.arange(height, dtype=np.float64)[:, None] + 0.5) / height
    x = (np.arange(width, dtype=np.float64)[None, :] + 0.5) / width
    img = np.zeros((height, width, 3), dtype=np.float64)
    for c in range(3):
        a, b, f1, f2, p = rng.uniform(0.0, 1.0, 5)
        img[..., c] = (
            60.0
            + 120.0 * (a * x + (1.0 - a) * y)
            + 40.0 * np.sin(2.0 * np.pi * (1.0 + 2.0 * f1) * x + 6.0 * p)
            * np.cos(2.0 * np.pi * (1.0 + 2.0 * f2) * y)
            + 20.0 * b
        )
    # Shapes sized relative to the image so every size shows them.
    for _ in range(4):
        colour = rng.integers(0, 256, 3).astype(np.float64)
        cx, cy = rng.uniform(0.15, 0.85, 2)
        r = rng.uniform(0.08, 0.25)
        if rng.uniform() < 0.5:
            mask = ((x - cx) / r) ** 2 + ((y - cy) / r) ** 2 <= 1.0
        else:
            mask = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r * 0.6)
        img[mask] = colour
    # A band of 2-pixel vertical stripes (columns alternate) in the lower part.
    band = (y > 0.8) & (y < 0.9)
    stripes = ((np.arange(width)[None, :] // 2) % 2 == 0) & band
    img[stripes] = 255.0
    img[band & ~stripes] = 0.0
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: Path, mode: str | None = None) -> None:
    """Writes a PNG with maximum compression and no metadata, so the bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    img.save(path, format="PNG", optimize=True, compress_level=9)


# Every committed input image: name -> (width, height, seed, kind). `kind` picks the PNG mode:
# rgb, gray (mode L) or rgba (alpha varies across the image).
IMAGE_SPECS: dict[str, tuple[int, int, int, str]] = {
    "tiny_40x30": (40, 30, 1, "rgb"),
    "photo_512x384": (512, 384, 2, "rgb"),
    "wide_1500x500": (1500, 500, 3, "rgb"),
    "tall_800x1400": (800, 1400, 4, "rgb"),
    "strip_2000x60": (2000, 60, 5, "rgb"),
    "gray_300x200": (300, 200, 6, "gray"),
    "odd_333x251": (333, 251, 7, "rgb"),
    "alpha_200x150": (200, 150, 8, "rgba"),
    "pixel_1x1": (1, 1, 9, "rgb"),
    "thin_17x9": (17, 9, 10, "rgb"),
    "square_400x400": (400, 400, 11, "rgb"),
    "tallthin_100x333": (100, 333, 12, "rgb"),
    "vga_640x480": (640, 480, 13, "rgb"),
    "square_1000x1000": (1000, 1000, 14, "rgb"),
    "hd_1920x1080": (1920, 1080, 15, "rgb"),
    "strip_60x2000": (60, 2000, 16, "rgb"),
    "lora_a_64x48": (64, 48, 17, "rgb"),
    "lora_b_48x80": (48, 80, 18, "rgb"),
}


def make_images() -> dict[str, Path]:
    """Writes every image of IMAGE_SPECS under fixtures/images/ and returns name -> path."""
    paths = {}
    for name, (w, h, seed, kind) in IMAGE_SPECS.items():
        rgb = synthetic_image(w, h, seed)
        path = IMAGES / f"{name}.png"
        if kind == "gray":
            # ITU-R 601 luma, rounded: a real single-channel file, not RGB with equal channels.
            gray = np.rint(rgb @ np.array([0.299, 0.587, 0.114])).clip(0, 255).astype(np.uint8)
            save_png(gray, path, mode="L")
        elif kind == "rgba":
            yy = np.linspace(0, 255, h)[:, None].repeat(w, axis=1)
            alpha = np.rint(yy).astype(np.uint8)
            save_png(np.dstack([rgb, alpha]), path, mode="RGBA")
        else:
            save_png(rgb, path)
        paths[name] = path
    return paths


def load_image(path: Path):
    """Opens an image as transformers would get it from a user: a PIL image in its own mode."""
    img = Image.open(path)
    img.load()
    return img


# ---------------------------------------------------------------------------------------------
# Synthetic tokenizer (ids laid out like the real LFM2-VL tokenizer's special tokens)
# ---------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{- bos_token -}}{%- set ns = namespace(system_prompt='') -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.system_prompt = messages[0]['content'] -%}"
    "{%- else -%}{%- for item in messages[0]['content'] -%}{%- if item['type'] == 'text' -%}"
    "{%- set ns.system_prompt = ns.system_prompt + item['text'] -%}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{%- set messages = messages[1:] -%}{%- endif -%}"
    "{%- if ns.system_prompt -%}{{- '<|im_start|>system\\n' + ns.system_prompt + '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

SYNTH_VOCAB = 1024
N_SPECIAL = 512


def special_tokens() -> list[str]:
    """The 512 special tokens at ids 0..511: the real LFM2-VL names where the real tokenizer has one
    below 512 (control tokens, `<image>` 396, tile markers 397-496, thumbnail 497, image start/end
    498/499, split 500), `<|reserved_N|>` elsewhere."""
    names = {
        0: "<|pad|>",
        1: "<|startoftext|>",
        2: "<|endoftext|>",
        3: "<|fim_pre|>",
        4: "<|fim_mid|>",
        5: "<|fim_suf|>",
        6: "<|im_start|>",
        7: "<|im_end|>",
        8: "<|tool_list_start|>",
        9: "<|tool_list_end|>",
        10: "<|tool_call_start|>",
        11: "<|tool_call_end|>",
        12: "<|tool_response_start|>",
        13: "<|tool_response_end|>",
        396: "<image>",
        497: "<|img_thumbnail|>",
        498: "<|image_start|>",
        499: "<|image_end|>",
        500: "<|image_split|>",
    }
    for r in range(10):
        for c in range(10):
            names[397 + r * 10 + c] = f"<|img_row_{r + 1}_col_{c + 1}|>"
    return [names.get(i, f"<|reserved_{i}|>") for i in range(N_SPECIAL)]


def check_special_tokens_against_real() -> None:
    """Asserts our layout agrees with the real tokenizer wherever the real one names an id < 512."""
    path = REAL_450M / "tokenizer.json"
    if not path.is_file():
        print(f"note: {path} absent; special-token layout not cross-checked")
        return
    real = {t["id"]: t["content"] for t in json.loads(path.read_text())["added_tokens"]}
    ours = special_tokens()
    for i, name in real.items():
        if i < N_SPECIAL and not name.startswith("<|reserved"):
            assert ours[i] == name, (i, ours[i], name)


CORPUS = [
    "What is in this image?",
    "What animal in the following list is the one you see in the picture? - cat - dog",
    "Provide your answer as a single animal from the list without any additional text.",
    "You are a veterinarian specialized in analyzing pictures of cats and dogs",
    "You excel at identifying the type of animal from a picture.",
    '{"pred_class": "cat"} {"pred_class": "dog"}',
    "Describe the colours and shapes: a red circle, a blue square and white stripes.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "user assistant system image picture photo shape colour",
]


def build_synthetic_tokenizer():
    """A byte-level BPE of 1024 entries: 512 special tokens, the 256 byte symbols, 256 merges
    learned from a small fixed corpus. Same pre-tokenizer, BOS template and decoder as LFM2."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    specials = special_tokens()
    trainer = trainers.BpeTrainer(
        vocab_size=SYNTH_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=1,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single="<|startoftext|> $A",
                pair="<|startoftext|> $A <|startoftext|> $B",
                special_tokens=[("<|startoftext|>", 1)],
            ),
        ]
    )
    for i, name in enumerate(specials):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    return tok


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

# The real LFM2-VL-450M processor numbers (its processor_config.json); the tiny checkpoints vary them.
REAL_PROCESSOR = dict(
    do_image_splitting=True,
    downsample_factor=2,
    encoder_patch_size=16,
    max_image_tokens=256,
    min_image_tokens=64,
    max_num_patches=1024,
    max_pixels_tolerance=2.0,
    max_tiles=10,
    min_tiles=2,
    tile_size=512,
    use_thumbnail=False,
)

CHECKPOINT_SPECS = {
    # Like ../shared/reference/tiny-lfm2vl (other seed): real processor numbers, thumbnail on.
    "tiny-thumb": dict(
        seed=101,
        tokenizer="synthetic",
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_patches=256),
        text=dict(hidden_size=64, intermediate_size=200, block_ff_dim=200, block_auto_adjust_ff_dim=True,
                  block_multiple_of=32, num_attention_heads=4, num_key_value_heads=2,
                  layer_types=["conv", "conv", "full_attention", "conv", "full_attention", "conv"],
                  rope_theta=1000000.0, vocab_size=SYNTH_VOCAB),
        projector_hidden_size=128,
        processor=dict(REAL_PROCESSOR, use_thumbnail=True),
    ),
    # Everything that a port might hard-code is different here: thumbnail off, 256-pixel tiles,
    # 16..64 image tokens, an 8x8 position grid (so it is upsampled), 3 heads of 16 in the vision
    # tower, attention first in the decoder, no FFN auto-adjust, another rope theta.
    "tiny-nothumb": dict(
        seed=202,
        tokenizer="synthetic",
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                    num_patches=64),
        text=dict(hidden_size=48, intermediate_size=96, block_ff_dim=96, block_auto_adjust_ff_dim=False,
                  block_multiple_of=32, num_attention_heads=6, num_key_value_heads=2,
                  layer_types=["full_attention", "conv", "conv", "full_attention", "conv"],
                  rope_theta=10000.0, vocab_size=SYNTH_VOCAB),
        projector_hidden_size=96,
        processor=dict(REAL_PROCESSOR, use_thumbnail=False, tile_size=256, min_image_tokens=16,
                       max_image_tokens=64, max_num_patches=256, max_tiles=6),
    ),
    # The numbers no released checkpoint varies: 14-pixel patches, a 3x3 pixel unshuffle and no
    # projector LayerNorm, with tiles of 504 = 14 * 3 * 12 pixels and a thumbnail.
    "tiny-variant": dict(
        seed=404,
        tokenizer="synthetic",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_patches=256, patch_size=14),
        text=dict(hidden_size=32, intermediate_size=64, block_ff_dim=64, block_auto_adjust_ff_dim=False,
                  block_multiple_of=32, num_attention_heads=4, num_key_value_heads=2,
                  layer_types=["conv", "full_attention", "conv"],
                  rope_theta=1000000.0, vocab_size=SYNTH_VOCAB),
        projector_hidden_size=64,
        projector_use_layernorm=False,
        processor=dict(REAL_PROCESSOR, use_thumbnail=True, encoder_patch_size=14, downsample_factor=3,
                       tile_size=504, min_image_tokens=16, max_image_tokens=144, max_num_patches=1296),
    ),
    # The real tokenizer's 65536-row embedding: a small width keeps the file at a few MB. Only
    # config.json and model.safetensors are committed; the rest comes from ../shared at test time.
    "tiny-realtok": dict(
        seed=303,
        tokenizer="real",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_patches=256),
        text=dict(hidden_size=8, intermediate_size=6656, block_ff_dim=64, block_auto_adjust_ff_dim=True,
                  block_multiple_of=16, num_attention_heads=2, num_key_value_heads=1,
                  layer_types=["conv", "full_attention", "conv", "full_attention"],
                  rope_theta=1000000.0, vocab_size=65536),
        projector_hidden_size=32,
        processor=dict(REAL_PROCESSOR),
    ),
}

# Files of the real LFM2-VL-450M set that a realtok checkpoint borrows at test time.
REAL_BORROWED = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
]


def assemble_realtok(dst: Path, fixture_dir: Path | None = None) -> Path:
    """Combines the committed realtok weights/config with the real tokenizer and processor files
    from ../shared into `dst` (what a Rust test does in a temp dir). Returns `dst`."""
    real = require_real_450m()
    src = fixture_dir or CHECKPOINTS / "tiny-realtok"
    dst.mkdir(parents=True, exist_ok=True)
    for name in REAL_BORROWED:
        shutil.copyfile(real / name, dst / name)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copyfile(src / name, dst / name)
    return dst


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def versions() -> dict:
    """The versions that produced a fixture, recorded in its metadata."""
    import platform

    import PIL
    import torch
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "threads": THREADS,
    }
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out
