"""``python -m benchmarks``: the benchmark CLI (see benchmarks/README.md)."""
from __future__ import annotations

import argparse
import sys

from .byte_model import MODES, OPS
from .cases import IMPLS
from .shapes import DTYPES, GPU_SHAPES


def _list(allowed, what):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{what}: expected a comma-separated subset of {', '.join(allowed)}; got {text!r}")
        return items
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="debias_ops benchmark: roofline table (GB/s vs the device's copy bandwidth, × vs "
                    "torch.compile, peak memory), N/C/B scaling sweeps, JSON + PNG plots. On a machine "
                    "without a GPU: a small CPU mode (reference vs torch.compile, kernels under the Triton "
                    "interpreter).")
    p.add_argument("--quick", action="store_true", help="bf16 only, fwd+bwd only, shorter timing, fewer sweep points")
    p.add_argument("--out", metavar="DIR", help="results folder (default benchmarks/results/<device>-<UTC time>)")
    p.add_argument("--ops", type=_list(OPS, "--ops"), default=list(OPS),
                   help=f"comma-separated ops (default all: {','.join(OPS)})")
    p.add_argument("--shapes", type=_list(list(GPU_SHAPES), "--shapes"), default=list(GPU_SHAPES),
                   help="GPU shapes (default W48,W18s)")
    p.add_argument("--dtypes", type=_list([d for d in DTYPES], "--dtypes"), default=None,
                   help="GPU dtypes (default bf16,fp32; --quick: bf16)")
    p.add_argument("--modes", type=_list(MODES, "--modes"), default=None,
                   help="fwd and/or fwd+bwd (default both; --quick: fwd+bwd)")
    p.add_argument("--impls", type=_list(IMPLS, "--impls"), default=list(IMPLS),
                   help="implementations (default fused,eager,compile)")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--no-sweep", action="store_true", help="skip the N/C/B sweeps")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves compile time)")
    p.add_argument("--no-interpreter", action="store_true", help="CPU mode: skip the Triton-interpreter run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-write", action="store_true", help="write no results folder")
    p.add_argument("--cpu", action="store_true", help="the CPU mode even when a GPU is present")
    p.add_argument("--cpu-tiny", action="store_true", help="the CPU mode at the tiniest shapes (CI)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop timing new rows after this many seconds (default 480 on GPU, 100 on CPU); "
                        "the rest are reported as skipped")
    p.add_argument("--json-out", metavar="FILE", help="also write the JSON result to FILE")
    p.add_argument("--interpreter-timeout-s", type=float, default=120.0, help=argparse.SUPPRESS)
    p.add_argument("--interpreter-child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.dtypes is None:
        args.dtypes = ["bf16"] if args.quick else ["bf16", "fp32"]
    if args.modes is None:
        args.modes = ["fwd+bwd"] if args.quick else list(MODES)
    from . import run
    return run.main(args)


if __name__ == "__main__":
    sys.exit(main())
