#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.py needs on the lent GPU machine and its image lacks.
#
# That image (Python 3.12, torch 2.11, accelerate 1.15, transformers 5.17; x86-64) has no
# deepspeed, hjson or pydantic and reaches no package index, so the wheels travel with the
# working tree. Run here, from the repository root, once:
#
#     bash benchmarks/device_wheels.sh            # -> .device_wheels/ (gitignored), ~3 MiB
#
# then, on the device machine (the `run` tool with carry [".device_wheels"]), the one command:
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
#         .device_wheels/*.whl && PYTHONPATH=.:/tmp/site python3 benchmarks/gpu_check.py \
#         --output_dir $OUT
#
# deepspeed's other requirements (einops, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo,
# tqdm, nvidia-ml-py) are in that image already; typing-extensions too.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.device_wheels}
mkdir -p "$DIR"
PLATFORM=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux_2_28_x86_64)
# pure-Python wheels (deepspeed ships only an sdist: build its wheel without compiling ops)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" deepspeed==0.19.8
python3 -m pip download -q --no-deps --only-binary=:all: -d "$DIR" --python-version 3.12 \
    --implementation py hjson==3.1.0 annotated-types==0.7.0 typing-inspection==0.4.2 \
    pydantic==2.13.4
# the one compiled wheel: pydantic-core for CPython 3.12, x86-64 (pydantic 2.13.4 pins 2.46.4)
python3 -m pip download -q --no-deps --only-binary=:all: -d "$DIR" --python-version 3.12 \
    --implementation cp --abi cp312 "${PLATFORM[@]}" pydantic-core==2.46.4
ls -l "$DIR"
total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
echo "total: $total bytes"
if [ "$total" -ge $((16 * 1024 * 1024)) ]; then
    echo "error: the wheels take $total bytes; keep them well under the 64 MiB a run carries" >&2
    exit 1
fi
