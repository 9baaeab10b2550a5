#!/usr/bin/env bash
# Build (or reuse a cached) Horovod 0.28.1 wheel for this venv's torch:
# PyTorch + Gloo (no MPI / TensorFlow / MXNet), plus NCCL GPU operations
# (HOROVOD_GPU_OPERATIONS=NCCL, against the venv's pip NCCL) where torch is a CUDA
# build and nvcc exists at the CUDA home; Gloo-only otherwise. Then install it
# into the venv and verify it. See README.md in this directory.
#
# Usage: install/horovod/build_wheel.sh [/path/to/venv/bin/python]   (or PYTHON=...)
#
# Environment knobs:
#   CXR_WHEEL_CACHE     wheel cache root (default: $HOME/.cache/cxr-pipeline/wheels)
#   CXR_BUILD_LOG_DIR   where build logs go (default: $HOME/.cache/cxr-pipeline/logs)
#   CXR_BUILD_JOBS      parallel compile jobs (default: nproc)
#   CXR_CUDA_HOME       CUDA toolkit matching torch.version.cuda (default: /usr/local/cuda-<ver>)
#   CXR_HOROVOD_GPU     auto (default): NCCL where $CXR_CUDA_HOME/bin/nvcc and the venv's NCCL
#                       exist, else Gloo-only; 0: Gloo-only (CPU); 1: NCCL or fail
#   CXR_KEEP_BUILD_DIR  set to 1 to keep the temporary build directory
#   CXR_HOROVOD_FORCE_REBUILD  set to 1 to ignore the cached wheel
#
# Any failure prints "FAILED: ..." with the log file path and the log's tail,
# and exits non-zero.
set -euo pipefail

HVD_VERSION=0.28.1
# sha256 of horovod-0.28.1.tar.gz on PyPI (pip verifies the download too; this
# pins the exact sdist that patch_cmake.py was written against).
HVD_SDIST_SHA256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PATCH_SCRIPT="$SCRIPT_DIR/patch_cmake.py"

PYTHON="${1:-${PYTHON:-}}"
if [[ -z "$PYTHON" ]]; then
    echo "usage: $0 /path/to/venv/bin/python   (or set PYTHON)" >&2
    exit 2
fi
if [[ ! -x "$PYTHON" ]]; then
    echo "FAILED: python '$PYTHON' is not an executable" >&2
    exit 2
fi
# Keep the venv's bin dir (do not resolve symlinks: that would leave the venv).
VENV_BIN="$(cd "$(dirname "$PYTHON")" && pwd)"
PYTHON="$VENV_BIN/$(basename "$PYTHON")"
export PATH="$VENV_BIN:$PATH"   # venv's cmake (<4), horovodrun, pip

CACHE_ROOT="${CXR_WHEEL_CACHE:-$HOME/.cache/cxr-pipeline/wheels}"
LOG_DIR="${CXR_BUILD_LOG_DIR:-$HOME/.cache/cxr-pipeline/logs}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/horovod-$HVD_VERSION-$(date +%Y%m%d-%H%M%S)-$$.log"
: >"$LOG"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cxr-horovod-build.XXXXXX")"
STEP="start"

