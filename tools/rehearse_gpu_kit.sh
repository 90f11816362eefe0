#!/usr/bin/env bash
# Rehearse the GPU kit under the lent machine's Python 3.12 / torch 2.11 / torchvision 0.26, on
# the CPU (docs/gpu-kit.md). Needs python3.12 on PATH (pyenv has it here) and a built kit
# (`make gpu-kit`); about 10 minutes, mostly downloads and the install. Run from the repo root.
set -euo pipefail
python3.12 -m venv /tmp/py312                       # pyenv has 3.12 on the dev machine
/tmp/py312/bin/pip download --no-deps -d /tmp/whl torch==2.11.0 torchvision==0.26.0
/tmp/py312/bin/pip install --no-deps /tmp/whl/*.whl
/tmp/py312/bin/pip install numpy pandas pyarrow scikit-learn scipy tifffile matplotlib pyyaml \
    tqdm fsspec psutil pytest pytest-timeout requests click filelock msgpack protobuf packaging \
    attrs aiohttp grpcio jinja2 sympy networkx "setuptools<82" wheel six prometheus-client wrapt \
    joblib threadpoolctl pillow "cuda-bindings>=13.0.3,<14"
ln -s $PWD/.venv/lib/python3.11/site-packages/nvidia /tmp/py312/lib/python3.12/site-packages/
mkdir /tmp/src && cp .gpukit/part-* .gpukit/manifest.json /tmp/src/   # receive moves parts
for i in 1 2 3 4 5; do /tmp/py312/bin/python tools/gpu_kit.py receive $i --src /tmp/src; done
/tmp/py312/bin/python tools/gpu_kit.py install --target /tmp/site
PYTHONPATH=/tmp/site:$PWD /tmp/py312/bin/python bench/gpu_check.py --cpu-smoke --budget 560
