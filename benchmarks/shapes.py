"""Benchmark shapes (design §8) and the sweeps.

A :class:`Shape` is the feature map of a segmentation head: ``feats`` (B, C, H, W),
``class_logits`` / ``logits`` (B, K, H, W), labels at ``label_scale`` times the
feature resolution (the loss upsamples the logits to the label size, design §4).

* GPU shapes (design §8): W48 = HRNet-W48 head on a Cityscapes crop
  (B=8, C=720, 128×256, K=19, labels 512×1024); W18s = HRNet-W18-small (B=12, C=270).
* CPU mode: one small shape (reference vs torch.compile on CPU).
* Interpreter / CI: one tiny shape (the Triton interpreter runs programs one by one).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Tuple

import torch


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    C: int
    H: int
    W: int
    K: int
    label_scale: int = 4

    @property
    def N(self) -> int:
        """Positions per sample, H·W."""
        return self.H * self.W

    @property
    def label_hw(self) -> Tuple[int, int]:
        return (self.H * self.label_scale, self.W * self.label_scale)

    def with_(self, **kw) -> "Shape":
        return replace(self, **kw)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["N"] = self.N
        d["label_hw"] = list(self.label_hw)
        return d


GPU_SHAPES: Dict[str, Shape] = {
    "W48": Shape("W48", B=8, C=720, H=128, W=256, K=19),
    "W18s": Shape("W18s", B=12, C=270, H=128, W=256, K=19),
}
CPU_SHAPES: Dict[str, Shape] = {
    "cpu-small": Shape("cpu-small", B=2, C=64, H=32, W=64, K=19),
}
TINY_SHAPES: Dict[str, Shape] = {
    "tiny": Shape("tiny", B=2, C=16, H=8, W=8, K=5, label_scale=2),
}

DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# ----------------------------------------------------------------------------- sweeps
# Each sweep varies one parameter of a base shape; the CLI fits time = a + s·x with
# x the number of elements the op streams (see byte_model.sweep_elements) and
# reports the slope s (ns per element) and R².
#   "N": H·W (for the loss: the low-resolution logits' H·W; labels stay 4× larger)
#   "C": channels (for the loss: the number of classes K)
#   "B": batch

def sweep_points(mode: str, quick: bool) -> Dict[str, List[Tuple[str, int, Shape]]]:
    """{op: [(param, value, shape), ...]} for the sweeps of suppress and the loss.

    mode: "gpu", "cpu" or "tiny".
    """
    if mode == "gpu":
        base = Shape("sweep", B=8, C=256, H=128, W=256, K=19)
        hws = [(32, 64), (64, 128), (128, 128), (128, 256), (256, 256)] if not quick else [(64, 128), (128, 256), (256, 256)]
        cs = [64, 128, 256, 384, 512, 720] if not quick else [128, 384, 720]
        bs = [1, 2, 4, 8, 16] if not quick else [2, 8, 16]
        ks = [4, 8, 19, 32, 64] if not quick else [8, 19, 64]
    elif mode == "cpu":
        base = Shape("sweep", B=2, C=32, H=32, W=32, K=19)
        hws = [(16, 16), (16, 32), (32, 32), (32, 64)]
        cs = [16, 32, 48, 64]
        bs = [1, 2, 3, 4]
        ks = [4, 8, 19, 32]
    elif mode == "tiny":
        base = Shape("sweep", B=2, C=8, H=8, W=8, K=5, label_scale=2)
        hws = [(4, 8), (8, 8), (8, 16)]
        cs = [4, 8, 16]
        bs = [1, 2, 4]
        ks = [3, 5, 8]
    else:  # pragma: no cover
        raise ValueError(mode)

    def pts(param, values, make):
        return [(param, v if not isinstance(v, tuple) else v[0] * v[1], make(v)) for v in values]

    common_n = pts("N", hws, lambda hw: base.with_(H=hw[0], W=hw[1]))
    common_b = pts("B", bs, lambda b: base.with_(B=b))
    return {
        "suppress": common_n + pts("C", cs, lambda c: base.with_(C=c)) + common_b,
        "loss": common_n + pts("C", ks, lambda k: base.with_(K=k)) + common_b,
    }
