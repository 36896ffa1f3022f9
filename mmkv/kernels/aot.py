"""Compile the Triton kernels for an NVIDIA target without a GPU, exactly as a launch would, and
read what the compiler made of them.

Development tooling: the interpreter (`TRITON_INTERPRET=1`) checks what kernels compute, not how
they compile. `compile_launch` takes a launch as the launchers describe it (`(kernel, grid, args,
kwargs)`, from `quant_decode.quant_attention_launches` or `sparse_prefill.sparse_attention_launches`)
and runs the real compiler (ptxas ships with triton) for sm_80 / sm_90 with the launch's own
specialization: the argument types (i32 or i64 by value), the integers equal to 1 that become
constants, the 16-divisibility of integers and pointers, the constexprs and the options
(num_warps, num_stages), through triton's own binder, as `JITFunction.run` does on a GPU. The
arguments may be CPU or meta tensors (`device="meta"`: any shape, no memory), so the launch at a
128K-token, batch-8 shape compiles here. `instruction_counts` reads the PTX, and where triton
ships `nvdisasm` / `cuobjdump` the SASS and the resource usage (registers, spills, shared memory).
`tools/kernel_counts.py` prints a table; the tests compile every kernel and read the IR.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
import subprocess
import tempfile

import torch


def compile_launch(launch, arch: int = 90):
    """Compile `kernel[grid](*args, **kwargs)` for sm_`arch` without running it; returns triton's
    CompiledKernel (`.asm` holds "ttir", "ttgir", "ptx", "cubin"; `.metadata.shared` the shared
    memory in bytes)."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, _grid, args, kwargs = launch
    fn = kernel
    while not hasattr(fn, "params"):  # an Autotuner (or a heuristics wrapper) around the JITFunction
        fn = fn.fn
    kwargs = dict(kwargs, debug=False)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def meta_plane(p, batch: int, heads: int, tokens: int):
    """A plane (QuantTensor, SignTensor, TernaryTensor) of the same format at [batch, heads,
    tokens, D], its tensors on the meta device: what a launch at that shape sees, without memory."""
    def like(x, n):
        return None if x is None else torch.empty(batch, heads, n, x.shape[-1], dtype=x.dtype, device="meta")

    t_stats = tokens if getattr(p, "axis", "channel") == "token" else tokens // p.group
    fields = {"codes": like(p.codes, tokens), "scale": like(p.scale, t_stats)}
    if hasattr(p, "zero"):
        fields["zero"] = like(p.zero, t_stats)
    if getattr(p, "anchor", None) is not None:
        fields["anchor"] = like(p.anchor, 2)
    return dataclasses.replace(p, **fields)


def _tool(name: str) -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def _on_cubin(kernel, tool: str, *flags) -> str | None:
    exe = _tool(tool)
    if exe is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([exe, *flags, f.name], capture_output=True, text=True, check=True).stdout


def sass(kernel) -> str | None:
    """The kernel's SASS through triton's bundled nvdisasm, or None where it is absent."""
    return _on_cubin(kernel, "nvdisasm", "-c")


def resources(kernel) -> dict[str, int]:
    """Registers per thread, local (spill) bytes per thread and shared memory per program, from
    triton's bundled cuobjdump and the compiled metadata; {} where cuobjdump is absent."""
    out = _on_cubin(kernel, "cuobjdump", "-res-usage")
    if out is None:
        return {}
    use = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    return {"registers": int(use.get("REG", 0)), "spill bytes": int(use.get("LOCAL", 0)) + int(use.get("STACK", 0)),
            "shared bytes": int(kernel.metadata.shared)}


def instruction_counts(kernel) -> dict[str, int]:
    """Static counts (per thread, whole kernel): registers, spills, shared memory; PTX ex2 / u16
    division / int-to-float conversions / global loads / cp.async / mma.sync / wgmma; and where nvdisasm is present
    SASS instructions in all, I2FP, CALL, LDG and spill stores (STL)."""
    ptx = kernel.asm["ptx"]
    out = resources(kernel)
    out.update({"ptx ex2": ptx.count("ex2.approx"), "ptx div.u16": ptx.count("div.u16"),
                "ptx cvt.rn.f32.s32": ptx.count("cvt.rn.f32.s32"), "ptx ld.global": ptx.count("ld.global"),
                "ptx cp.async": ptx.count("cp.async.ca") + ptx.count("cp.async.cg"),
                "ptx mma": ptx.count("mma.sync.aligned"), "ptx wgmma": ptx.count("wgmma.mma_async")})
    code = sass(kernel)
    if code is not None:
        ops = collections.Counter(op.split(".")[0] for op in
                                  re.findall(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", code))
        out.update({"sass total": sum(ops.values()), "sass I2FP": ops["I2FP"] + ops["I2F"], "sass CALL": ops["CALL"],
                    "sass LDG": ops["LDG"], "sass STL": ops["STL"]})
    return out
