"""Compile moments-kernel *variants* (tuning knobs of ``kernels/moments.plan``) for
a target GPU (default sm_90) without a GPU and report what the compiler did:
tensor-core instructions, shared memory, registers and spills, C7515
(serialised wgmma pipeline).

    python -m benchmarks.aot_moments [--target sm_90] [variant ...]

Variants (default: all): the launcher's defaults at W48 (bf16-nchw, bf16-cl,
fp32-nchw, fp32-cl, mixed-nchw) and alternatives that were rejected, with the
reason visible in the table: bf16-cl-bn64-s2 (256 KiB shared memory: does not
launch), bf16-cl-tl.sum (sums by tl.sum: C7515), fp16-raw-nchw (mode 0),
bf16-nchw-bc64 (BLOCK_C 64, 4 warps), bf16-nchw-oddN (a partial last block),
and the two choices that depend on the Triton version (``kernels/_common.py``):
bf16-cl-bc128 (spills on 3.6 / 3.8), bf16-nchw-bc64-bn64 / -bn32 (C7515 on 3.6 /
3.7 resp. 3.8 / 3.9). With ``--target``: the H100's choices that other targets'
plans replace (fp32-nchw-bc128, mixed-nchw-bc128-bn64, mixed-nchw-bc64-bn64,
bf16-nchw-bn64, bf16-cl-sumdot: spills there, benchmarks/NOTES_aot.md "Targets").

The compile harness is ``benchmarks/aot.py`` (a dry run of the real launcher
with these keyword arguments, then Triton's own specialisation); the launcher's
choices for every kernel are printed by ``python -m benchmarks.aot``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import aot  # noqa: E402

# name -> (feats dtype, logits dtype, channels_last, W (positions per row), moments.plan knobs)
VARIANTS = {
    "bf16-nchw": ("bf16", "bf16", False, 256, {}),
    "bf16-cl": ("bf16", "bf16", True, 256, {}),
    "fp32-nchw": ("fp32", "fp32", False, 256, {}),
    "fp32-cl": ("fp32", "fp32", True, 256, {}),
    "mixed-nchw": ("bf16", "fp32", False, 256, {}),
    "bf16-cl-bn64-s2": ("bf16", "bf16", True, 256, dict(block_n=64, num_stages=2)),
    "bf16-cl-tl.sum": ("bf16", "bf16", True, 256, dict(sum_by_dot=False)),
    "fp16-raw-nchw": ("fp16", "fp16", False, 256, dict(recenter_every=0)),
    "bf16-nchw-bc64": ("bf16", "bf16", False, 256, dict(block_c=64, num_warps=4)),
    "bf16-nchw-oddN": ("bf16", "bf16", False, 250, {}),
    "bf16-cl-bc128": ("bf16", "bf16", True, 256, dict(block_c=128, num_warps=8)),
    "bf16-nchw-bc64-bn64": ("bf16", "bf16", False, 256, dict(block_c=64, num_warps=4, block_n=64)),
    "bf16-nchw-bc64-bn32": ("bf16", "bf16", False, 256, dict(block_c=64, num_warps=4, block_n=32)),
    # the H100's picks where other targets' plans differ (kernels/moments.plan, mma_kind)
    "fp32-nchw-bc128": ("fp32", "fp32", False, 256, dict(block_c=128, num_warps=8)),
    "mixed-nchw-bc128-bn64": ("bf16", "fp32", False, 256, dict(block_c=128, num_warps=8, block_n=64)),
    "mixed-nchw-bc64-bn64": ("bf16", "fp32", False, 256, dict(block_c=64, num_warps=4, block_n=64)),
    "bf16-nchw-bn64": ("bf16", "bf16", False, 256, dict(block_c=128, num_warps=8, block_n=64)),
    "bf16-cl-sumdot": ("bf16", "bf16", True, 256, dict(block_c=64, num_warps=4, sum_by_dot=True)),
}


def variant_launches(name: str, target: str = "sm_90"):
    import torch

    from debias_ops.kernels import moments as m
    da, dl, cl, W, kw = VARIANTS[name]
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    s = aot.W48
    fmt = torch.channels_last if cl else torch.contiguous_format

    def body(wrap):
        a = torch.empty(s["B"], s["C"], s["H"], W, dtype=dt[da], device="cuda", memory_format=fmt)
        lg = torch.empty(s["B"], s["K"], s["H"], W, dtype=dt[dl], device="cuda", memory_format=fmt)
        m.launch(a, lg, wrap=wrap, **kw)
    return [ln for ln in aot.dry_run(f"moments-{name}", body, target) if ln.kernel_name == "_moments_partial_kernel"]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    target = aot._option(argv, "--target", "sm_90")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    why = aot.available(target)
    if why:
        print(f"{target} AOT compile not available: {why}")
        return 1
    launch_list = []
    for name in argv or list(VARIANTS):
        launch_list.extend(variant_launches(name, target))
    print(aot.title(target))
    aot.print_table(launch_list, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
