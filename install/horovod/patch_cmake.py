#!/usr/bin/env python3
"""Patch the Horovod 0.28.1 sdist's CMake files so the PyTorch extension builds
against modern PyTorch (C++20 headers) with Gloo.

Usage:
    python patch_cmake.py SDIST_DIR [--cxx-standard N] [--nccl-rpath 'RPATH;RPATH...']

SDIST_DIR is the unpacked ``horovod-0.28.1`` source directory. N is the C++
standard PyTorch's headers need (default 20, which is what torch 2.14's
TorchConfig.cmake / torch.utils.cpp_extension use: ``-std=c++20``).

Why (see README.md next to this file):
  * horovod/torch/CMakeLists.txt forces ``CMAKE_CXX_STANDARD 14``; torch 2.x
    headers do not compile at C++14.
  * Compiling the extension at C++17+ while linking the default C++11 ``gloo``
    target fails at link time with ``multiple definition of
    gloo::rendezvous::Store::kDefaultTimeout`` (static constexpr members are
    implicitly inline from C++17 on). Horovod's top-level CMakeLists.txt can
    already build a C++17 copy of Gloo (``compatible17_gloo``) for TensorFlow;
    we let PyTorch request and link that copy too.
  * NCCL builds only (``--nccl-rpath``): the pip NCCL package ships only
    ``libnccl.so.2``, so build_wheel.sh links through a build-private
    ``libnccl.so`` symlink; CMake would put that temporary directory into the
    extension's RUNPATH. We give the extension a RUNPATH relative to
    site-packages instead (``$ORIGIN/../../nvidia/nccl/lib`` ...), so ``ldd``
    resolves ``libnccl.so.2`` from the venv. Without the flag this edit is not
    applied and the output is byte-identical to the Gloo-only patch.

Every edit is an exact string replacement. If an expected snippet is missing
(or occurs more than once) the script exits non-zero without writing anything,
so a changed sdist fails loudly instead of silently building something else.
Running it twice is a no-op (already-applied edits are detected and skipped).
"""

import argparse
import os
import sys

MARK = "# [cxr-pipeline patch]"


