"""Loads a merged checkpoint written by `vlmpipe export --merged DIR` in transformers and compares logits.

The merged directory must be a complete Hub-layout checkpoint that transformers' Auto classes load
as they stand, the way a user would: `AutoModelForImageTextToText.from_pretrained(DIR)` (every
stored tensor must land on its parameter, and the class must be Lfm2VlForConditionalGeneration) and
`AutoProcessor.from_pretrained(DIR)` (an Lfm2VlProcessor with the LFM2-VL image processor, built
from the directory's own tokenizer, chat template and processor files). The prompt is the LoRA
fixture's (image `lora_a_64x48.png`, its question, generation prompt); the last position's logits
are compared with DIR/logits.safetensors (tensor `logits`, f32 [vocab]) or --logits, which vlmpipe
computed with the adapter attached to the unmerged base.

Passes (exit 0) when argmax agrees and max |diff| <= 5e-4 + 2e-5 * max |logit|; prints a JSON report.

Usage: .venv-5/bin/python tests/reference/check_merged_checkpoint.py DIR [--logits FILE]
       [--image PNG] [--prompt TEXT] [--system TEXT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common
from compute_references import messages_for
from lora_reference import EXAMPLES, QUESTION


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="merged checkpoint directory written by vlmpipe")
    parser.add_argument("--logits", type=Path, default=None, help="default: DIR/logits.safetensors")
    parser.add_argument("--image", type=Path, default=common.IMAGES / f"{EXAMPLES[0][0]}.png")
    parser.add_argument("--prompt", default=QUESTION)
    parser.add_argument("--system", default=None)
    args = parser.parse_args()

    torch = common.setup_torch()
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    logits_path = args.logits or args.dir / "logits.safetensors"
    model = AutoModelForImageTextToText.from_pretrained(args.dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "Lfm2VlForConditionalGeneration", type(model).__name__
    # 5.x renames Hub keys on load (4.57 does not); prove every stored tensor landed where it belongs.
    params = dict(model.named_parameters())
    for key, value in load_file(args.dir / "model.safetensors").items():
        mapped = key if key in params else key.replace("model.vision_tower.vision_model.", "model.vision_tower.")
        assert mapped in params, f"{key} -> {mapped} not a parameter"
        assert torch.equal(params[mapped].detach().to(value.dtype), value), f"{key} differs after loading"
    processor = AutoProcessor.from_pretrained(args.dir)
    assert type(processor.image_processor).__name__.startswith("Lfm2VlImageProcessor"), type(
        processor.image_processor
    ).__name__
    text = processor.apply_chat_template(messages_for(args.system, args.prompt), add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(images=[[common.load_image(args.image)]], text=[text], return_tensors="pt",
                       do_convert_rgb=True)
    with torch.no_grad():
        reference = model(**inputs).logits[0, -1].float()
    theirs = load_file(logits_path)["logits"].float().reshape(-1)
    report: dict = {"merged": str(args.dir), "logits_file": str(logits_path), "model_class": type(model).__name__,
                    "image_processor_class": type(processor.image_processor).__name__}
    if theirs.shape != reference.shape:
        report.update(ok=False, error=f"logits shape {list(theirs.shape)}, expected {list(reference.shape)}")
        print(json.dumps(report, indent=2))
        return 1
    diff = float((theirs - reference).abs().max())
    tol = 5e-4 + 2e-5 * float(reference.abs().max())
    report.update(max_abs_diff=diff, tolerance=tol, argmax_transformers=int(reference.argmax()),
                  argmax_vlmpipe=int(theirs.argmax()))
    report["ok"] = diff <= tol and report["argmax_transformers"] == report["argmax_vlmpipe"]
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