REPORTED=0
ERR_RE="CMake Error|: error:|fatal error|multiple definition|undefined reference|No such file"
fail() {  # fail [rc]: report (via the EXIT trap) and exit non-zero
    local rc=${1:-1}
    [[ "$rc" -eq 0 ]] && rc=1
    exit "$rc"
}
on_exit() {
    local rc=$?
    if [[ $rc -ne 0 && $REPORTED -eq 0 ]]; then
        REPORTED=1
        {
            echo
            echo "================================================================"
            echo "FAILED: horovod $HVD_VERSION install, step: $STEP (exit $rc)"
            echo "Full log: $LOG"
            # Compiler/CMake errors are usually far above pip's traceback: show the first ones.
            if grep -qE "$ERR_RE" "$LOG" 2>/dev/null; then
                echo "------------------------- first errors -------------------------"
                grep -n -m 5 -A 6 -E "$ERR_RE" "$LOG" | cut -c1-300 || true
            fi
            echo "---------------------------- log tail --------------------------"
            tail -n 40 "$LOG" 2>/dev/null || true
            echo "================================================================"
            echo "FAILED: horovod $HVD_VERSION install, step: $STEP -- see $LOG"
            if [[ "${GPU_OPS:-}" == NCCL ]]; then
                echo "(this was an NCCL build; CXR_HOROVOD_GPU=0 builds the Gloo-only (CPU) wheel instead)"
            fi
        } >&2
    fi
    if [[ "${CXR_KEEP_BUILD_DIR:-0}" == 1 ]]; then
        echo "[horovod] build dir kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
# Any non-zero exit (explicit fail or set -e) is reported with the log tail.
trap on_exit EXIT

say() { echo "[horovod $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
# run "step description" cmd args...   -> output appended to $LOG, fail loudly
run() {
    STEP="$1"; shift
    say "$STEP"
    echo "+ $*" >>"$LOG"
    "$@" >>"$LOG" 2>&1 || fail $?
}
# Python one-liners run from the empty work dir so that a ./horovod or ./torch
# in the caller's cwd can never shadow the installed packages.
py() { (cd "$WORK" && "$PYTHON" "$@"); }

say "python: $PYTHON"
say "log:    $LOG"

STEP="inspect torch"
TORCH_INFO="$(py -c 'import sys, torch
print(torch.__version__, torch.version.cuda or "none", int(torch.compiled_with_cxx11_abi()),
      "cp%d%d" % sys.version_info[:2])' 2>>"$LOG")"
read -r TORCH_VERSION TORCH_CUDA TORCH_CXX11_ABI PY_TAG <<<"$TORCH_INFO"
[[ "$TORCH_CUDA" == none ]] && TORCH_CUDA=""
PATCH_SHA="$(sha256sum "$PATCH_SCRIPT" | cut -c1-12)"
say "torch $TORCH_VERSION (cuda: ${TORCH_CUDA:-none}, cxx11 abi: $TORCH_CXX11_ABI), $PY_TAG, patch $PATCH_SHA"

# ---------------------------------------------------------------- NCCL or Gloo-only?
GPU_REQ="${CXR_HOROVOD_GPU:-auto}"
case "$GPU_REQ" in
    auto|0|1) ;;
    *) STEP="check CXR_HOROVOD_GPU: must be auto, 0 or 1, got '$GPU_REQ'"; echo "$STEP" >>"$LOG"; fail 2 ;;
esac
CUDA_DIR=""
[[ -n "$TORCH_CUDA" ]] && CUDA_DIR="${CXR_CUDA_HOME:-/usr/local/cuda-$TORCH_CUDA}"
# The venv's pip NCCL (nvidia-nccl-cu*, a torch dependency): "<include dir> <lib file> <version>".
STEP="look for NCCL in the venv"
NCCL_INFO="$(py -c 'import glob, os, re, site, sysconfig
dirs = [sysconfig.get_paths()[k] for k in ("platlib", "purelib")] + site.getsitepackages()
for d in dict.fromkeys(dirs):
    inc, libs = os.path.join(d, "nvidia", "nccl", "include"), sorted(glob.glob(os.path.join(d, "nvidia", "nccl", "lib", "libnccl.so.[0-9]*")))
    if os.path.isfile(os.path.join(inc, "nccl.h")) and libs:
        h = open(os.path.join(inc, "nccl.h")).read()
        v = ".".join(re.search(r"#define NCCL_%s\s+(\d+)" % k, h).group(1) for k in ("MAJOR", "MINOR", "PATCH"))
        print(inc, libs[0], v)
        break' 2>>"$LOG")" || NCCL_INFO=""
read -r NCCL_INCLUDE NCCL_LIBFILE NCCL_VERSION <<<"$NCCL_INFO" || true
GLOO_REASON=""
if [[ "$GPU_REQ" == 0 ]]; then
    GLOO_REASON="CXR_HOROVOD_GPU=0"
elif [[ -z "$TORCH_CUDA" ]]; then
    GLOO_REASON="torch $TORCH_VERSION is a CPU build"