def edits(cxx_std, nccl_rpath=None):
    """Return {relative path: [(old, new), ...]} for the given C++ standard
    (and, for NCCL builds, the extension's RUNPATH)."""
    torch_old_gloo = (
        "if(HAVE_GLOO)\n"
        "    if (Pytorch_CXX11)\n"
        "        list(APPEND PYTORCH_LINKER_LIBS gloo)\n"
        "    else()\n"
        "        list(APPEND PYTORCH_LINKER_LIBS compatible_gloo)\n"
        "    endif()\n"
        "endif()\n"
    )
    torch_new_gloo = (
        "if(HAVE_GLOO)\n"
        f"    {MARK} extension is compiled at C++{cxx_std}: link the C++17 Gloo copy\n"
        "    # (built by the top-level CMakeLists.txt with this torch's _GLIBCXX_USE_CXX11_ABI).\n"
        "    list(APPEND PYTORCH_LINKER_LIBS compatible17_gloo)\n"
        "endif()\n"
    )
    torch_old_std = (
        "set(Pytorch_CXX11 ${Pytorch_CXX11} PARENT_SCOPE)\n"
        "if(NOT Pytorch_VERSION VERSION_LESS \"1.5.0\")\n"
        "    set(CMAKE_CXX_STANDARD 14)\n"
        "endif()\n"
    )
    torch_new_std = (
        "set(Pytorch_CXX11 ${Pytorch_CXX11} PARENT_SCOPE)\n"
        f"{MARK} torch headers need C++{cxx_std}; ask the top level for compatible17_gloo.\n"
        "set(Pytorch_CXX17 TRUE PARENT_SCOPE)\n"
        f"set(CMAKE_CXX_STANDARD {cxx_std})\n"
    )
    top_old_cond = "if(HAVE_GLOO AND (DEFINED Tensorflow_CXX17 AND Tensorflow_CXX17))\n"
    top_new_cond = (
        f"{MARK} also build the C++17 Gloo copy when the PyTorch extension needs it.\n"
        "if(HAVE_GLOO AND ((DEFINED Tensorflow_CXX17 AND Tensorflow_CXX17) OR "
        "(DEFINED Pytorch_CXX17 AND Pytorch_CXX17)))\n"
    )
    top_old_abi = (
        "    if (Tensorflow_CXX11)\n"
        "        target_compile_definitions(compatible17_gloo PRIVATE _GLIBCXX_USE_CXX11_ABI=1)\n"
    )
    top_new_abi = (
        f"    {MARK} one compatible17_gloo serves TF and PyTorch: their ABIs must agree.\n"
        "    if ((DEFINED Tensorflow_CXX17 AND Tensorflow_CXX17) AND (DEFINED Pytorch_CXX17 AND Pytorch_CXX17)\n"
        "        AND NOT (\"${Tensorflow_CXX11}\" STREQUAL \"${Pytorch_CXX11}\"))\n"
        "        message(FATAL_ERROR \"compatible17_gloo: TensorFlow and PyTorch use different _GLIBCXX_USE_CXX11_ABI\")\n"
        "    endif()\n"
        "    if ((Tensorflow_CXX17 AND Tensorflow_CXX11) OR (Pytorch_CXX17 AND Pytorch_CXX11))\n"
        "        target_compile_definitions(compatible17_gloo PRIVATE _GLIBCXX_USE_CXX11_ABI=1)\n"
    )
    torch_edits = [
        (torch_old_gloo, torch_new_gloo),
        (torch_old_std, torch_new_std),
    ]
    if nccl_rpath:
        torch_old_name = 'set_target_properties(${PYTORCH_TARGET_LIB} PROPERTIES OUTPUT_NAME "mpi_lib_v2")\n'
        torch_new_name = (
            f"{MARK} NCCL build: RUNPATH relative to site-packages, not the build-private libnccl.so dir\n"
            'set_target_properties(${PYTORCH_TARGET_LIB} PROPERTIES OUTPUT_NAME "mpi_lib_v2"\n'
            f'                      BUILD_WITH_INSTALL_RPATH TRUE INSTALL_RPATH "{nccl_rpath}")\n'
        )
        torch_edits.append((torch_old_name, torch_new_name))
    return {
        os.path.join("horovod", "torch", "CMakeLists.txt"): torch_edits,
        "CMakeLists.txt": [
            (top_old_cond, top_new_cond),
            (top_old_abi, top_new_abi),
        ],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sdist_dir", help="unpacked horovod-0.28.1 source directory")
    ap.add_argument("--cxx-standard", default="20", choices=["17", "20", "23"],
                    help="C++ standard for the torch extension (default: 20)")
    ap.add_argument("--nccl-rpath", default=None, metavar="'RPATH;...'",
                    help="NCCL builds only: the torch extension's RUNPATH, ';'-separated, "
                         "e.g. '$ORIGIN/../../torch/lib;$ORIGIN/../../nvidia/nccl/lib'")
    args = ap.parse_args()
    if args.nccl_rpath is not None and (not args.nccl_rpath.strip()
                                        or any(c in args.nccl_rpath for c in '"\\\n') or "${" in args.nccl_rpath):
        ap.error("--nccl-rpath must be a non-empty ';'-separated list without quotes, backslashes, "
                 "newlines or ${")

    errors, new_texts, applied, skipped = [], {}, 0, 0
    for rel, pairs in edits(args.cxx_standard, args.nccl_rpath).items():
        path = os.path.join(args.sdist_dir, rel)
        if not os.path.isfile(path):
            errors.append(f"{path}: file not found")
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for old, new in pairs:
            n_old, n_new = text.count(old), text.count(new)
            if n_old == 0 and n_new == 1:
                skipped += 1  # already patched
            elif n_old == 1 and n_new == 0:
                text = text.replace(old, new)
                applied += 1
            else:
                first = old.strip().splitlines()[0]
                errors.append(f"{path}: expected exactly one occurrence of the snippet starting "
                              f"{first!r}, found {n_old} (and {n_new} already-patched copies)")
        new_texts[path] = text

    if errors:
        print("patch_cmake.py: FAILED - the Horovod sdist does not look like the one this patch "
              "was written for (horovod 0.28.1). Nothing was written.", file=sys.stderr)
        for e in errors:
            print("  - " + e, file=sys.stderr)
        return 1

    for path, text in new_texts.items():
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    rpath = f", RUNPATH {args.nccl_rpath}" if args.nccl_rpath else ""
    print(f"patch_cmake.py: applied {applied} edit(s), {skipped} already present "
          f"(torch extension C++{args.cxx_standard}, links compatible17_gloo{rpath})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
