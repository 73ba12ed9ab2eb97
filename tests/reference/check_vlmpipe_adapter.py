"""Loads a LoRA adapter written by vlmpipe into peft and compares logits with what vlmpipe dumped.

The vlmpipe -> PEFT half of issue 6's interop test (the PEFT -> vlmpipe half is the committed
fixture tests/fixtures/reference/lora/adapter_trained/). Contract, all in DIR:
- `adapter_config.json` + `adapter_model.safetensors`: the adapter as vlmpipe exports it (PEFT
  format, PEFT tensor names such as
  `base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight`);
- `logits.safetensors` (or --logits): tensor `logits`, f32 [vocab], the logits of the prompt's last
  position with the adapter applied, as `vlmpipe infer --dump-logits FILE` writes them, for the
  conversation below.
The conversation is the one `vlmpipe infer` builds: a system turn when --system is given, then a
user turn with the image first and the text second, rendered with the base checkpoint's chat
template and the generation prompt. Defaults match the LoRA fixture (tiny-nothumb, lora_a_64x48.png,
its question), so a vlmpipe test can run its trained adapter through this script unchanged.

Passes (exit 0) when every adapter tensor lands on a LoRA module of the base, argmax agrees and
max |diff| <= 5e-4 + 2e-5 * max |logit|; prints a JSON report either way (exit 1 on failure).

Usage: .venv-5/bin/python tests/reference/check_vlmpipe_adapter.py DIR [--base CKPT_DIR]
       [--image PNG] [--prompt TEXT] [--system TEXT] [--logits FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common
from compute_references import load_model, load_processor, messages_for
from lora_reference import CHECKPOINT, EXAMPLES, QUESTION, peft_name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="adapter directory written by vlmpipe")
    parser.add_argument("--base", type=Path, default=common.CHECKPOINTS / CHECKPOINT,
                        help="base checkpoint in the Hub layout, with tokenizer and processor files")
    parser.add_argument("--image", type=Path, default=common.IMAGES / f"{EXAMPLES[0][0]}.png")
    parser.add_argument("--prompt", default=QUESTION)
    parser.add_argument("--system", default=None)
    parser.add_argument("--logits", type=Path, default=None, help="default: DIR/logits.safetensors")
    args = parser.parse_args()

    torch = common.setup_torch()
    from peft import PeftModel
    from safetensors.torch import load_file

    logits_path = args.logits or args.dir / "logits.safetensors"
    report: dict = {"adapter": str(args.dir), "base": str(args.base), "logits_file": str(logits_path)}
    processor = load_processor(args.base)
    model = PeftModel.from_pretrained(load_model(args.base), args.dir).eval()

    # peft only warns about tensors it could not place; an exported name that matches no module
    # is exactly the bug this check exists for, so make it a failure.
    stored = set(load_file(args.dir / "adapter_model.safetensors"))
    loaded = {peft_name(n) for n, _ in model.named_parameters() if ".lora_" in n}
    report["adapter_tensors"] = len(stored)
    report["unmatched_tensors"] = sorted(stored - loaded)
    report["missing_tensors"] = sorted(loaded - stored)

    text = processor.apply_chat_template(messages_for(args.system, args.prompt), add_generation_prompt=True,
                                         tokenize=False)
    image = common.load_image(args.image)
    inputs = processor(images=[[image]], text=[text], return_tensors="pt", do_convert_rgb=True)
    with torch.no_grad():
        reference = model(**inputs).logits[0, -1].float()
    theirs = load_file(logits_path)["logits"].float().reshape(-1)
    if theirs.shape != reference.shape:
        report.update(ok=False, error=f"logits shape {list(theirs.shape)}, expected {list(reference.shape)}")
        print(json.dumps(report, indent=2))
        return 1
    diff = float((theirs - reference).abs().max())
    tol = 5e-4 + 2e-5 * float(reference.abs().max())
    report.update(
        num_tokens=int(inputs["input_ids"].shape[1]),
        max_abs_diff=diff,
        tolerance=tol,
        argmax_peft=int(reference.argmax()),
        argmax_vlmpipe=int(theirs.argmax()),
    )
    report["ok"] = (not report["unmatched_tensors"] and not report["missing_tensors"] and diff <= tol
                    and report["argmax_peft"] == report["argmax_vlmpipe"])
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