elif [[ ! -x "$CUDA_DIR/bin/nvcc" ]]; then
    GLOO_REASON="no nvcc at $CUDA_DIR/bin/nvcc (set CXR_CUDA_HOME to the CUDA $TORCH_CUDA toolkit)"
elif [[ -z "$NCCL_INCLUDE" ]]; then
    GLOO_REASON="no NCCL in the venv (site-packages/nvidia/nccl/include/nccl.h + lib/libnccl.so.N)"
fi
if [[ -z "$GLOO_REASON" ]]; then
    GPU_OPS=NCCL
    say "GPU operations: NCCL $NCCL_VERSION ($NCCL_LIBFILE), nvcc $CUDA_DIR/bin/nvcc; Gloo for CPU tensors"
elif [[ "$GPU_REQ" == 1 ]]; then
    STEP="CXR_HOROVOD_GPU=1 but an NCCL build is not possible: $GLOO_REASON"
    echo "$STEP" >>"$LOG"
    fail 1
else
    GPU_OPS=none
    say "GPU operations: none -- Gloo-only (CPU) Horovod: $GLOO_REASON"
fi

# Cache key: horovod version / torch version (incl. local tag, e.g. +cu130) / NCCL or not
# (Gloo-only wheels keep the original torch-<ver> directory, NCCL ones use torch-<ver>-nccl);
# python tag is in the wheel file name; patch hash and GPU operations are checked via build-info.txt.
if [[ "$GPU_OPS" == NCCL ]]; then
    CACHE_DIR="$CACHE_ROOT/horovod-$HVD_VERSION/torch-$TORCH_VERSION-nccl"
else
    CACHE_DIR="$CACHE_ROOT/horovod-$HVD_VERSION/torch-$TORCH_VERSION"
fi
# Earlier patch_cmake.py revisions whose Gloo-only edits are byte-identical to this one's
# (its NCCL RUNPATH edit is applied only with --nccl-rpath), so their Gloo wheels stay valid.
# Empty this list whenever an edit that also applies to Gloo-only builds changes.
GLOO_COMPATIBLE_PATCH_SHAS="98f4d362c605"
cache_entry_ok() {  # build-info.txt matches this patch and these GPU operations
    local info="$CACHE_DIR/build-info.txt" sha
    [[ -f "$info" ]] || return 1
    if [[ "$GPU_OPS" == NCCL ]]; then
        grep -qxF "gpu_operations=NCCL" "$info" || return 1
    else
        ! grep -q "^gpu_operations=" "$info" || grep -qxF "gpu_operations=none" "$info" || return 1
    fi
    grep -qxF "patch_sha=$PATCH_SHA" "$info" && return 0
    [[ "$GPU_OPS" == none ]] || return 1
    for sha in $GLOO_COMPATIBLE_PATCH_SHAS; do
        grep -qxF "patch_sha=$sha" "$info" && return 0
    done
    return 1
}

install_runtime_deps() {
    # horovod's install_requires; the wheel itself is installed with --no-deps
    # so pip can never touch torch.
    if ! py -c 'import cloudpickle, psutil, yaml, packaging' >>"$LOG" 2>&1; then
        run "install horovod runtime deps" "$PYTHON" -m pip install cloudpickle psutil pyyaml packaging
    fi
}

