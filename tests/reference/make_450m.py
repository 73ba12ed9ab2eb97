"""Writes a random-weight checkpoint with the real LFM2-VL-450M shapes and file layout (transformers 4.57.6).

../shared/models/LFM2-VL-450M has every file of the real checkpoint except the weights; this adds
seeded random weights of the right shapes and names, so loaders and benchmarks can run the real
configuration offline. Not committed (0.9 GB in bf16, 1.8 GB in f32).

The model is built from the real config.json, and the real config, tokenizer, chat template and
processor files are copied unchanged, so the directory is what `hf download` would give except for
the weight values (and, with --max-shard-size, the sharding).

Usage: .venv-457/bin/python tests/reference/make_450m.py OUT_DIR [--dtype bfloat16|float32]
       [--max-shard-size 5GB] [--seed 450]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import common
from make_checkpoints import scaled_init


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="bfloat16 is what the real checkpoint stores")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="e.g. 300MB to get model-0000N-of-0000M.safetensors with an index")
    parser.add_argument("--seed", type=int, default=450)
    args = parser.parse_args()

    torch = common.setup_torch(args.seed)
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    real = common.require_real_450m()
    config = Lfm2VlConfig.from_pretrained(real)
    with torch.device("cpu"):
        model = Lfm2VlForConditionalGeneration(config).eval()
    scaled_init(model, args.seed)
    model = model.to(getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in model.parameters())

    args.out.mkdir(parents=True, exist_ok=True)
    for old in list(args.out.glob("model*.safetensors")) + list(args.out.glob("model.safetensors.index.json")):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=args.max_shard_size)
        weights = sorted(p.name for p in Path(tmp).iterdir()
                         if p.name.startswith("model") and (p.suffix == ".safetensors" or p.name.endswith(".index.json")))
        for name in weights:
            shutil.move(str(Path(tmp) / name), args.out / name)
    for src in sorted(real.iterdir()):
        if src.is_file():
            shutil.copyfile(src, args.out / src.name)
    if args.dtype != "bfloat16":
        # The config must describe the stored dtype, or loaders that trust it would cast.
        cfg = json.loads((args.out / "config.json").read_text())
        cfg["torch_dtype"] = args.dtype
        for sub in ("text_config", "vision_config"):
            if isinstance(cfg.get(sub), dict) and "torch_dtype" in cfg[sub]:
                cfg[sub]["torch_dtype"] = args.dtype
        (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    size = sum(p.stat().st_size for p in args.out.glob("model*.safetensors"))
    print(json.dumps({"out": str(args.out), "parameters": n_params, "dtype": args.dtype,
                      "weight_files": weights, "weight_bytes": size}, indent=2))


if __name__ == "__main__":
    main()
