#!/usr/bin/env bash
# Rebuilds every committed fixture under tests/fixtures/reference/ from scratch.
# Needs python3.11 with venv, PyPI (first run only) and ../shared (the real LFM2-VL-450M files).
# Usage: bash tests/reference/regenerate.sh   (from the repository root; ~2 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0

for v in 457 5; do
  if [ ! -x ".venv-$v/bin/python" ]; then
    python3 -m venv ".venv-$v"
    ".venv-$v/bin/pip" install -q -r "requirements-$v.txt"
  fi
done

rm -rf ../fixtures/reference
.venv-457/bin/python make_checkpoints.py      # images + checkpoints (4.57.6: Hub layout)
.venv-5/bin/python compute_references.py      # model/ and processor/ references (5.x)
.venv-5/bin/python lora_reference.py          # lora/ (5.x + peft)
.venv-5/bin/python jpeg_references.py         # jpeg/ (Pillow's JPEG encoder and decoder)
.venv-5/bin/python manifest.py                # manifest.json: size and sha256 of every file
