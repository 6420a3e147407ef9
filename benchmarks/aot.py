"""Compile every Triton kernel of debias_ops offline -- no GPU -- for the GPUs
users have, at exactly the configurations the launchers pick on each at design
§8's shapes, and report what the compiler did.

    python -m benchmarks.aot [--target sm_90] [--plan-for TARGET] [--list] [case-substring ...]

Targets (``DEVICES``): sm_80 (A100), sm_89 (L4), sm_90 (H100), sm_100 (B200),
sm_120 (RTX 5090), gfx942 (MI300X). ``--plan-for`` records the launches one
device's plans pick and compiles them for ``--target`` (e.g. the H100's picks
on an A100).

How "exactly what the launcher picks" is obtained: each launcher
(``kernels/gate.launch``, ``kernels/moments.launch``, ``kernels/loss.launch``)
is *called* with fake CUDA tensors (``FakeTensorMode``: shapes, strides and
dtypes, no storage, no GPU) inside ``kernels._common.assume_target`` (the
device's SM count, shared-memory limit, architecture: what the launchers'
``plan()`` functions read of a GPU) and, through the launchers' ``wrap=``
hook, a recorder in place of each kernel, so ``kernel[grid](*args, **kw)``
records the call instead of launching. Each recorded call is then specialised
with Triton's own binder (the one ``JITFunction.run`` uses: pointer/int
alignment, ints equal to 1 as constants, i32/i64) and compiled with
``triton.compile`` for the target's ``GPUTarget`` with the recorded options
(num_warps, num_stages, maxnreg). NVIDIA: registers and spills from the bundled
ptxas (``-v``) run on the generated PTX with Triton's own flags. AMD: VGPRs,
spills and scratch from the AMDGCN assembly's kernel metadata.

Columns: regs, spill stores/loads (bytes; AMD: spilled VGPRs / scratch bytes,
and SGPR spills -- into VGPR lanes, no memory traffic -- in the note), shared memory (KiB; the target's limit in the title), tensor-core
instructions in the PTX / AMDGCN (wgmma on sm_90, tcgen05.mma on sm_100,
mma.sync, v_mfma), of them tf32, widest global load / store (bits per thread
and instruction), C7515 (ptxas serialised the wgmma pipeline). Requires Triton
>= 3.5-ish internals (``native_specialize_impl``,
``create_function_from_signature``); ``available()`` says why not otherwise.

Why: the interpreter runs each program as Python and does not type-check
if/else branches or check resource limits. Timings still need a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.aot_cases import LOSS, W18S, W48  # noqa: E402,F401  (design §8 shapes, re-exported)

KIB = 1024


@dataclass(frozen=True)
class Device:
    """A GPU the offline compiles stand in for: what the plans read of it
    (``kernels._common.Target`` fields) and the compiler target."""
    name: str
    backend: str      # "cuda" / "hip"
    arch: object      # 90 / "gfx942"
    sms: int          # SMs (CUs on AMD)
    smem: int         # shared memory (LDS) per block, bytes: CUDA's opt-in maximum
    warp_size: int = 32

    def plan_target(self):
        from debias_ops.kernels._common import Target
        return Target(self.backend, self.arch, self.sms, self.smem, self.warp_size)

    def gpu_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget(self.backend, self.arch, self.warp_size)


# Per-block shared memory: the CUDA C Programming Guide's table of compute
# capabilities (max. shared memory per thread block, opt-in: 8.0 163 KiB, 8.9
# 99 KiB, 9.0 227 KiB, 10.0 227 KiB, 12.0 99 KiB); MI300X: 64 KiB LDS per
# workgroup. SM counts of the named products (sm_89: the L4, 58 SMs; an RTX 4090
# has 128, same limits).
DEVICES = {
    "sm_80": Device("A100 SXM", "cuda", 80, 108, 163 * KIB),
    "sm_89": Device("L4", "cuda", 89, 58, 99 * KIB),
    "sm_90": Device("H100 SXM", "cuda", 90, 132, 227 * KIB),
    "sm_100": Device("B200", "cuda", 100, 148, 227 * KIB),
    "sm_120": Device("RTX 5090", "cuda", 120, 170, 99 * KIB),
    "gfx942": Device("MI300X", "hip", "gfx942", 304, 64 * KIB, 64),
}

# ----------------------------------------------------------------------------- availability

def available(target: str = "sm_90") -> str | None:
    """None when offline compiles for ``target`` can run here, else the reason they cannot."""
    from debias_ops.kernels._env import interpreting  # standard library only
    if interpreting():
        return "TRITON_INTERPRET is set (the compiler path is not used)"
    try:
        import triton  # noqa: F401
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except Exception as err:  # pragma: no cover - other Triton versions
        return f"this Triton lacks the AOT pieces used here ({err})"
    dev = DEVICES[target]
    if dev.backend == "cuda":
        try:
            from triton.backends.nvidia.compiler import get_ptxas
            exe = get_ptxas(dev.arch).path
        except Exception as err:  # pragma: no cover
            return f"no usable ptxas for {target} ({err})"
        if not exe or not Path(exe).exists():
            return f"no ptxas for {target}"
    else:
        try:
            from triton._C.libtriton import amd  # noqa: F401
            from triton.backends.amd.compiler import HIPBackend  # noqa: F401
        except Exception as err:  # pragma: no cover - a Triton built without the AMD backend
            return f"this Triton has no AMD backend ({err})"
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: F401
    except Exception as err:  # pragma: no cover
        return f"torch has no FakeTensorMode ({err})"
    return _probe(target)


@functools.lru_cache(maxsize=None)
def _probe(target: str) -> str | None:
    """Dry-run, specialise and compile one gate launch: Triton's JIT internals used
    here (binder, ``_pack_args``) are private and change between versions, and a
    backend may lack a piece it needs (e.g. AMD's linker)."""
    try:
        case = "gate-apply-W48-bf16-nchw"
        compile_launch(dry_run(case, _cases()[case], target)[0], target)
    except Exception as err:  # pragma: no cover - other Triton / torch versions
        return (f"compiling for {target} fails with this Triton / torch "
                f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})")
    return None


