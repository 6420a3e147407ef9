"""Offline sm_90 (H100) compile checks of every Triton kernel at the launch
configurations the launchers pick at design §8's shapes -- no GPU needed.

Each case calls the real launcher (gate / moments / loss) on fake CUDA tensors
with an H100 SM count and records its launches instead of running them
(``benchmarks/aot.py``), then compiles each launch with Triton's own argument
specialisation, constexprs, num_warps, num_stages and maxnreg for
``GPUTarget("cuda", 90, 32)`` and inspects the PTX / ptxas -v output (the ptxas
bundled with that Triton, with its flags).

Checks: compiles; shared memory <= 227 KiB; no register spills in any kernel;
no wgmma serialisation (ptxas C7515) and tensor-core instructions (wgmma) in
the moments partial kernel; fp32 moments really tf32x3 (3 wgmma per product of
the 16-bit variant, all tf32, with the hi/lo split ``cvt.rna.tf32``); 128-bit
global loads and stores in the NCHW bf16 / fp32 gate kernel (and channels_last
at C = 720).

Triton versions: the same configuration can compile clean under one Triton and
spill or serialise under another (code generator and bundled ptxas differ:
3.6 ptxas 12.8; 3.8 ptxas 12.9 with --regAllocOptLevel=2; 3.9 ptxas 13.4). The
launchers pick per version where they must (``kernels/_common.py:_SM90_CONFIG``);
these checks pass under Triton 3.6, 3.8 and 3.9 (3.7: the subset), with the
per-version numbers in benchmarks/NOTES_aot.md. The test command runs them under
the environment's Triton and again under Triton 3.6 (``.triton36``, the GPU
machine's; ``DEBIAS_OPS_AOT_REQUIRE=1`` turns a skip into a failure there).

Coverage: by default a representative subset (``SUBSET``, ~40 distinct
compiles, including every case that failed under some version before the
per-version choices: W48 channels_last 16-bit moments, W18s NCHW 16-bit
moments, the loss main kernel); ``DEBIAS_OPS_AOT_ALL=1`` runs every case of
``benchmarks.aot`` (100 distinct compiles). ``python -m benchmarks.aot``
prints the full table (benchmarks/NOTES_aot.md).

Skips under TRITON_INTERPRET=1 and where this Triton lacks the AOT pieces.
"""
from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.aot

SMEM_LIMIT = 227 * 1024

