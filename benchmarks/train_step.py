"""Optional row: what DropClass adds to a whole training step (design §8).

DeepLabV3-ResNet50 (torchvision, random weights), B=8, 3×512×1024 inputs,
bf16 autocast, channels_last, SGD with momentum; the DeepLab head's last 1×1
classifier is replaced by a ``debias_ops.DropClassHead`` on its 256-channel
features. Two steps are timed (forward, backward, optimizer step):

* ``baseline``:  logits = head.classifier(features); loss = debias_ops.dropclass_loss
  with nothing dropped and lam = 1 (so both steps use debias_ops' fused loss);
* ``dropclass``: the head's DropClass training call (classifier, class_drop,
  selector, loss) at progress 0.5.

``overhead_pct`` = 100·(dropclass / baseline − 1); design §8's goal is ≤ 2 %.
Skipped, with a one-line reason, without a GPU, without torchvision, or when
this checkout has no ``DropClassHead``.
"""
from __future__ import annotations

from typing import List

import torch

import debias_ops

from . import cases, timing

B, H, W, K = 8, 512, 1024, 19


def _rows(runner, status: str, reason: str) -> List[dict]:
    return [runner.base_row("train_step", op="train_step", shape=f"DeepLabV3-R50 B{B} {H}x{W}", dtype="bf16-autocast",
                            mode="fwd+bwd+sgd", impl=impl, backend="triton" if impl == "dropclass" else "-",
                            status=status, reason=reason, median_ms=None, overhead_pct=None)
            for impl in ("baseline", "dropclass")]


def run(runner, quick: bool = False) -> List[dict]:
    if runner.device.type != "cuda":
        return _rows(runner, "skipped", "the training-step row needs a GPU")
    try:
        from torchvision.models.segmentation import deeplabv3_resnet50
    except ImportError:
        return _rows(runner, "skipped", "torchvision not installed (optional DeepLabV3-ResNet50 row)")
    head_cls = cases.head_class()
    if head_cls is None:
        return _rows(runner, "skipped", "debias_ops.DropClassHead not in this checkout")
    rows = _rows(runner, "pending", None)
    try:
        dev = runner.device
        torch.manual_seed(0)
        model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=K, aux_loss=False)
        trunk = torch.nn.Sequential(*list(model.classifier.children())[:-1])  # ASPP, conv3x3, BN, ReLU
        backbone = model.backbone
        head = head_cls(256, K)
        net = torch.nn.ModuleDict(dict(backbone=backbone, trunk=trunk, head=head)).to(dev, memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        x = torch.randn(B, 3, H, W, device=dev).contiguous(memory_format=torch.channels_last)
        y = torch.randint(K, (B, H, W), device=dev)

        def features():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return trunk(backbone(x)["out"])

        def baseline():
            opt.zero_grad(set_to_none=True)
            f = features()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = head.classifier(f)
            debias_ops.dropclass_loss(logits, logits, y, None, lam=1.0, alpha=0.0).loss.backward()
            opt.step()

        def dropclass():
            opt.zero_grad(set_to_none=True)
            f = features()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = head(f, y, 0.5)
            out[0].backward()
            opt.step()

        with debias_ops.value_checks(False), cases.backend_env("auto"):
            for row, fn in zip(rows, (baseline, dropclass)):
                rep = 500 if quick else 1500
                row["median_ms"] = timing.gpu_bench(fn, warmup_ms=300, rep_ms=rep)
                row["status"] = "ok"
        rows[1]["overhead_pct"] = 100.0 * (rows[1]["median_ms"] / rows[0]["median_ms"] - 1.0)
    except Exception as err:
        msg = f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]
        for row in rows:
            if row["status"] != "ok":
                row.update(status="error", reason=msg)
        torch.cuda.empty_cache()
    return rows