@functools.lru_cache(maxsize=None)
def _backend(target: str):
    from triton.compiler import make_backend
    return make_backend(DEVICES[target].gpu_target())


# ----------------------------------------------------------------------------- recording launches

@dataclass
class Launch:
    name: str           # "<case>/<kernel>[#n]"
    kernel: object      # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def kernel_name(self) -> str:
        return self.kernel.fn.__name__


class _Recorder:
    """The launchers' ``wrap`` hook: ``wrap(kernel)[grid](*args, **kw)`` appends a Launch."""

    def __init__(self):
        self.launches: list[tuple] = []

    def __call__(self, kernel):
        rec = self

        class _Bound:
            def __getitem__(self, grid):
                def _launch(*args, **kwargs):
                    rec.launches.append((kernel, tuple(grid), args, dict(kwargs)))
                return _launch
        return _Bound()


@contextlib.contextmanager
def _fake_device(target: str):
    """Fake CUDA tensors, and ``target``'s properties for the launchers' plans."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from debias_ops.kernels import _common
    saved = torch.cuda.device
    torch.cuda.device = lambda device: contextlib.nullcontext()  # Triton's device switch (no CUDA here)
    try:
        with _common.assume_target(DEVICES[target].plan_target()), FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        torch.cuda.device = saved


def _eager_triton_op():
    """What a ``torch.library.triton_op`` body sees when called eagerly: wrap_triton
    disabled (launches go straight to the kernel; e.g. the loss launcher then
    passes ``maxnreg``, which it leaves out when torch.compile traces it)."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return set_wrap_triton_enabled(False)