# Triton versions differ in what they do with one configuration (registers, spills,
# wgmma serialisation); the launchers pick per version where they must
# (kernels/_common.py:_SM90_CONFIG). No kernel may spill on any version checked.
SUBSET = [
    # gate: bf16 / fp32 × NCHW / channels_last × apply / dA / dA+dg at W48, fp16 dA+dg,
    # a stride-0 dOut, and W18s channels_last (C = 270: BLOCK_C 32)
    *[f"gate-{op}-W48-{d}-{lay}" for op in ("apply", "bwd", "bwd-dg") for d in ("bf16", "fp32")
      for lay in ("nchw", "cl")],
    "gate-bwd-dg-W48-fp16-nchw", "gate-bwd-dg-W48-bf16-expanded", "gate-apply-W18s-bf16-cl",
    # moments: every dtype mode × layout at W48 (BLOCK_C 128, 8 warps); W18s (BLOCK_C 64, 4 warps)
    *[f"moments-W48-{d}-{lay}" for d in ("fp32", "bf16", "mixed") for lay in ("nchw", "cl")],
    "moments-W48-fp16-nchw", "moments-W48-fp16-cl",
    "moments-W18s-bf16-nchw", "moments-W18s-mixed-nchw", "moments-W18s-fp32-cl",
    # loss: fp32 / bf16 logits, int64 / int32 / uint8 labels, with and without class weights
    "loss-fp32-i64", "loss-bf16-i32-w", "loss-fp32-u8", "loss-fp32-i64-traced",
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _all() -> bool:
    return os.environ.get("DEBIAS_OPS_AOT_ALL", "0") not in ("", "0")


def _skip(why: str):
    """Skip, or fail where DEBIAS_OPS_AOT_REQUIRE=1 (scripts/test.sh's Triton 3.6 step)."""
    if os.environ.get("DEBIAS_OPS_AOT_REQUIRE", "0") not in ("", "0"):
        pytest.fail(f"DEBIAS_OPS_AOT_REQUIRE is set but the sm_90 compile checks cannot run: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def aot():
    if _interpreting():
        _skip("TRITON_INTERPRET=1: the GPU compiler path is not used")
    try:
        import triton  # noqa: F401
    except ImportError as err:
        _skip(f"no triton ({err})")
    from benchmarks import aot as mod
    # Triton 3.6 (the GPU session) fuses FP multiply-adds by default; 3.9 warns unless told
    old = os.environ.get("TRITON_DEFAULT_FP_FUSION")
    os.environ["TRITON_DEFAULT_FP_FUSION"] = "1"
    why = mod.available()
    if why:
        _restore(old)
        _skip(why)
    yield mod
    _restore(old)


def _restore(old):
    if old is None:
        os.environ.pop("TRITON_DEFAULT_FP_FUSION", None)
    else:
        os.environ["TRITON_DEFAULT_FP_FUSION"] = old


_RESULTS: dict = {}  # case -> [(launch, report)]: compiled once per test session


def _compiled(aot, case):
    if case not in _RESULTS:
        cases = aot._cases()
        launches = aot.dry_run(case, cases[case])
        assert launches, f"{case}: the launcher launched nothing"
        _RESULTS[case] = [(ln, aot.compile_launch(ln)[1]) for ln in launches]
    return _RESULTS[case]


# SUBSET is a static list (the case list of benchmarks/aot.py needs triton to build);
# test_subset_names_exist checks it against that list
@pytest.mark.parametrize("case", SUBSET)
def test_compiles_sm90(aot, case):
    for ln, r in _compiled(aot, case):
        where = f"{ln.name} (grid {ln.grid}, options {r['options']})"
        assert r["smem"] <= SMEM_LIMIT, f"{where}: {r['smem']} B of shared memory > 227 KiB: the launch fails"
        assert r["regs"] > 0 and r["spill_st"] >= 0, f"{where}: no ptxas -v report:\n{r['ptxas_log'][-2000:]}"
        if ln.kernel_name == "_loss_main_kernel":
            if case.endswith("-traced"):  # torch.compile: no maxnreg, ptxas picks the registers
                assert "maxnreg" not in ln.kwargs, where
            else:
                assert ln.kwargs.get("maxnreg") == 128, f"{where}: the eager launch should cap registers at 128"
        assert r["spill_st"] == 0 and r["spill_ld"] == 0, \
            f"{where}: spills {r['spill_st']}/{r['spill_ld']} B (regs {r['regs']})"
        if ln.kernel_name == "_moments_partial_kernel":
            assert r["wgmma"] > 0, f"{where}: no wgmma (tensor cores) in the PTX"
            assert not r["c7515"], f"{where}: ptxas serialised the wgmma pipeline (C7515)"
            if "-fp32-" in case:
                # every MMA of the fp32 kernel is tf32 and the operands are split hi/lo
                assert r["wgmma_tf32"] == r["wgmma"], f"{where}: non-tf32 wgmma in the fp32 kernel"
                assert r["cvt_tf32"] > 0, f"{where}: no cvt.rna.tf32 (hi/lo split of tf32x3)"


def test_all_cases_compile_sm90(aot):
    """Every case of benchmarks.aot (DEBIAS_OPS_AOT_ALL=1 only: ~2 min cold on 2 cores)."""
    if not _all():
        pytest.skip("set DEBIAS_OPS_AOT_ALL=1 to compile every case (the subset runs by default)")
    for case in aot._cases():
        if case not in SUBSET:
            test_compiles_sm90(aot, case)


def test_subset_names_exist(aot):
    missing = [c for c in SUBSET if c not in aot._cases()]
    assert not missing, f"SUBSET names no case of benchmarks.aot: {missing}"


def _report(aot, case, kernel):
    rows = [r for ln, r in _compiled(aot, case) if ln.kernel_name == kernel]
    assert len(rows) == 1, (case, kernel, len(rows))
    return rows[0]


def test_moments_fp32_is_tf32x3(aot):
    """tf32x3 = 3 tf32 MMAs per product: the fp32 NCHW partial kernel has exactly 3× the
    wgmma of the bf16 one (same tiles, same dot structure: no sum-by-dot in NCHW), all tf32.
    Plain tf32 would give 1×; ieee would give no wgmma."""
    f32 = _report(aot, "moments-W48-fp32-nchw", "_moments_partial_kernel")
    b16 = _report(aot, "moments-W48-bf16-nchw", "_moments_partial_kernel")
    assert b16["wgmma"] > 0 and b16["wgmma_tf32"] == 0
    assert f32["wgmma_tf32"] == f32["wgmma"] == 3 * b16["wgmma"], (f32["wgmma"], f32["wgmma_tf32"], b16["wgmma"])


@pytest.mark.parametrize("case", ["gate-apply-W48-bf16-nchw", "gate-apply-W48-fp32-nchw",
                                  "gate-bwd-dg-W48-bf16-nchw", "gate-bwd-dg-W48-fp32-nchw",
                                  "gate-apply-W48-bf16-cl", "gate-bwd-dg-W48-fp32-cl"])
def test_gate_128bit_access(aot, case):
    """Streaming kernel: 128-bit (v4 × 32-bit / v2 × 64-bit) global loads and stores.
    (W18s channels_last is not vectorisable: C = 270 rows are only 4-byte aligned in bf16.)"""
    r = _report(aot, case, "_gate_kernel")
    assert r["ld_bits"] == 128 and r["st_bits"] == 128, (r["ld_bits"], r["st_bits"])


@pytest.mark.xfail(strict=True, reason="the loss main kernel's horizontal adjoint is "
                   "tl.dot(..., input_precision='ieee'): fp32 FMA on the CUDA cores, no mma/wgmma "
                   "(tf32x3 would use the tensor cores); see benchmarks/NOTES_aot.md")
def test_loss_horizontal_dot_on_tensor_cores(aot):
    rows = [r for ln, r in _compiled(aot, "loss-fp32-i64") if ln.kernel_name == "_loss_main_kernel"]
    assert rows and all(r["wgmma"] + r["mma"] > 0 for r in rows)


def test_sm90_config_versions():
    """The per-version launch choices: every measured version has every key; a version
    outside the table takes the nearest measured one (older -> 3.6, newer -> 3.9)."""
    pytest.importorskip("triton")
    from debias_ops.kernels import _common as c
    keys = set(c._SM90_CONFIG[(3, 6)])
    assert all(set(v) == keys for v in c._SM90_CONFIG.values())
    for key in keys:
        assert c.sm90_config(key, (3, 5)) == c._SM90_CONFIG[(3, 6)][key]
        assert c.sm90_config(key, (3, 10)) == c._SM90_CONFIG[(3, 9)][key]
        assert c.sm90_config(key, (4, 0)) == c._SM90_CONFIG[(3, 9)][key]
        assert c.sm90_config(key, (3, 8)) == c._SM90_CONFIG[(3, 8)][key]
    assert c.sm90_config("moments_cl16_block_c") in (64, 128)
