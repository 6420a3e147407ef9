"""debias_ops: fused Triton kernels for DropClass (Chu, Kim, Han, NeurIPS 2021).

Public API (design §5)::

    out  = suppress(feats, class_logits, k, *, drop=None)        # importance from logits
    out  = class_drop(feats, class_weight, k=None, *, drop=None)  # the paper's, from weights
    S    = class_importance(feats, class_logits)                  # (K, C)
    res  = dropclass_loss(logits, logits_drop, target, drop, *, lam, alpha=10.0,
                          weight=None, ignore_index=255)          # (loss, ce, ce_drop, sup)
    drop = sample_drop(batch, num_classes, p, *, generator=None, device=None, per_sample=True)
    head = DropClassHead(in_channels, num_classes, importance="weight", k=None, alpha=10.0)  # design §6
    t    = progress(epoch, epochs)                                # training progress for the head
    model = dropclass(model, importance="weight", alpha=10.0)     # wrap a torchvision/smp model
    ov   = class_overlap(S, k)                                    # K×K top-k channel overlap (disentanglement)
    st   = ContextStatistics(num_classes); st.update(labels)      # co-occurrence / adjacency of classes
    ev   = ContextConflictEval(num_classes, st.compute().context) # IoU where a class lacks its context

CUDA tensors run the Triton kernels, anything else the reference; the
environment variable DEBIAS_OPS_BACKEND (auto | triton | reference) overrides.
Importing needs torch only (triton is imported when a kernel first runs).
"""
from .analysis import ClassOverlap, class_overlap
from .api import class_drop, class_importance, dropclass_loss, suppress
from .context import ConflictResult, ContextConflictEval, ContextResult, ContextStatistics
from .integrations import DropClassModel, dropclass, is_dropclass, segmentation_logits
from .modules import DropClassHead, DropClassOutput, progress
from .options import DropClassOptions
from .reference import DropClassLoss
from .sampling import drop_mask, sample_drop
from .validation import set_value_checks, value_checks, value_checks_enabled

__version__ = "0.1.0"

__all__ = [
    "suppress",
    "class_drop",
    "class_importance",
    "dropclass_loss",
    "sample_drop",
    "drop_mask",
    "DropClassLoss",
    "DropClassHead",
    "DropClassOutput",
    "DropClassOptions",
    "progress",
    "dropclass",
    "DropClassModel",
    "is_dropclass",
    "segmentation_logits",
    "class_overlap",
    "ClassOverlap",
    "ContextStatistics",
    "ContextResult",
    "ContextConflictEval",
    "ConflictResult",
    "set_value_checks",
    "value_checks",
    "value_checks_enabled",
]
