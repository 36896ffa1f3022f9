"""Compile the Triton kernels for an NVIDIA target without a GPU, and count their instructions.

Development tooling: the interpreter (`TRITON_INTERPRET=1`) checks what kernels compute, not how
they compile; `aot_compile` runs the real compiler (ptxas ships with triton) for sm_80 / sm_90,
and `instruction_counts` reads the PTX and, where triton's `nvdisasm` is present, the SASS.
`tools/kernel_counts.py` prints the decode kernel's counts; the tests compile every kernel.
"""
from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import tempfile

# The fused decode kernel's pointer types (mmkv.kernels.quant_decode._quant_decode_kernel) with
# fp16 statistics, and with 8-bit ones; every other argument compiles as i32.
DECODE_POINTERS = {"Q": "*fp32", "OP": "*fp32", "LP": "*fp32", "K1C": "*u8", "K1S": "*fp16", "K1Z": "*fp16",
                   "K1N": "*fp16", "K2C": "*u8", "K2S": "*fp16", "VC": "*u8", "VS": "*fp16", "VZ": "*fp16",
                   "VN": "*fp16"}
DECODE_POINTERS_STATS8 = {**DECODE_POINTERS, "K1S": "*u8", "K1Z": "*i8", "K2S": "*u8", "VS": "*u8", "VZ": "*u8"}
# VidKV at head dim 128 (64 2-bit channels | 64 FFT signs, ternary values), 8-bit statistics,
# 32-token tiles of one group each, GQA rows padded to 16.
DECODE_VIDKV8 = dict(D1=64, D2=64, DV=128, HAS_K1=True, HAS_K2=True, K1_BITS=2, K1_AXIS=0, V_TERNARY=True,
                     V_BITS=2, V_AXIS=0, K1_S8=True, K2_S8=True, V_S8=True, ONE_GROUP=True, BLOCK_R=16,
                     BLOCK_N=32, BLOCK_D1=64, BLOCK_D2=64, BLOCK_DV=128, DOT_F32=False)


def aot_compile(fn, constexprs: dict, pointers: dict, arch: int, num_warps: int = 4):
    """Compile the @triton.jit kernel `fn` for sm_`arch` (no GPU needed); returns the compiled
    kernel (its `.asm` holds "ptx" and "cubin")."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {p: "constexpr" if p in constexprs else pointers.get(p, "i32") for p in inspect.signature(fn.fn).parameters}
    return triton_compile(ASTSource(fn, sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def sass(kernel) -> str | None:
    """The kernel's SASS through triton's bundled nvdisasm, or None where it is absent."""
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(nvdisasm):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def instruction_counts(kernel) -> dict[str, int]:
    """Static counts (per thread, whole kernel): PTX ex2 / u16 division / int-to-float conversions /
    global loads, and where nvdisasm is present SASS instructions in all, I2FP, CALL and LDG."""
    ptx = kernel.asm["ptx"]
    out = {"ptx ex2": ptx.count("ex2.approx"), "ptx div.u16": ptx.count("div.u16"),
           "ptx cvt.rn.f32.s32": ptx.count("cvt.rn.f32.s32"), "ptx ld.global": ptx.count("ld.global")}
    code = sass(kernel)
    if code is not None:
        ops = collections.Counter(op.split(".")[0] for op in
                                  re.findall(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", code))
        out.update({"sass total": sum(ops.values()), "sass I2FP": ops["I2FP"] + ops["I2F"], "sass CALL": ops["CALL"],
                    "sass LDG": ops["LDG"]})
    return out