verify() {  # verify [STAGE_DIR]: check the installed horovod, or one staged by pip --target
    local stage="${1:-}" where="the venv" hvdrun="$VENV_BIN/horovodrun"
    if [[ -n "$stage" ]]; then
        where="staging dir $stage"
        hvdrun="$stage/bin/horovodrun"
    fi
    local pp="${stage:+$stage${PYTHONPATH:+:}}${PYTHONPATH:-}"   # staged horovod first
    STEP="verify ($where): import horovod.torch, hvd.init(), gloo_built(), nccl_built()"
    say "$STEP"
    PYTHONPATH="$pp" CXR_STAGE="$stage" CXR_WANT_NCCL=$([[ "$GPU_OPS" == NCCL ]] && echo 1 || echo 0) py -c '
import os, horovod, horovod.torch as hvd
stage = os.environ["CXR_STAGE"]
assert not stage or horovod.__file__.startswith(stage + os.sep), "not the staged horovod: " + horovod.__file__
hvd.init()
assert hvd.gloo_built(), "horovod was built without Gloo"
assert not hvd.mpi_built(), "horovod unexpectedly built with MPI"
if os.environ["CXR_WANT_NCCL"] == "1":
    assert hvd.nccl_built(), "horovod was built without NCCL"
else:
    assert not hvd.nccl_built(), "expected a Gloo-only horovod, got an NCCL build"
print("horovod", horovod.__version__, "from", horovod.__file__, "rank", hvd.rank(), "size", hvd.size(),
      "gloo_built", hvd.gloo_built(), "nccl_built", hvd.nccl_built())
hvd.shutdown()
' >>"$LOG" 2>&1 || fail $?
    if [[ "$GPU_OPS" == NCCL && -z "$stage" ]]; then
        # The extension needs libnccl.so.2. `import horovod.torch` imports torch first, which
        # loads it; the RUNPATH set by patch_cmake.py --nccl-rpath also lets ldd find it alone.
        STEP="verify: ldd of the torch extension finds libnccl"
        local ext deps
        ext="$(py -c 'import glob, os, horovod.torch as h; print(glob.glob(os.path.join(os.path.dirname(h.__file__), "mpi_lib_v2*.so"))[0])')" || fail 1
        deps="$(ldd "$ext" 2>&1)" || true
        echo "ldd $ext:" >>"$LOG"; echo "$deps" >>"$LOG"
        if echo "$deps" | grep -q "libnccl.*not found"; then
            say "WARNING: ldd does not resolve libnccl for $ext (its RUNPATH: $(readelf -d "$ext" 2>/dev/null | sed -n 's/.*R.*PATH.*\[\(.*\)\]/\1/p')); import still works because torch loads it first"
        else
            say "ldd: $(echo "$deps" | grep -m1 libnccl | sed 's/^[[:space:]]*//')"
        fi
    fi

    STEP="verify ($where): horovodrun --check-build"
    say "$STEP"
    local out
    out="$(cd "$WORK" && PYTHONPATH="$pp" "$hvdrun" --check-build 2>&1)" \
        || { echo "$out" >>"$LOG"; fail 1; }
    echo "$out" >>"$LOG"
    echo "$out" | grep -qF '[X] PyTorch' || { echo "check-build: PyTorch not available" >>"$LOG"; fail 1; }
    echo "$out" | grep -qF '[X] Gloo' || { echo "check-build: Gloo not available" >>"$LOG"; fail 1; }
    if [[ "$GPU_OPS" == NCCL ]]; then
        echo "$out" | grep -qF '[X] NCCL' || { echo "check-build: NCCL not available" >>"$LOG"; fail 1; }
        say "verified ($where): horovod $HVD_VERSION with PyTorch + Gloo + NCCL GPU operations"
    else
        say "verified ($where): horovod $HVD_VERSION with PyTorch + Gloo (no NCCL)"
    fi
}

