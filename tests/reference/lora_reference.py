"""LoRA references with PyTorch + peft (issue 6): loss, gradients, 3 AdamW steps, PEFT adapter files.

On the tiny-nothumb checkpoint, one batch of two (image + question + assistant answer) examples,
loss on the answer tokens only. Writes under tests/fixtures/reference/lora/:
- `adapter_init/` and `adapter_trained/`: PEFT adapter directories (adapter_config.json +
  adapter_model.safetensors) before training and after 3 AdamW steps;
- `lora_reference.safetensors`: the batch, the loss, the per-step losses and the last-position
  logits of an inference prompt with no adapter, the initial and the trained adapter;
- `lora_grads.safetensors`: d loss / d (every LoRA tensor) at the initial adapter, PEFT names;
- `views/ex{0,1}/view_NN.png`: the processed views of the two images.

Usage: .venv-5/bin/python tests/reference/lora_reference.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import common
from common import CHECKPOINTS, FIXTURES, IMAGES
from compute_references import (
    check_normalisation,
    load_model,
    load_processor,
    uint8_views,
    views_from_patches,
    write_views,
)

OUT = FIXTURES / "lora"
CHECKPOINT = "tiny-nothumb"
SEED = 1234
RANK = 4
ALPHA = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"]
# The list alone would also match the SigLIP2 tower's q/k/v/out_proj; the stage trains the
# language model only, so the vision tower is excluded (peft matches this regex against full names).
EXCLUDE = r".*vision_tower.*"
LR = 1e-2
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01
STEPS = 3
QUESTION = "Which shape is in the picture?"
EXAMPLES = [("lora_a_64x48", "circle"), ("lora_b_48x80", "square")]


def peft_name(param_name: str) -> str:
    """In-memory `...lora_A.default.weight` -> the saved `...lora_A.weight` (adapter_model names)."""
    return param_name.replace(".default.", ".")


def build_batch(processor, image_token_id: int):
    """Two conversations with their answers, right-padded; labels on the answer tokens and the
    `<|im_end|>` that closes the assistant turn, -100 everywhere else (prompt, final newline, pads)."""
    import torch

    tok = processor.tokenizer
    texts, prompts, images = [], [], []
    for image_name, answer in EXAMPLES:
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
        prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template(
            [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            add_generation_prompt=False, tokenize=False)
        assert full.startswith(prompt), (prompt, full)
        texts.append(full)
        prompts.append(prompt)
        images.append([common.load_image(IMAGES / f"{image_name}.png")])
    tok.padding_side = "right"
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt", do_convert_rgb=True)
    labels = torch.full_like(batch["input_ids"], -100)
    spans = []
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=False)):
        # The prompt's expanded length: the processor on the prompt alone.
        n_prompt = processor(images=[image], text=[prompt], return_tensors="pt",
                             do_convert_rgb=True)["input_ids"].shape[1]
        ids = batch["input_ids"][i].tolist()
        end = max(j for j, t in enumerate(ids) if t == tok.convert_tokens_to_ids("<|im_end|>"))
        assert end >= n_prompt
        labels[i, n_prompt : end + 1] = batch["input_ids"][i, n_prompt : end + 1]
        spans.append([n_prompt, end + 1])
    assert int((batch["input_ids"] == image_token_id).sum()) > 0
    return dict(batch), labels, spans, prompts, images


def answer_loss(logits, labels):
    """Mean cross-entropy over all labelled tokens of the batch; logits at t predict token t+1."""
    import torch

    # At least f32 (transformers upcasts too), but keep f64 when the drift check runs in f64.
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_logits = shift_logits.to(torch.promote_types(shift_logits.dtype, torch.float32))
    shift_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="mean")


def seeded_lora_init(model) -> None:
    """A ~ N(0, 1/in), B ~ N(0, 0.1^2): peft's zero B would make every B gradient the only
    non-zero one and leave the A path untested."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def last_logits(model, processor, prompt: str, image):
    import torch

    inputs = processor(images=[image], text=[prompt], return_tensors="pt", do_convert_rgb=True)
    with torch.no_grad():
        return model(**inputs).logits[0, -1].detach().clone()


