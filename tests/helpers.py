"""Shared test helpers: a comparison that says where tensors differ, per-dtype
tolerances, input factories for odd shapes and memory layouts, the device
on which the Triton kernels can be tested, and the two-rank gloo runner of the
DDP tests."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

# Tolerances per dtype of the *compared* tensors (outputs are cast to the input
# dtype; a bf16 store can round one ulp differently from PyTorch's cast).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol=None, atol=None, name: str = "tensor") -> None:
    """torch.testing.assert_close, plus where and how badly the tensors differ."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = TOL.get(expected.dtype, TOL[torch.float32])
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=False) | torch.isnan(a) != torch.isnan(e)
    if bool(bad.any()):
        idx = bad.nonzero()[:8]
        lines = [f"  at {tuple(i.tolist())}: got {a[tuple(i)].item():.8g}, expected {e[tuple(i)].item():.8g}" for i in idx]
        diff = (a - e).abs()
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        worst = diff.argmax()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (rtol={rtol}, atol={atol}); "
            f"max abs diff {diff.max().item():.4g} at flat index {int(worst)}\n" + "\n".join(lines)
        )


def kernel_device() -> torch.device:
    """Where the Triton kernels can be tested: CPU under the interpreter
    (TRITON_INTERPRET=1 with DEBIAS_OPS_BACKEND=triton), else CUDA when present;
    otherwise the test is skipped."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        if os.environ.get("DEBIAS_OPS_BACKEND") != "triton":
            pytest.skip("under TRITON_INTERPRET=1 the kernels run on CPU tensors with DEBIAS_OPS_BACKEND=triton")
        return torch.device("cpu")
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
        except ImportError:
            pytest.skip("triton not installed")
        if os.environ.get("DEBIAS_OPS_BACKEND", "auto") == "reference":
            pytest.skip("DEBIAS_OPS_BACKEND=reference")
        return torch.device("cuda")
    pytest.skip("kernel tests need a GPU, or TRITON_INTERPRET=1 with DEBIAS_OPS_BACKEND=triton")


def cuda_device() -> torch.device:
    """A real CUDA device for the GPU-only tests (no interpreter), else the test is skipped."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("GPU tests run without the interpreter")
    pytest.importorskip("triton")
    return torch.device("cuda")


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: 'contiguous', 'channels_last',
    'strided' (a non-contiguous view: every other element of a wider tensor), or
    'offset' / 'offset_cl' (4-D: a view at a non-zero storage offset into a larger
    NCHW / channels_last tensor whose other entries are NaN, so that a kernel
    ignoring the offset or reading outside the view produces NaN)."""
    if layout in ("offset", "offset_cl"):
        B, C, H, W = x.shape
        fmt = torch.channels_last if layout == "offset_cl" else torch.contiguous_format
        big = torch.full((B + 1, C + 3, H, W), float("nan"), dtype=x.dtype, device=x.device)
        view = big.contiguous(memory_format=fmt)[1:, 2:2 + C]
        view.copy_(x)
        assert view.storage_offset() > 0
        return view
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        view = wide[..., ::2]
        assert not view.is_contiguous() or x.shape[-1] <= 1
        return view
    raise ValueError(layout)


# ----------------------------------------------------------------------------- two gloo ranks (DDP tests)
WORLD = 2


def run_gloo(fn, out_dir) -> None:
    """Run ``fn(rank, out_dir)`` in WORLD spawned processes joined in a gloo process group
    (``fn`` must be a module-level function, for pickling)."""
    import torch.multiprocessing as mp
    mp.spawn(_gloo_worker, args=(fn, str(out_dir)), nprocs=WORLD, join=True)


def _gloo_worker(rank: int, fn, out_dir: str) -> None:
    import torch.distributed as dist
    # Rendezvous through a file in the test's tmp dir (no port to pick and race for);
    # gloo itself connects the ranks over loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        fn(rank, out_dir)
        # Every rank finishes its collectives (and frees its DDP reducer) before teardown.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_ranks_agree(r0, r1, what):
    """Both ranks dropped (different classes) and ended with bit-identical, moved parameters."""
    assert not torch.equal(r0["drops"], r1["drops"]), "ranks were meant to drop different classes"
    assert r0["drops"].any()
    moved = False
    for i, (a, b, a0) in enumerate(zip(r0["params"], r1["params"], r0["init"])):
        assert torch.equal(a, b), f"{what}: parameter {i} differs between ranks: max diff {(a - b).abs().max():.3g}"
        moved |= not torch.equal(a, a0)
    assert moved, "training did not change the parameters"


# ----------------------------------------------------------------------------- a miniature Cityscapes (recipe tests)
CITYSCAPES_HW = (64, 128)
# Real label IDs: road, sidewalk, building, sky, person, car, and ignored ones (unlabeled, ego vehicle, static)
REGIONS = (7, 8, 11, 23, 24, 26, 0, 1, 4)


def make_cityscapes(root: Path, counts=(("train", 4), ("val", 2)), bad_id=None) -> Path:
    """A miniature dataset in the exact Cityscapes layout (64x128 PNGs, *_gtFine_labelIds.png masks)."""
    import numpy as np
    from cityscapesscripts.helpers.labels import id2label
    from PIL import Image
    H, W = CITYSCAPES_HW
    rng = np.random.default_rng(0)
    for split, n in counts:
        for i in range(n):
            city = ("aachen", "bochum")[i % 2]
            stem = f"{city}_{i:06d}_000019"
            ids = np.zeros((H, W), np.uint8)
            cuts = np.sort(rng.choice(np.arange(8, W - 8), size=len(REGIONS) - 1, replace=False))
            for lab, (a, b) in zip(rng.permutation(REGIONS), zip(np.r_[0, cuts], np.r_[cuts, W])):
                ids[:, a:b] = lab
            ids[H // 2:, : W // 4] = 7  # some road in every image
            if bad_id is not None and split == "train":
                ids[0, 0] = bad_id
            colour = np.array([id2label[int(v)].color for v in range(34)], np.float32)[np.minimum(ids, 33)]
            img = np.clip(colour + rng.normal(0, 20, colour.shape), 0, 255).astype(np.uint8)
            for sub, name, arr in (("leftImg8bit", f"{stem}_leftImg8bit.png", img),
                                   ("gtFine", f"{stem}_gtFine_labelIds.png", ids)):
                d = root / sub / split / city
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(d / name)
    return root


def cityscapes_args(root, out, *extra):
    return ["--data", "cityscapes", "--root", str(root), "--model", "FPN", "--encoder", "resnet18",
            "--batch", "2", "--crop", "32", "64", "--base-size", "64", "--scale", "0.75", "1.25",
            "--workers", "0", "--device", "cpu", "--no-progress", "--out", str(out), *extra]
