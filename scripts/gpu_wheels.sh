#!/usr/bin/env bash
# Download the wheels the GPU machine's image lacks into .whl/ (ignored by git),
# for scripts/gpu_check.sh: pydantic (+ core, annotated-types, typing-inspection,
# typing_extensions >= 4.16), datasets (+ dill, multiprocess), tensorboardX, and
# safetensors 0.8 (weights/safetensors_io.py needs >= 0.8; the image may have older).
# Pure-Python ones are version-pinned to what this checkout's venv resolved;
# the machine has Python 3.12 on x86-64. Then run the check with carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  tensorboardX==2.6.5 safetensors==0.8.0
ls .whl
