"""Times transformers on one photo at the real LFM2-VL-450M shapes (random weights), f32, 2 threads by default.

The baseline that vlmpipe's benchmark (issue 3) compares against, on the same inputs: the
cats-vs-dogs classification conversation (system turn, user turn with the image then the question,
generation prompt) on one cats_vs_dogs photo of ~500x375, which the real processor settings resize
to one 512x384 view (192 image tokens). Prints one JSON object (and writes it with --json-out):
- preprocess_ms: chat template + Lfm2VlProcessor (resize, normalise, patchify, tokenize);
- vision_ms: vision tower + projector (`get_image_features`);
- prompt_forward_ms: the whole prompt through the model with the cache on, as `model(**inputs)`
  does it (vision included, logits at every position);
- lm_prefill_ms: the language model alone over the prompt embeddings, logits at the last position
  only (what a generation loop needs);
- decode_ms_per_token: one greedy step with the KV + conv cache, mean of --decode-steps steps (and each step);
- classify_ms: preprocess + `generate` of 1 + --decode-steps tokens (prefill + the decode steps), end to end;
- peak_rss_mib: the process's peak resident memory; rss_after_load_mib.
Each timing is the median (and min) of --repeats runs after one warm-up.

Usage: .venv-5/bin/python tests/reference/bench_transformers.py MODEL_DIR [--image JPG]
       [--repeats 3] [--threads 2] [--decode-steps 3] [--dtype f32|bf16|f16] [--device cpu|cuda:N|mps]
       [--json-out FILE]
MODEL_DIR: from make_450m.py (bf16 weights, loaded in --dtype). `vlmpipe bench model` passes its own
settings, so both sides do the same work.
"""

# The timing lambdas below run at once, inside their loop iteration. B023 warns about late binding.
# ruff: noqa: B023
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import common
from compute_references import VET_SYSTEM, VET_USER, load_processor, messages_for

DEFAULT_IMAGE = common.SHARED / "data" / "cats_vs_dogs" / "cat" / "0008.jpg"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--decode-steps", type=int, default=3)
    parser.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.decode_steps < 1:
        parser.error("--decode-steps must be at least 1")

    common.THREADS = args.threads
    torch = common.setup_torch()
    from transformers import Lfm2VlForConditionalGeneration

    t0 = time.perf_counter()
    processor = load_processor(args.model)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    model = Lfm2VlForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device).eval()
    new_tokens = 1 + args.decode_steps

    def sync():
        # GPU kernels run asynchronously: a timer stops once the device has finished.
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device.type == "mps":
            torch.mps.synchronize()
    load_s = time.perf_counter() - t0
    rss_load = rss_mib()
    image = common.load_image(args.image)
    messages = messages_for(VET_SYSTEM, VET_USER)

    def preprocess():
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        batch = processor(images=[[image]], text=[text], return_tensors="pt", do_convert_rgb=True)
        out = {k: v.to(device) for k, v in batch.items()}
        out["pixel_values"] = out["pixel_values"].to(dtype)
        return out

    def ms(fn):
        start = time.perf_counter()
        out = fn()
        sync()
        return (time.perf_counter() - start) * 1000.0, out

    results: dict[str, list[float]] = {k: [] for k in (
        "preprocess_ms", "vision_ms", "prompt_forward_ms", "lm_prefill_ms", "decode_ms_per_token", "classify_ms")}
    decode_steps: list[list[float]] = []
    with torch.inference_mode():
        inputs = preprocess()
        model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)  # warm-up
        for _ in range(args.repeats):
            t, inputs = ms(preprocess)
            results["preprocess_ms"].append(t)
            t, feats = ms(lambda: model.model.get_image_features(
                pixel_values=inputs["pixel_values"], spatial_shapes=inputs["spatial_shapes"],
                pixel_attention_mask=inputs["pixel_attention_mask"]))
            results["vision_ms"].append(t)
            t, _ = ms(lambda: model(**inputs, use_cache=True))
            results["prompt_forward_ms"].append(t)

            embeds = model.get_input_embeddings()(inputs["input_ids"])
            image_features = torch.cat(feats.pooler_output, dim=0)
            mask = (inputs["input_ids"] == model.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, image_features)
            t, out = ms(lambda: model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                      use_cache=True, logits_to_keep=1))
            results["lm_prefill_ms"].append(t)

            cache, attn = out.cache, inputs["attention_mask"]
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            steps = []
            for _ in range(args.decode_steps):
                attn = torch.cat([attn, torch.ones((1, 1), dtype=attn.dtype, device=device)], dim=1)
                t, out = ms(lambda: model(input_ids=token, attention_mask=attn, cache=cache, use_cache=True))
                cache = out.cache
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                steps.append(t)
            decode_steps.append(steps)
            results["decode_ms_per_token"].append(statistics.mean(steps))

            def classify():
                return model.generate(**preprocess(), do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens)

            t, _ = ms(classify)
            results["classify_ms"].append(t)

    report = {
        "model": str(args.model),
        "image": str(args.image),
        "image_size": list(image.size),
        "num_prompt_tokens": int(inputs["input_ids"].shape[1]),
        "num_image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "spatial_shapes": inputs["spatial_shapes"].tolist(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "decode_steps": args.decode_steps,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "load_s": load_s,
        "rss_after_load_mib": rss_load,
        "peak_rss_mib": peak_rss_mib(),
        "decode_steps_ms": decode_steps,
        "cpu": platform.processor() or platform.machine(),
        "versions": common.versions(),
    }
    report.update({k: summary(v) for k, v in results.items()})
    report["decode_tokens_per_s"] = 1000.0 / report["decode_ms_per_token"]["median"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")


if __name__ == "__main__":
    main()
