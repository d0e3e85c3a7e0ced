#!/usr/bin/env python3
"""The SASS of one kernel, on a machine without CUDA (no GPU time needed):

    python3 scripts/kernel_sass.py MODULE KERNEL [--dtype bf16|f16|f32] [--arch sm_90] [-DNAME=VALUE ...] [--stats]
        [--kernels DIR]

MODULE is a file of kernels/ without .cu (prefill, attention, ...), KERNEL an entry point in it
(prefill_attention_128_w8n64). The module is compiled as the engine compiles it (kernels/common.cuh
first, the dtype's define, C++17) by the NVRTC of the PyPI package nvidia-cuda-nvrtc-cu12 in target/pyenv
(scripts/ci/pyenv.sh makes it), then disassembled by nvdisasm from the PyPI package nvidia-cuda-nvdisasm
(downloaded once into target/nvdisasm). Prints the kernel's SASS, or with --stats its instruction count
and an opcode histogram, whole and for the region around its tensor-core instructions (HMMA, the loop of
an attention kernel), which is where integer overheads per product show. The NVRTC here (12.9) is not the
GPU machine's (13.0): close, not identical, code. --kernels DIR reads the .cu files and common.cuh from DIR
instead of kernels/ (an older commit's, written out by `git show`, to compare the two).
"""

import argparse
import collections
import ctypes
import glob
import os
import re
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVDISASM_VERSION = "13.5.37"


def python_env():
    out = subprocess.run(["bash", f"{ROOT}/scripts/ci/pyenv.sh"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def nvrtc_lib(python):
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    libs = glob.glob(f"{site}/nvidia/cuda_nvrtc/lib/libnvrtc.so*")
    if not libs:
        sys.exit("no libnvrtc in target/pyenv (tests/requirements.txt pins nvidia-cuda-nvrtc-cu12)")
    return ctypes.CDLL(sorted(libs)[0])


def nvdisasm(python):
    exe = f"{ROOT}/target/nvdisasm/nvidia/cu13/bin/nvdisasm"
    if not os.path.exists(exe):
        d = f"{ROOT}/target/nvdisasm"
        subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-deps", "-d", d,
                        f"nvidia-cuda-nvdisasm=={NVDISASM_VERSION}"], check=True)
        for whl in glob.glob(f"{d}/*.whl"):
            zipfile.ZipFile(whl).extractall(d)
        os.chmod(exe, 0o755)
    return exe


def compile_cubin(lib, module, dtype, arch, defines, kernels):
    src = (open(f"{kernels}/common.cuh").read() + f'\n#line 1 "{module}.cu"\n'
           + open(f"{kernels}/{module}.cu").read())
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), f"{module}.cu".encode(), 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}", "--std=c++17", f"-DLORAX_DTYPE_{dtype.upper()}"] + defines
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        sys.exit(f"NVRTC failed ({rc}):\n{log.value.decode()}")
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, buf)
    return buf.raw


def kernel_sass(sass, kernel):
    start = sass.find(f".text.{kernel}:")
    if start < 0:
        sys.exit(f"{kernel} is not in the module")
    end = sass.find("\n.text.", start + 1)
    return sass[start:end if end > 0 else len(sass)]


def stats(text):
    ops = [m.group(2) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", text)]
    base = [o.split(".")[0] for o in ops]
    print(f"{len(ops)} instructions")
    print("whole:", collections.Counter(base).most_common(25))
    mma = [i for i, o in enumerate(base) if o in ("HMMA", "HGMMA")]
    if mma:
        region = base[mma[0]:mma[-1] + 1]
        print(f"from the first to the last tensor-core instruction ({len(mma)} of them, {len(region)} in all):",
              collections.Counter(region).most_common(25))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("module")
    ap.add_argument("kernel")
    ap.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--stats", action="store_true")
    ap.add_argument("--kernels", default=f"{ROOT}/kernels",
                    help="the folder of the .cu files and common.cuh (say an older commit's, to compare)")
    a = ap.parse_args()
    python = python_env()
    cubin = compile_cubin(nvrtc_lib(python), a.module, a.dtype, a.arch, [f"-D{d}" for d in a.defines], a.kernels)
    path = f"{ROOT}/target/{a.module}-{a.dtype}-{a.arch}.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    sass = subprocess.run([nvdisasm(python), "-c", path], check=True, capture_output=True, text=True).stdout
    text = kernel_sass(sass, a.kernel)
    if a.stats:
        stats(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
