#!/usr/bin/env bash
# Download the wheels that a GPU machine without network lacks into .whl/ (git-ignored), to
# take along for scripts/gpu_check.py. That machine has PyTorch, huggingface-hub, accelerate,
# safetensors, tokenizers, psutil, scipy and pytest (the check runs its `gpu` tests with it;
# without it the check still measures, and reports the tests as not run), but not this
# project's diffusers, transformers, lpips or peft. There, before the check:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:. python3 scripts/gpu_check.py --out OUT
set -euo pipefail
cd "$(dirname "$0")/.."
pins() { grep -E "^($1)==" requirements.txt; }
rm -rf .whl && mkdir .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl $(pins 'diffusers|transformers|lpips|peft')
ls -l .whl
