#!/usr/bin/env bash
# Create the project's virtual environment with the measured-compatible stack, Petastorm
# without its setuptools<70 pin, and Horovod built from a patched sdist (install/horovod).
# Safe to rerun: it does nothing when the inputs have not changed since the last success.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.cxr-installed"
# CXR_HOROVOD_GPU (auto|0|1) and CXR_CUDA_HOME choose an NCCL or a Gloo-only Horovod (install/horovod/README.md).
inputs=$( (cat install/requirements.txt setup.py install/setup_env.sh install/delta_jars.sh install/horovod/*
           echo "horovod_gpu=${CXR_HOROVOD_GPU:-auto} cuda_home=${CXR_CUDA_HOME:-}") | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ]; then
  echo "environment $VENV is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip 'setuptools>=77' wheel
echo "installing the pinned stack (from the package index; pip's cache keeps the downloads)..."
"${pip[@]}" install --quiet -r install/requirements.txt
# petastorm 0.13.1 pins setuptools<70, which would break torch: its runtime deps are in requirements.txt.
"${pip[@]}" install --quiet --no-deps petastorm==0.13.1
"${pip[@]}" install --quiet --no-deps -e .
bash install/delta_jars.sh "$VENV/bin/python"
bash install/horovod/build_wheel.sh "$VENV/bin/python"
"$VENV/bin/python" - <<'PY'
import delta, deltalake, petastorm, pyspark, torch, torchvision, horovod.torch as hvd
import pyarrow, numpy
assert pyarrow.__version__.startswith("14."), pyarrow.__version__
assert numpy.__version__.startswith("1."), numpy.__version__
nccl = hvd.nccl_built()
print(f"ok: torch {torch.__version__}, pyspark {pyspark.__version__}, petastorm {petastorm.__version__}, "
      f"pyarrow {pyarrow.__version__}, deltalake {deltalake.__version__}, horovod {hvd.__version__ if hasattr(hvd, '__version__') else 'built'} "
      f"({'NCCL %d + Gloo' % nccl if nccl else 'Gloo only'})")
PY
echo "$inputs" > "$stamp"
