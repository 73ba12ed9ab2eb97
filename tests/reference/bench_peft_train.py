"""Times one LoRA training step in PyTorch + peft, the baseline of vlmpipe's `train_bench` example.

The same step as `vlmpipe::train::bench::bench_train_step`, f32 on the CPU with 2 threads: a
random-weight Lfm2VlForConditionalGeneration built from CONFIG (no weight files), LoRA r 8,
alpha 16, no dropout on q/k/v/out/in_proj and w1/w2/w3 of the language model only, one image view of
PATCH_ROWS x PATCH_COLS patches, PROMPT_TOKENS text tokens and ANSWER_TOKENS labelled answer tokens.
One step is: vision tower + projector forward, decoder forward, the LM head at the answer positions
only, cross-entropy, backward, torch.optim.AdamW step, zero_grad. Prints JSON with each timed step,
the median and the peak RSS; one warm-up step is not timed.

Usage: .venv-5/bin/python tests/reference/bench_peft_train.py CONFIG_JSON [--steps 3]
       [--patch-rows 24] [--patch-cols 32] [--prompt-tokens 76] [--answer-tokens 2]
       [--checkpoint DIR] [--inputs FILE]

`vlmpipe bench train --python PY` passes `--checkpoint` (the random checkpoint both sides load)
and `--inputs` (a safetensors file with vlmpipe's `input_ids [1, L]`, `pixel_values [1, P, D]`
and `answer_start`), so both time the same weights and sequence; the report then also splits each
step into forward (vision included), backward and optimizer.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import common

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--patch-rows", type=int, default=24)
    parser.add_argument("--patch-cols", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=76)
    parser.add_argument("--answer-tokens", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, help="load these weights instead of a random init")
    parser.add_argument("--inputs", type=Path, help="input_ids, pixel_values, answer_start (safetensors)")
    args = parser.parse_args()

    torch = common.setup_torch()
    from peft import LoraConfig, get_peft_model
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    config = Lfm2VlConfig.from_dict(json.loads(args.config.read_text()))
    if args.checkpoint is not None:
        model = Lfm2VlForConditionalGeneration.from_pretrained(args.checkpoint, dtype=torch.float32)
    else:
        model = Lfm2VlForConditionalGeneration(config).float()
    rss_after_load = rss_mib()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             exclude_modules=".*vision_tower.*", bias="none"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

    g = torch.Generator().manual_seed(0)
    rows, cols = args.patch_rows, args.patch_cols
    factor = config.downsample_factor
    image_tokens = -(-rows // factor) * -(-cols // factor)
    vocab = config.text_config.vocab_size
    words = lambda n: torch.randint(min(1000, vocab - 1), vocab, (n,), generator=g)  # noqa: E731
    before = args.prompt_tokens // 4
    ids = torch.cat([words(before), torch.full((image_tokens,), config.image_token_id),
                     words(args.prompt_tokens - before), words(args.answer_tokens)]).unsqueeze(0)
    seq = ids.shape[1]
    answer_start = seq - args.answer_tokens
    # Position t predicts token t + 1: the answer's targets come from positions answer_start-1 ...
    positions = torch.arange(answer_start - 1, seq - 1)
    targets = ids[0, answer_start:]
    patch_dim = config.vision_config.num_channels * config.vision_config.patch_size ** 2
    pixel_values = torch.rand(1, rows * cols, patch_dim, generator=g) * 2 - 1
    if args.inputs is not None:
        from safetensors.torch import load_file

        given = load_file(args.inputs)
        ids = given["input_ids"].long()
        pixel_values = given["pixel_values"].float()
        seq = ids.shape[1]
        answer_start = int(given["answer_start"].item())
        positions = torch.arange(answer_start - 1, seq - 1)
        targets = ids[0, answer_start:]
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                  pixel_attention_mask=torch.ones(1, rows * cols, dtype=torch.long),
                  spatial_shapes=torch.tensor([[rows, cols]]))
    inner = model.base_model.model

    steps = []
    parts = {"forward_ms": [], "backward_ms": [], "optimizer_ms": []}
    for step in range(args.steps + 1):
        t = time.perf_counter()
        hidden = inner.model(**inputs).last_hidden_state[0, positions]
        logits = inner.lm_head(hidden)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss.item()
        t_forward = time.perf_counter()
        loss.backward()
        t_backward = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_end = time.perf_counter()
        if step > 0:
            steps.append((t_end - t) * 1e3)
            parts["forward_ms"].append((t_forward - t) * 1e3)
            parts["backward_ms"].append((t_backward - t_forward) * 1e3)
            parts["optimizer_ms"].append((t_end - t_backward) * 1e3)
    print(json.dumps({
        "sequence_tokens": seq, "image_tokens": image_tokens, "trained_parameters": trainable,
        "step_ms": steps, "median_step_ms": statistics.median(steps),
        **{k: statistics.median(v) for k, v in parts.items()},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "rss_after_load_mib": rss_after_load, "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