def dry_run(case: str, body, target: str = "sm_90") -> list[Launch]:
    """Run ``body(wrap)`` on ``target`` (its plans) as an eager ``triton_op`` call (a case name ending in
    ``-traced``: as traced by torch.compile) (which calls a launcher with ``wrap=wrap`` on fake CUDA
    tensors it creates) and return the launches it made, tensors replaced by tiny
    CPU stand-ins of the same dtype (what specialisation looks at: dtype and a
    16-byte-aligned address, as every CUDA allocation is)."""
    import torch
    rec = _Recorder()
    traced = case.endswith("-traced")  # as under torch.compile: wrap_triton enabled
    with _fake_device(target), (contextlib.nullcontext() if traced else _eager_triton_op()):
        body(rec)
    out, seen = [], {}
    for kernel, grid, args, kwargs in rec.launches:
        def real(a):
            return torch.empty(1, dtype=a.dtype) if isinstance(a, torch.Tensor) else a
        kname = kernel.fn.__name__
        seen[kname] = seen.get(kname, 0) + 1
        name = f"{case}/{kname.strip('_')}" + (f"#{seen[kname]}" if seen[kname] > 1 else "")
        out.append(Launch(name, kernel, grid, tuple(real(a) for a in args),
                          {k: real(v) for k, v in kwargs.items()}))
    # number the first of a repeated kernel too
    for ln in out:
        kname = ln.kernel_name
        if seen[kname] > 1 and "#" not in ln.name:
            ln.name += "#1"
    return out


# ----------------------------------------------------------------------------- the cases (what the ops launch)

def _cases() -> dict:
    from benchmarks.aot_cases import cases
    return cases()


def launches(select=None, target: str = "sm_90") -> list[Launch]:
    """Every launch of every case as planned for ``target`` (``select``: substrings,
    any of which must match the case name)."""
    out = []
    for case, body in _cases().items():
        if select and not any(s in case for s in select):
            continue
        out.extend(dry_run(case, body, target))
    return out


# ----------------------------------------------------------------------------- compiling

def _specialise(ln: Launch, target: str = "sm_90"):
    """(signature, constexprs, attrs, options dict) exactly as ``JITFunction.run`` would build them."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature
    fn, backend = ln.kernel, _backend(target)
    kwargs = dict(ln.kwargs)
    if DEVICES[target].backend != "cuda":
        kwargs.pop("maxnreg", None)  # an NVIDIA-only option (the launchers do not pass it for AMD)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*ln.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    opts = {k: v for k, v in kwargs.items() if k not in signature}
    return signature, constexprs, attrs, opts


def _key(ln: Launch, target: str):
    sig, const, attrs, opts = _specialise(ln, target)
    return (target, ln.kernel.fn.__module__, ln.kernel_name, tuple(sig.items()), tuple(sorted(const.items())),
            repr(sorted(attrs.items())), tuple(sorted(opts.items())))


_COMPILED: dict = {}  # key -> (compiled kernel, report dict); lives for the process (a test session)


def compile_launch(ln: Launch, target: str = "sm_90"):
    """(CompiledKernel, report) for one recorded launch compiled for ``target``, once
    per distinct specialisation."""
    from triton.compiler import ASTSource
    key = _key(ln, target)
    if key not in _COMPILED:
        sig, const, attrs, opts = _specialise(ln, target)
        t0 = time.perf_counter()
        ck, log = _compile_with_log(ASTSource(fn=ln.kernel, signature=sig, constexprs=const, attrs=attrs),
                                    opts, target)
        rep = analyse(ck, log, target)
        rep["compile_s"] = time.perf_counter() - t0
        rep["options"] = {k: opts[k] for k in ("num_warps", "num_stages", "maxnreg") if k in opts}
        _COMPILED[key] = (ck, rep)
    return _COMPILED[key]


def _compile_with_log(src, opts, target: str):
    """triton.compile for ``target``, keeping ptxas's -v log when Triton runs ptxas (it
    does not on an on-disk cache hit: then the log is None and ``analyse`` runs ptxas)."""
    import io

    import triton
    from triton import knobs
    buf = io.StringIO()
    prev = knobs.nvidia.dump_ptxas_log
    try:
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(src, target=DEVICES[target].gpu_target(), options=opts)
    finally:
        knobs.nvidia.dump_ptxas_log = prev
    log = buf.getvalue()
    return ck, (log if "Used" in log and "registers" in log else None)


@functools.lru_cache(maxsize=None)
def _ptxas_extra_flags() -> tuple:
    """The register-allocation flag this Triton passes to ptxas: 3.8 and 3.9 add
    ``--regAllocOptLevel=2`` (it changes spills), 3.6 does not."""
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend
    try:
        src = inspect.getsource(CUDABackend.make_cubin)
    except (OSError, TypeError, AttributeError):  # pragma: no cover - no source shipped
        return ()
    return ("--regAllocOptLevel=2",) if "--regAllocOptLevel=2" in src else ()


def _ptxas_v(ptx: str, arch: int, enable_fp_fusion: bool = True) -> str:
    """ptxas -v log of the PTX with Triton's own flags (Triton does not keep the log)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    exe = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [exe, "-lineinfo", *([] if enable_fp_fusion else ["--fmad=false"]), "-v", *_ptxas_extra_flags(),
               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(d) / "k.cubin")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        return r.stdout + r.stderr


