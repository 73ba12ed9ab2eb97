"""Writes tests/fixtures/reference/jpeg/: small JPEGs of every layout PIL reads, and PIL's pixels.

Each case is `<name>.jpg` (written by Pillow's encoder from a synthetic image) and `<name>.png`,
what `Image.open(jpg).convert("RGB")` gives: the pixels transformers' `load_image` hands the
processor. The Rust decoder must reproduce them exactly (tests/processor_jpeg.rs).

Cases: 4:2:0, 4:2:2 and 4:4:4 chroma subsampling, progressive, optimised Huffman tables with
restart intervals, grayscale, and CMYK (Adobe, written inverted by Pillow); odd sizes, so the
edge blocks and the chroma upsampling at the borders are covered.

Usage: tests/reference/.venv-5/bin/python tests/reference/jpeg_references.py
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from common import FIXTURES

OUT = FIXTURES / "jpeg"


def synthetic(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour ramps with sharp edges and noise: every DCT frequency and chroma change."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 128 + 100 * np.sin(x / 7.0) * np.cos(y / 11.0)
    g = 255 * x / max(width - 1, 1)
    b = np.where((x // 9 + y // 5) % 2 == 0, 230.0, 20.0)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


CASES = {
    # name: (size, mode, save options)
    "ycc420_67x45": ((67, 45), "RGB", {"quality": 85, "subsampling": 2}),
    "ycc422_50x33": ((50, 33), "RGB", {"quality": 90, "subsampling": 1}),
    "ycc444_41x29": ((41, 29), "RGB", {"quality": 95, "subsampling": 0}),
    "progressive_73x52": ((73, 52), "RGB", {"quality": 80, "progressive": True}),
    "restarts_64x40": ((64, 40), "RGB", {"quality": 75, "optimize": True, "restart_marker_blocks": 2}),
    "gray_39x27": ((39, 27), "L", {"quality": 85}),
    "cmyk_35x21": ((35, 21), "CMYK", {"quality": 90}),
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for seed, (name, (size, mode, options)) in enumerate(CASES.items()):
        source = synthetic(*size, seed).convert(mode)
        jpg = OUT / f"{name}.jpg"
        source.save(jpg, "JPEG", **options)
        with Image.open(jpg) as decoded:
            assert decoded.mode == mode, (name, decoded.mode)
            decoded.convert("RGB").save(OUT / f"{name}.png")
        print(f"{name}: {mode} {size[0]}x{size[1]} {jpg.stat().st_size} bytes")


if __name__ == "__main__":
    main()
