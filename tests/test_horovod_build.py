"""The installed Horovod matches what install/horovod/build_wheel.sh should have built here:
NCCL GPU operations where torch is a CUDA build and nvcc exists at the CUDA home, Gloo always.

Fast (one subprocess that imports horovod.torch, no training, no GPU needed). Skips, with the
reason, where horovod is not installed or the machine has no CUDA toolkit (the install builds a
Gloo-only Horovod there) or CXR_HOROVOD_GPU=0 asked for one."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("horovod") is None,
                                reason="horovod is not installed: run `make install` (see install/horovod)")

PROBE = r"""
import glob, json, os, torch, horovod.torch as hvd
ext = glob.glob(os.path.join(os.path.dirname(hvd.__file__), "mpi_lib_v2*.so"))
print(json.dumps({"nccl": hvd.nccl_built(), "gloo": bool(hvd.gloo_built()), "mpi": bool(hvd.mpi_built()),
                  "cuda": torch.version.cuda, "ext": ext[0] if ext else None}))
"""


@pytest.fixture(scope="module")
def built():
    # A fresh interpreter: what `python -c "import horovod.torch as h; print(h.nccl_built())"` sees.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent)
    assert out.returncode == 0, f"import horovod.torch failed:\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def expected_cuda_home(torch_cuda: str | None) -> Path | None:
    if not torch_cuda:
        return None
    return Path(os.environ.get("CXR_CUDA_HOME", f"/usr/local/cuda-{torch_cuda}"))


def test_gloo_always_built(built):
    assert built["gloo"], "horovod was built without Gloo (CPU training needs it)"
    assert not built["mpi"]


def test_nccl_built_where_nvcc_exists(built):
    if os.environ.get("CXR_HOROVOD_GPU") == "0":
        pytest.skip("CXR_HOROVOD_GPU=0: the install builds a Gloo-only Horovod on purpose")
    home = expected_cuda_home(built["cuda"])
    if home is None:
        pytest.skip("torch is a CPU build: the install builds a Gloo-only Horovod")
    if not os.access(home / "bin" / "nvcc", os.X_OK):
        pytest.skip(f"no nvcc at {home}/bin/nvcc (set CXR_CUDA_HOME): the install builds a Gloo-only Horovod")
    assert built["nccl"], (f"nvcc exists at {home} but horovod.torch.nccl_built() is {built['nccl']!r}: "
                           "rerun install/horovod/build_wheel.sh (the cached Gloo-only wheel is keyed apart)")


def test_extension_finds_libnccl_without_torch_preloaded(built):
    """libnccl.so.2 comes from the venv's pip NCCL; the extension's RUNPATH must find it even
    for a loader that did not import torch first (ldd), not just through torch's copy."""
    if not built["nccl"]:
        pytest.skip("Gloo-only Horovod: no NCCL dependency")
    if built["ext"] is None or shutil.which("ldd") is None:
        pytest.skip("no ldd or extension file to inspect")
    out = subprocess.run(["ldd", built["ext"]], capture_output=True, text=True, timeout=60)
    nccl = [line.strip() for line in out.stdout.splitlines() if "libnccl" in line]
    assert nccl and "not found" not in nccl[0], f"ldd {built['ext']}:\n{out.stdout}"