def _max_vec_bits(asm: str, op: str) -> int:
    """Widest global access of kind ``op`` (ld / st) in bits per thread and instruction."""
    best = 0
    for m in re.finditer(rf"\b{op}\.global[.\w]*?(?:\.v(\d))?\.(b|f|u|s)(\d+)\b", asm):
        best = max(best, int(m.group(1) or 1) * int(m.group(3)))
    return best


def _amd_vec_bits(asm: str, op: str) -> int:
    """AMDGCN: widest ``global_load_dwordxN`` / ``global_store_dwordxN`` (also buffer_*) in bits."""
    best = 0
    kind = "load" if op == "ld" else "store"
    for m in re.finditer(rf"\b(?:global|buffer)_{kind}_(dword(?:x(\d))?|short|ushort|sshort|byte|ubyte|sbyte|b(\d+))\b", asm):
        if m.group(1).startswith("dword"):
            bits = 32 * int(m.group(2) or 1)
        elif m.group(3):
            bits = int(m.group(3))
        else:
            bits = 16 if "short" in m.group(1) else 8
        best = max(best, bits)
    return best


def _amd_meta(asm: str, key: str) -> int:
    m = re.findall(rf"\.{key}:\s+(\d+)", asm)
    return max(int(x) for x in m) if m else -1


def analyse(ck, log: str | None = None, target: str = "sm_90") -> dict:
    """Registers, spills, shared memory, tensor-core instructions and access widths of a compile."""
    dev = DEVICES[target]
    if dev.backend == "hip":
        asm = ck.asm["amdgcn"]
        scratch = re.findall(r"ScratchSize:\s+(\d+)", asm)
        return dict(
            regs=_amd_meta(asm, "vgpr_count"),
            # AMD: spilled VGPRs / scratch (private memory) bytes per lane; SGPR spills go
            # to VGPR lanes (no memory traffic) and are reported apart
            spill_st=max(_amd_meta(asm, "vgpr_spill_count"), 0),
            spill_ld=max((int(x) for x in scratch), default=0),
            sgpr_spill=max(_amd_meta(asm, "sgpr_spill_count"), 0),
            smem=int(ck.metadata.shared),
            tc=len(re.findall(r"^\s*v_mfma", asm, re.M)),
            tc_tf32=len(re.findall(r"^\s*v_mfma\S*xf32", asm, re.M)),
            wgmma=0, wgmma_tf32=0, mma=0, cvt_tf32=0,
            ld_bits=_amd_vec_bits(asm, "ld"), st_bits=_amd_vec_bits(asm, "st"),
            c7515=False, ptxas_log="",
        )
    ptx = ck.asm["ptx"]
    if log is None:
        log = _ptxas_v(ptx, dev.arch, getattr(ck.metadata, "enable_fp_fusion", True))
    regs = re.findall(r"Used (\d+) registers", log)
    st = re.findall(r"(\d+) bytes spill stores", log)
    ld = re.findall(r"(\d+) bytes spill loads", log)
    def count(pattern):  # instructions, predicated or not
        return len(re.findall(rf"^\s*(?:@!?%p\w*\s+)?{pattern}", ptx, re.M))
    wgmma, wgmma_tf32 = count(r"wgmma\.mma_async"), count(r"wgmma\.mma_async\S*\.tf32")
    mma, mma_tf32 = count(r"mma\.sync"), count(r"mma\.sync\S*\.tf32")
    tc5, tc5_tf32 = count(r"tcgen05\.mma\.cta_group"), count(r"tcgen05\.mma\.cta_group\S*kind::tf32")
    return dict(
        regs=int(regs[-1]) if regs else -1,
        spill_st=int(st[-1]) if st else -1,
        spill_ld=int(ld[-1]) if ld else -1,
        smem=int(ck.metadata.shared),
        tc=wgmma + mma + tc5,
        tc_tf32=wgmma_tf32 + mma_tf32 + tc5_tf32,
        wgmma=wgmma, wgmma_tf32=wgmma_tf32, mma=mma,
        cvt_tf32=len(re.findall(r"cvt\.rna\.tf32\.f32", ptx)),
        ld_bits=_max_vec_bits(ptx, "ld"),
        st_bits=_max_vec_bits(ptx, "st"),
        c7515="C7515" in log,
        ptxas_log=log,
    )


