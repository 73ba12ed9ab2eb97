#!/usr/bin/env bash
# Builds llama.cpp for the GGUF cross-checks (tests/it/gguf_export.rs) into a cache outside the
# checkout, from the llama.cpp that PyPI's `llama_cpp_python` sdist vendors (pinned + sha256).
#
#   bash tests/llama_cpp/build.sh [all|bins|converter]   # prints the cache folder on its last line
#
# The cache (${VLMPIPE_LLAMA_CPP_CACHE:-$HOME/.cache/vlmpipe/llama.cpp-$VERSION}) holds:
#   bin/llama-mtmd-cli bin/llama-quantize bin/llama-gguf   CPU build, tuned to this CPU
#   src/                                                  vendor/llama.cpp (convert_hf_to_gguf.py, gguf-py)
#   venv/bin/python                                       the converter's Python (vendored gguf-py,
#                                                         transformers, torch, sentencepiece)
# Each step leaves a stamp; a second run with the stamps in place does nothing (about a second).
# An interrupted run (CI gives it a time budget: .ci/run) resumes where it stopped: the download
# and pip's cache are kept, and cmake rebuilds only what is missing. The converter comes before
# the binaries, which take the longest (an hour and more on 2 busy cores).
# GGML_NATIVE=ON: the tests run 450M-shaped models, which a baseline x86-64 build runs several
# times slower; the stamp records the CPU's flags, so a cache carried to another CPU rebuilds.
set -euo pipefail

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
# The converter's pins (vendor/llama.cpp/requirements/requirements-convert_*.txt name torch
# 2.11 from PyTorch's own index, which is not reachable here; 2.9.1 from PyPI works).
CONVERTER_DEPS=(torch==2.9.1 transformers==4.57.6 "numpy~=2.2.6" "sentencepiece>=0.1.98,<0.3.0"
  "protobuf>=4.21.0,<5.0.0" safetensors==0.8.0 pyyaml requests tqdm)

CACHE="${VLMPIPE_LLAMA_CPP_CACHE:-$HOME/.cache/vlmpipe/llama.cpp-$VERSION}"
JOBS="${VLMPIPE_LLAMA_CPP_JOBS:-2}"
PYTHON="${PYTHON:-python3}"
WHAT="${1:-all}"
case "$WHAT" in all | bins | converter) ;; *) echo "usage: $0 [all|bins|converter]" >&2; exit 2 ;; esac
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"

# One writer per step and cache (two shells, or `bins` and `converter` side by side).
lock() { exec 9>"$CACHE/.lock-$1"; flock 9; }

say() { echo "llama.cpp build: $*" >&2; }

cpu_key() {
  # The flags GGML_NATIVE compiles for; a different CPU gets a fresh build.
  { grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m; } | sha256sum | cut -c1-16
}

# 1. Sources: the sdist, checked against the pinned sha256.
lock src
if [ ! -f "$CACHE/src/.ok" ]; then
  dl="$CACHE/download"
  mkdir -p "$dl"
  sdist="$dl/llama_cpp_python-$VERSION.tar.gz"
  if [ ! -f "$sdist" ] || ! echo "$SHA256  $sdist" | sha256sum -c --quiet - 2>/dev/null; then
    rm -f "$sdist"
    say "downloading llama_cpp_python==$VERSION (sdist) from PyPI"
    # Only this package from source; its build tools (cmake, scikit-build-core) as wheels.
    "$PYTHON" -m pip download -q --no-deps --no-binary llama_cpp_python \
      "llama_cpp_python==$VERSION" -d "$dl"
  fi
  if ! echo "$SHA256  $sdist" | sha256sum -c --quiet -; then
    say "sha256 of $sdist does not match the pinned $SHA256"
    exit 1
  fi
  rm -rf "$CACHE/src" "$CACHE/src.tmp"
  mkdir -p "$CACHE/src.tmp"
  tar -xzf "$sdist" -C "$CACHE/src.tmp" --strip-components=3 \
    "llama_cpp_python-$VERSION/vendor/llama.cpp"
  mv "$CACHE/src.tmp" "$CACHE/src"
  touch "$CACHE/src/.ok"
fi

# 2. The converter's Python: its dependencies and the vendored gguf-py.
if [ "$WHAT" != bins ]; then
  lock venv
  VENV="$CACHE/venv"
  if [ ! -f "$VENV/.ok" ]; then
    say "creating $VENV (the converter's dependencies: torch, transformers, ...)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "${CONVERTER_DEPS[@]}"
    # The vendored gguf-py, so the converter and its writer are the same llama.cpp revision.
    "$VENV/bin/python" -m pip install -q --no-deps "$CACHE/src/gguf-py"
    "$VENV/bin/python" -c "import torch, transformers, gguf, sentencepiece"
    touch "$VENV/.ok"
  fi
fi

# 3. The binaries (cmake from a small venv when the system has none).
if [ "$WHAT" != converter ]; then
  lock bins
  KEY="$(cpu_key)"
  if [ ! -f "$CACHE/bin/.ok" ] || [ "$(cat "$CACHE/bin/.ok")" != "$KEY" ]; then
    CMAKE=cmake
    if ! command -v cmake >/dev/null 2>&1; then
      CMAKE="$CACHE/tools/bin/cmake"
      if [ ! -x "$CMAKE" ]; then
        rm -rf "$CACHE/tools"
        "$PYTHON" -m venv "$CACHE/tools"
        "$CACHE/tools/bin/python" -m pip install -q cmake
      fi
    fi
    build="$CACHE/build-$KEY"
    say "building llama-mtmd-cli, llama-quantize, llama-gguf in $build (-j$JOBS; tens of minutes on 2 cores)"
    "$CMAKE" -S "$CACHE/src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
      -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >"$CACHE/cmake.log" 2>&1 \
      || { tail -30 "$CACHE/cmake.log" >&2; exit 1; }
    nice "$CMAKE" --build "$build" -j "$JOBS" --target llama-mtmd-cli llama-quantize llama-gguf \
      >"$CACHE/build.log" 2>&1 || { tail -30 "$CACHE/build.log" >&2; exit 1; }
    mkdir -p "$CACHE/bin"
    for tool in llama-mtmd-cli llama-quantize llama-gguf; do
      cp "$build/bin/$tool" "$CACHE/bin/$tool"
    done
    echo "$KEY" >"$CACHE/bin/.ok"
  fi
fi

echo "$CACHE"