def make_peft_model(base):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                        exclude_modules=EXCLUDE, bias="none", use_rslora=False, init_lora_weights=True)
    model = get_peft_model(base, config)
    seeded_lora_init(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n and "language_model" in n for n in names), names
    return model


def train(model, batch: dict, labels):
    """Gradients at the initial adapter, then STEPS AdamW steps on the same batch; returns
    (gradients by PEFT name, loss before each step, loss after the last)."""
    import torch

    lora_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(lora_params.values(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    step_losses = []
    grads = None
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        out = model(**batch)
        loss = answer_loss(out.logits, labels)
        # Same number as transformers' own labels loss, so either definition can be quoted.
        with torch.no_grad():
            hf = model(**batch, labels=labels).loss
        assert abs(float(hf) - float(loss.detach())) < 1e-5, (float(hf), float(loss.detach()))
        loss.backward()
        if step == 0:
            grads = {peft_name(n): p.grad.detach().clone() for n, p in lora_params.items()}
        step_losses.append(float(loss.detach()))
        optimizer.step()
    with torch.no_grad():
        final_loss = float(answer_loss(model(**batch).logits, labels))
    return grads, step_losses, final_loss


def f64_drift(ckpt: Path, batch: dict, labels, grads: dict, trained: dict, step_losses: list[float],
              final_loss: float) -> dict:
    """The same computation in f64: how far f32 itself is from exact, per quantity, to ground
    the tolerances in README.md."""
    import torch

    model = make_peft_model(load_model(ckpt, dtype=torch.float64))
    batch64 = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    grads64, losses64, final64 = train(model, batch64, labels)
    state64 = {peft_name(n): p.detach() for n, p in model.named_parameters() if ".lora_" in n}

    def rel(a, b):
        return max(float((a[k].double() - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in b)

    return {
        "step_losses_max_abs": max(abs(a - b) for a, b in zip(step_losses, losses64, strict=False)),
        "final_loss_abs": abs(final_loss - final64),
        "grad_max_abs": max(float((grads[k].double() - grads64[k]).abs().max()) for k in grads64),
        "grad_max_rel_to_tensor_max": rel(grads, grads64),
        "adapter_trained_max_abs": max(float((trained[k].double() - state64[k]).abs().max()) for k in state64),
        "step_losses_f64": losses64,
        "final_loss_f64": final64,
    }


def main() -> None:
    torch = common.setup_torch(SEED)
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    ckpt = CHECKPOINTS / CHECKPOINT
    processor = load_processor(ckpt)
    base = load_model(ckpt)
    image_token_id = base.config.image_token_id
    batch, labels, spans, prompts, images = build_batch(processor, image_token_id)

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    # Views of each example (the batch's pixel_values are these, normalised, example after example).
    ip = processor.image_processor
    for i, (image,) in enumerate(images):
        _, patches_u8 = uint8_views(ip, image, {"do_convert_rgb": True})
        single = processor(images=[[image]], text=["<image>"], return_tensors="pt", do_convert_rgb=True)
        check_normalisation(single["pixel_values"], patches_u8, single["pixel_attention_mask"].numpy())
        write_views(views_from_patches(patches_u8, single["spatial_shapes"], ip.encoder_patch_size),
                    OUT / "views" / f"ex{i}")

    infer_prompt, infer_image = prompts[0], images[0]
    logits_base = last_logits(base, processor, infer_prompt, infer_image)

    model = make_peft_model(base)
    model.save_pretrained(OUT / "adapter_init")
    logits_init = last_logits(model, processor, infer_prompt, infer_image)
    grads, step_losses, final_loss = train(model, batch, labels)
    model.save_pretrained(OUT / "adapter_trained")
    logits_trained = last_logits(model, processor, infer_prompt, infer_image)

    # The saved adapter names must be exactly the gradient names, and reload to the same logits.
    saved = load_file(OUT / "adapter_trained" / "adapter_model.safetensors")
    assert set(saved) == set(grads), sorted(set(saved) ^ set(grads))
    reloaded = PeftModel.from_pretrained(load_model(ckpt), OUT / "adapter_trained").eval()
    assert torch.allclose(last_logits(reloaded, processor, infer_prompt, infer_image), logits_trained, atol=1e-5)

    drift = f64_drift(ckpt, batch, labels, grads, saved, step_losses, final_loss)
    save_file(grads, OUT / "lora_grads.safetensors")
    inputs = processor(images=[infer_image], text=[infer_prompt], return_tensors="pt", do_convert_rgb=True)
    tensors = {
        "input_ids": batch["input_ids"].to(torch.int64),
        "attention_mask": batch["attention_mask"].to(torch.int64),
        "labels": labels.to(torch.int64),
        "pixel_attention_mask": batch["pixel_attention_mask"].to(torch.int64),
        "spatial_shapes": batch["spatial_shapes"].to(torch.int64),
        "loss": torch.tensor([step_losses[0]], dtype=torch.float32),
        "step_losses": torch.tensor(step_losses, dtype=torch.float32),
        "final_loss": torch.tensor([final_loss], dtype=torch.float32),
        "infer_input_ids": inputs["input_ids"].to(torch.int64),
        "logits_last_base": logits_base,
        "logits_last_init": logits_init,
        "logits_last_trained": logits_trained,
    }
    harness = {
        "checkpoint": CHECKPOINT,
        "examples": [{"image": f"images/{n}.png", "answer": a, "views": f"lora/views/ex{i}"}
                     for i, (n, a) in enumerate(EXAMPLES)],
        "question": QUESTION,
        "texts": [processor.tokenizer.decode(ids, skip_special_tokens=False) for ids in batch["input_ids"].tolist()],
        "label_spans": spans,
        "num_label_tokens": int((labels != -100).sum()),
        "padding": "right, <|pad|> (id 0), attention_mask 0, labels -100",
        "loss": "mean cross-entropy over every labelled token of the batch; logits at t predict labels at t+1",
        "lora": {"r": RANK, "lora_alpha": ALPHA, "scaling": ALPHA / RANK, "lora_dropout": 0.0,
                 "target_modules": TARGETS, "exclude_modules": EXCLUDE, "use_rslora": False, "bias": "none",
                 "init": f"A ~ N(0, 1/in_features), B ~ N(0, 0.01), torch.Generator seed {SEED}, "
                         "parameters in sorted name order"},
        "optimizer": {"name": "torch.optim.AdamW", "lr": LR, "betas": list(BETAS), "eps": EPS,
                      "weight_decay": WEIGHT_DECAY, "amsgrad": False, "steps": STEPS,
                      "schedule": "constant", "grad_clipping": None, "batch": "the same batch every step"},
        "step_losses": step_losses,
        "final_loss": final_loss,
        "infer_prompt": infer_prompt,
        "infer_image": f"images/{EXAMPLES[0][0]}.png",
        "f32_vs_f64": drift,
        "num_lora_tensors": len(grads),
        "num_trainable_parameters": int(sum(g.numel() for g in grads.values())),
        "versions": common.versions(),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "lora_reference.safetensors",
              metadata={"harness": json.dumps(harness, sort_keys=True)})
    # peft writes absolute local paths into the config; keep the committed files machine-neutral.
    for sub in ("adapter_init", "adapter_trained"):
        cfg_path = OUT / sub / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = f"tests/fixtures/reference/checkpoints/{CHECKPOINT}"
        # peft stores the targets as a set, whose order changes with Python's hash seed.
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        readme = OUT / sub / "README.md"
        if readme.exists():
            readme.unlink()
    print(json.dumps({k: harness[k] for k in ("step_losses", "final_loss", "label_spans", "num_label_tokens",
                                              "num_lora_tensors", "num_trainable_parameters", "f32_vs_f64")}))


if __name__ == "__main__":
    main()