# ---------------------------------------------------------------- cache hit
shopt -s nullglob
cached=("$CACHE_DIR"/horovod-"$HVD_VERSION"-"$PY_TAG"-*.whl)
shopt -u nullglob
if [[ "${CXR_HOROVOD_FORCE_REBUILD:-0}" != 1 && ${#cached[@]} -eq 1 ]] && cache_entry_ok; then
    say "using cached wheel ${cached[0]}"
    install_runtime_deps
    run "install cached wheel" "$PYTHON" -m pip install --no-deps --force-reinstall "${cached[0]}"
    verify
    say "done (cache hit). To rebuild: rm -rf '$CACHE_DIR'"
    exit 0
fi
if [[ ${#cached[@]} -gt 0 ]]; then
    say "cached wheel in $CACHE_DIR is stale or ambiguous (patch/python changed or force rebuild); rebuilding"
fi

# ---------------------------------------------------------------- build
STEP="check cmake"
CMAKE_VER="$(cmake --version 2>>"$LOG" | head -n1)" || fail 1
say "using $(command -v cmake): $CMAKE_VER"
# Gloo's bundled CMakeLists has an old cmake_minimum_required(); cmake 4.x
# refuses it unless this is set (ignored by cmake 3.x).
export CMAKE_POLICY_VERSION_MINIMUM=3.5

STEP="detect torch C++ standard"
TORCH_CFG="$(py -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "share/cmake/Torch/TorchConfig.cmake"))')"
CXX_STD="$(sed -n 's/^[[:space:]]*CXX_STANDARD[[:space:]]\+\([0-9]\+\).*/\1/p' "$TORCH_CFG" 2>>"$LOG" | head -n1)"
if [[ -z "$CXX_STD" ]]; then
    echo "could not find 'CXX_STANDARD <n>' in $TORCH_CFG" >>"$LOG"
    fail 1
fi
say "torch requires C++$CXX_STD (from $TORCH_CFG)"

run "download horovod $HVD_VERSION sdist" \
    "$PYTHON" -m pip download --no-deps --no-binary :all: --no-build-isolation \
    "horovod==$HVD_VERSION" -d "$WORK/sdist"
STEP="check sdist sha256"
SDIST="$WORK/sdist/horovod-$HVD_VERSION.tar.gz"
got_sha="$(sha256sum "$SDIST" | cut -d' ' -f1)"
if [[ "$got_sha" != "$HVD_SDIST_SHA256" ]]; then
    echo "sha256 mismatch for $SDIST: got $got_sha, expected $HVD_SDIST_SHA256" >>"$LOG"
    fail 1
fi
run "unpack sdist" tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/horovod-$HVD_VERSION"
PATCH_ARGS=(--cxx-standard "$CXX_STD")
if [[ "$GPU_OPS" == NCCL ]]; then
    # RUNPATH of site-packages/horovod/torch/mpi_lib_v2*.so, relative to it: torch's libs,
    # the pip NCCL and, if torch ships one there, the CUDA runtime (nvidia/cu13/lib).
    STEP="compute the NCCL build's RUNPATH"
    NCCL_RPATH="$(NCCL_LIBFILE="$NCCL_LIBFILE" py -c 'import glob, os, torch
ext_dir = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "horovod", "torch")  # next to torch
nccl_lib = os.path.dirname(os.environ["NCCL_LIBFILE"])          # .../nvidia/nccl/lib
nvidia = os.path.dirname(os.path.dirname(nccl_lib))              # .../nvidia
dirs = [os.path.join(os.path.dirname(torch.__file__), "lib"), nccl_lib]
dirs += sorted({os.path.dirname(p) for p in glob.glob(os.path.join(nvidia, "*", "lib", "libcudart.so.[0-9]*"))})
print(";".join(dict.fromkeys("$ORIGIN/" + os.path.relpath(os.path.realpath(d), os.path.realpath(ext_dir)) for d in dirs)))' 2>>"$LOG")" || fail 1
    say "NCCL build: extension RUNPATH $NCCL_RPATH"
    PATCH_ARGS+=(--nccl-rpath "$NCCL_RPATH")
fi
run "patch CMake files" "$PYTHON" "$PATCH_SCRIPT" "$SRC" "${PATCH_ARGS[@]}"

# Build configuration: only what we want, nothing inherited.
unset HOROVOD_GPU_OPERATIONS HOROVOD_GPU_ALLREDUCE HOROVOD_GPU_ALLGATHER HOROVOD_GPU_BROADCAST \
      HOROVOD_GPU_ALLTOALL HOROVOD_GPU_REDUCESCATTER HOROVOD_GPU HOROVOD_WITH_MPI \
      HOROVOD_WITHOUT_PYTORCH HOROVOD_WITHOUT_GLOO HOROVOD_WITH_TENSORFLOW HOROVOD_WITH_MXNET
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
       HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export MAKEFLAGS="-j${CXR_BUILD_JOBS:-$(nproc)}"
# A CUDA build of torch makes Horovod's CMake look for a CUDA toolkit (even a Gloo-only
# build gets GPU-tensor support). Point it at the toolkit matching torch, if present;
# otherwise CMake picks up whatever nvcc is on PATH. Its bin/ goes first on PATH so that
# Horovod's build_utils.py takes the -gencode list from that nvcc (every sm_ it supports:
# 75..121 for CUDA 13; HOROVOD_BUILD_CUDA_CC_LIST=75,80,... narrows it).
if [[ -n "$TORCH_CUDA" ]]; then
    if [[ -d "$CUDA_DIR" ]]; then
        export CUDA_HOME="$CUDA_DIR" HOROVOD_CUDA_HOME="$CUDA_DIR"
        [[ -d "$CUDA_DIR/bin" ]] && export PATH="$CUDA_DIR/bin:$PATH"
        say "CUDA_HOME=HOROVOD_CUDA_HOME=$CUDA_DIR"
    else
        say "WARNING: torch is a CUDA $TORCH_CUDA build but $CUDA_DIR does not exist; CMake may fail to find CUDA"
    fi
fi
if [[ "$GPU_OPS" == NCCL ]]; then
    # The pip NCCL has only libnccl.so.2; Horovod's FindNCCL links -lnccl, so give it a
    # build-private libnccl.so symlink (the extension records the SONAME libnccl.so.2).
    mkdir -p "$WORK/nccl-link"
    ln -s "$NCCL_LIBFILE" "$WORK/nccl-link/libnccl.so"
    export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED \
           HOROVOD_NCCL_INCLUDE="$NCCL_INCLUDE" HOROVOD_NCCL_LIB="$WORK/nccl-link"
    NVCC_VER="$("$CUDA_DIR/bin/nvcc" --version 2>>"$LOG" | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
fi
env | grep -E '^(HOROVOD_|CUDA_HOME|MAKEFLAGS|CMAKE_)' | sort >>"$LOG"

build_start=$SECONDS
run "build wheel (several minutes; tail -f $LOG)" \
    "$PYTHON" -m pip wheel --no-build-isolation --no-deps -v -w "$WORK/dist" "$SRC"
say "wheel built in $((SECONDS - build_start))s"

STEP="locate built wheel"
shopt -s nullglob
built=("$WORK"/dist/horovod-"$HVD_VERSION"-"$PY_TAG"-*.whl)
shopt -u nullglob
if [[ ${#built[@]} -ne 1 ]]; then
    echo "expected exactly one horovod-$HVD_VERSION-$PY_TAG-*.whl in $WORK/dist, found ${#built[@]}" >>"$LOG"
    ls -la "$WORK/dist" >>"$LOG" 2>&1 || true
    fail 1
fi
WHEEL="${built[0]}"

install_runtime_deps
# Check the new wheel from a staging dir first, so a bad build never replaces the venv's horovod.
run "stage built wheel" "$PYTHON" -m pip install --no-deps --target "$WORK/stage" "$WHEEL"
verify "$WORK/stage"
run "install built wheel" "$PYTHON" -m pip install --no-deps --force-reinstall "$WHEEL"
verify

# Cache only a wheel that passed verification (atomic replace).
STEP="store wheel in cache"
mkdir -p "$CACHE_ROOT/horovod-$HVD_VERSION"
tmp_cache="$(mktemp -d "$CACHE_ROOT/horovod-$HVD_VERSION/.tmp.XXXXXX")"
chmod 755 "$tmp_cache"   # mktemp -d creates it 0700
cp "$WHEEL" "$tmp_cache/"
cat >"$tmp_cache/build-info.txt" <<EOF
horovod=$HVD_VERSION
torch=$TORCH_VERSION
torch_cuda=${TORCH_CUDA:-none}
torch_cxx11_abi=$TORCH_CXX11_ABI
cxx_standard=$CXX_STD
python=$PY_TAG
patch_sha=$PATCH_SHA
gpu_operations=$GPU_OPS
nccl=${NCCL_VERSION:+$NCCL_VERSION $NCCL_LIBFILE}
nccl_rpath=${NCCL_RPATH:-}
cuda_home=${CUDA_HOME:-none}
nvcc=${NVCC_VER:-}
cuda_cc_list=${HOROVOD_BUILD_CUDA_CC_LIST:-all of nvcc}
sdist_sha256=$HVD_SDIST_SHA256
cmake=$CMAKE_VER
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_log=$LOG
EOF
rm -rf "$CACHE_DIR"
mv "$tmp_cache" "$CACHE_DIR"
say "cached $(basename "$WHEEL") in $CACHE_DIR"
say "done (built from source). Full log: $LOG"