# ----------------------------------------------------------------------------- table

HEADER = (f"{'launch':44s} {'grid':>16s} {'warps':>5s} {'stg':>3s} {'maxr':>4s} {'regs':>4s} {'spill st/ld':>11s} "
          f"{'smem KiB':>8s} {'tc':>5s} {'tf32':>4s} {'ld/st bits':>10s}  note")


def row(ln: Launch, r: dict, target: str = "sm_90") -> str:
    """One table line of a compiled launch (see HEADER)."""
    o = r["options"]
    note = []
    if r["smem"] > DEVICES[target].smem:
        note.append(f"OVER {DEVICES[target].smem // KIB} KiB")
    if r["c7515"]:
        note.append("wgmma serialised (C7515)")
    if r.get("sgpr_spill"):
        note.append(f"{r['sgpr_spill']} SGPRs spilled to VGPR lanes")
    grid = "x".join(str(x) for x in ln.grid)
    return (f"{ln.name:44s} {grid:>16s} {o.get('num_warps', '-')!s:>5s} {o.get('num_stages', '-')!s:>3s} "
            f"{o.get('maxnreg', '-')!s:>4s} {r['regs']:4d} {str(r['spill_st']) + '/' + str(r['spill_ld']):>11s} "
            f"{r['smem'] / 1024:8.1f} {r['tc']:5d} {r['tc_tf32']:4d} "
            f"{str(r['ld_bits']) + '/' + str(r['st_bits']):>10s}  {', '.join(note)}")


def print_table(launch_list, target: str = "sm_90", out=sys.stdout) -> list[tuple[Launch, dict]]:
    """Compile each launch for ``target`` and print its line; returns [(launch, report)]."""
    print(HEADER, file=out, flush=True)
    rows = []
    for ln in launch_list:
        try:
            _ck, r = compile_launch(ln, target)
        except Exception as err:  # a launch that does not compile for this target: say so, go on
            msg = [x for x in str(err).splitlines() if x.strip()]
            print(f"{ln.name:44s} does not compile: {type(err).__name__}: {msg[-1] if msg else ''}",
                  file=out, flush=True)
            continue
        print(row(ln, r, target), file=out, flush=True)
        rows.append((ln, r))
    return rows


def title(target: str, plan_for: str | None = None) -> str:
    import triton
    d = DEVICES[target]
    tool = "ptxas -v" if d.backend == "cuda" else "AMDGCN metadata"
    planned = f"; launches as planned for {plan_for}" if plan_for and plan_for != target else ""
    return (f"triton {triton.__version__}, target {target} ({d.name}, {d.sms} {'SMs' if d.backend == 'cuda' else 'CUs'}), "
            f"{tool}; smem limit {d.smem // KIB} KiB{planned}")


def _option(argv: list, flag: str, default=None):
    if flag in argv:
        i = argv.index(flag)
        value = argv[i + 1]
        del argv[i:i + 2]
        if value not in DEVICES:
            raise SystemExit(f"{flag} {value}: expected one of {', '.join(DEVICES)}")
        return value
    return default


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    target = _option(argv, "--target", "sm_90")
    plan_for = _option(argv, "--plan-for", target)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.6's default
    why = available(target)
    if why:
        print(f"{target} AOT compile not available: {why}")
        return 1
    if "--list" in argv:
        for c in _cases():
            print(c)
        return 0
    print(title(target, plan_for))
    t0 = time.perf_counter()
    print_table(launches(argv or None, plan_for), target)
    print(f"({len(_COMPILED)} distinct compiles, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
