#!/usr/bin/env bash
# The wheels that a GPU machine lent through this workplace's `device` tool lacks, at the versions this checkout is
# tested with, into .whl/ (git-ignored), for the device call in benchmarks/README.md ("The GPU check").
#
#     bash benchmarks/gpu_wheels.sh          # here, with the project's virtual environment active
#
# That machine's image has Python 3.12 with torch (CUDA), transformers, peft, accelerate, safetensors, imageio,
# opencv and typer, but no diffusers. diffusers, peft and transformers travel at this environment's versions
# (pure-Python wheels, about 21 MB together; the call carries at most 64 MiB). Their other needs are in the image
# at versions that fit (transformers 5.23 asks regex>=2025.10.22, as the image's 5.17 does; huggingface-hub 1.33,
# tokenizers 0.23.2). imageio-ffmpeg (68 MB) does not fit: the GPU check writes no MP4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
pins=()
for pkg in diffusers peft transformers; do
    pins+=("$pkg==$($PY -c "import importlib.metadata as m; print(m.version('$pkg'))")")
done
mkdir -p .whl
rm -f .whl/*.whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls -l .whl
du -ch .whl/*.whl | tail -1
