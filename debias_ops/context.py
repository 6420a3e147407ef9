"""Co-occurrence (context) bias in segmentation labels, and an evaluation where the context is missing.

A class b is a *context* of class a when the training labels rarely show a without b
(boats on water, riders on bicycles). A model may then learn "water, hence boat" and
segment boats worse where there is no water. :class:`ContextStatistics` measures such
dependencies from label maps; :class:`ContextConflictEval` scores a model on the val
images and pixels where they are broken.

Conventions. A pixel is *valid* if its label lies in [0, num_classes) and is not
``ignore_index``; other labels are ignored (no error is raised, to keep ``update`` free
of host syncs). Class c is *present* in an image if at least one valid pixel is c.
Adjacency is the 4-neighbourhood: a pixel of a *touches* b ≠ a if one of its up to four
edge neighbours is a valid pixel of b; a *boundary* pixel of a touches some other class.

Statistics, summed over N images:

    images[a]            images in which a is present    cooccurrence[a, b]  images with both a and b
    pixels[a]            valid pixels of a               boundary[a]         boundary pixels of a
    touch[a, b]          pixels of a that touch b (a pixel counts once per class it touches)
    touch_images[a, b]   images in which some pixel of a touches b (symmetric in a and b)

    p_b_given_a[a, b]    = cooccurrence[a, b] / images[a]   P(b present | a present)
    p_a_given_b[a, b]    = cooccurrence[a, b] / images[b]   P(a present | b present)
    lift[a, b]           = p_b_given_a[a, b] / (images[b] / N)
    touch_frac_a[a, b]   = touch[a, b] / pixels[a]          fraction of a's pixels that touch b
    touch_frac_b[a, b]   = touch[b, a] / pixels[b]          fraction of b's pixels that touch a
    boundary_share[a, b] = touch[a, b] / boundary[a]        fraction of a's boundary that touches b
    p_touch[a, b]        = touch_images[a, b] / images[a]   P(a touches b | a present)
    touch_rate[a, b]     = touch_images[a, b] / cooccurrence[a, b]   P(a touches b | a and b present)
    touch_lift[a, b]     = touch_rate[a, b] / max(mean_c touch_rate[c, b], mean_c touch_rate[a, c])

where both means run over the other classes c ∉ {a, b} with cooccurrence >= min_images (the
pair's column and row of the touch_rate table; an empty mean is NaN). The touch lift asks whether
a touches b more often than the other classes touch b, *and* more often than a touches the other
classes: a neighbour of everything (a background around every object) has touch lift ≈ 1 from
either side, while a rider standing on a road present in 90% of images has one well above 1
(1.35 to 1.56 in the recipe's generated scenes: 8 draws of 500 and 3 of 2000 training images,
where every other pair passing the other tests stays below 1.22; with 200 images both reach 1.3).

A ratio with a zero denominator is NaN (the touch lift is +inf when its baseline is 0). Context
rule: b is a context class of a iff b ≠ a, b is not in ``exclude``, and

    images[a]            >= min_images        (default 5: enough evidence about a)
    boundary_share[a, b] >= min_touch         (default 0.1: a and b touch, not merely share images)

and at least one of two kinds of dependency holds:

    co-occurrence:  p_b_given_a[a, b] >= min_cooccurrence (default 0.5: b accompanies a at least
                    half the time) and lift[a, b] >= min_lift (default 1.25: more often than b's
                    base rate; a class present in over 80% of images never passes this test)
    adjacency:      p_touch[a, b] >= min_cooccurrence (a touches b at least half the time) and
                    touch_lift[a, b] >= min_touch_lift (default 1.25)

The adjacency test is what finds the context of a near-ubiquitous class (the road under a rider)
and rejects a class that touches everything (lift ≈ 1 on both sides). The boundary share is used
rather than touch_frac_a because the latter shrinks as objects grow. ``context[a]`` lists a's
context classes by decreasing P(b | a), then P(a touches b | a); unseen classes have none.

Context-conflict evaluation. Given context sets ctx(c), per class c and view, count over
valid target pixels TP (target c, predicted c), FP (target not c, predicted c) and FN
(target c, predicted not c); a prediction outside [0, num_classes) is "no class". Views:

    all              every image
    conflict_images  images in which c is present and no pixel of c touches a pixel of ctx(c)
                     (c without its context: the context absent, or present but elsewhere)
    conflict_pixels  images in which c is present, minus the 1-pixel contact band: the pixels of c
                     adjacent to a ctx(c) pixel and the ctx(c) pixels adjacent to a c pixel. So
                     TP + FN = the pixels of c not adjacent to its context, and FP = false c
                     predictions in those images except on context pixels bordering c.

IoU = TP / (TP + FP + FN). It is NaN when the view holds no image with c, or fewer than
``min_pixels`` (default 100) target pixels of c (TP + FN); both conflict views are NaN for
a class with no context. gap = IoU(all) - IoU(conflict view): positive when c is segmented
worse without its context. The all view also counts FP in images without c, which the
conflict views never see; compare gaps across models rather than reading one in isolation.

Distributed evaluation: the state is integer count tensors, so ``merge`` adds them and
``sync`` all-reduces them with SUM across ranks (exact, deterministic). Call ``sync``
once, before ``compute``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

__all__ = ["ContextStatistics", "ContextResult", "ContextConflictEval", "ConflictResult", "VIEWS"]

VIEWS = ("all", "conflict_images", "conflict_pixels")
_NAN = float("nan")


def _batch(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.is_floating_point() or x.is_complex():
        raise ValueError(f"{what} must be integer label maps (B, H, W) or (H, W), got {x.dtype} {tuple(x.shape)}")
    return x.long()


def _labels(t: torch.Tensor, C: int, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(labels with every invalid pixel set to C, valid mask)."""
    valid = (t >= 0) & (t < C) & (t != ignore_index)
    return torch.where(valid, t, torch.full_like(t, C)), valid


def _count(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Counts of 0..n-1 in idx (values in [0, n]; n is a discarded bin). No host sync."""
    idx = idx.reshape(-1)
    out = torch.zeros(n + 1, dtype=torch.long, device=idx.device)
    return out.scatter_add_(0, idx, torch.ones_like(idx))[:n]


def _neighbours(x: torch.Tensor, fill) -> List[torch.Tensor]:
    """The up, down, left and right neighbours of every pixel of x (B, H, W); ``fill`` outside."""
    B, H, W = x.shape
    p = x.new_full((B, H + 2, W + 2), fill)
    p[:, 1:-1, 1:-1] = x
    return [p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]


def _near(mask: torch.Tensor) -> torch.Tensor:
    """Pixels with a 4-neighbour in mask (B, H, W) bool."""
    up, down, left, right = _neighbours(mask, False)
    return up | down | left | right


def _touches(lab: torch.Tensor, valid: torch.Tensor, C: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(per image [a, b]: pixels of a that touch b (B, C, C), boundary mask (B, H, W)); labels as from _labels."""
    B = lab.shape[0]
    nbs = _neighbours(lab, C)
    image = torch.arange(B, device=lab.device).view(B, 1, 1)
    keys, touches = [], torch.zeros_like(valid)
    for i, nb in enumerate(nbs):
        ok = valid & (nb < C) & (nb != lab)
        touches |= ok
        for prev in nbs[:i]:  # a pixel touching b on two sides counts once
            ok &= nb != prev
        keys.append(torch.where(ok, (image * C + lab) * C + nb, B * C * C))
    return _count(torch.stack(keys), B * C * C).view(B, C, C), touches


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = torch.broadcast_tensors(a.double(), b.double())
    ok = b > 0
    return torch.where(ok, a / torch.where(ok, b, torch.ones_like(b)), torch.full_like(a, _NAN))


class _Counts:
    """Integer count tensors (names in ``_state``) that add across batches, processes and ranks."""

    _state: Tuple[str, ...] = ()

    def _meta(self) -> Dict[str, object]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index}

    def _follow(self, device: torch.device) -> None:
        for n in self._state:
            setattr(self, n, getattr(self, n).to(device))

    def reset(self):
        """Zero every count; returns self."""
        for n in self._state:
            getattr(self, n).zero_()
        return self

    def state_dict(self) -> Dict[str, object]:
        """The counts (CPU copies) and the settings they depend on; ``torch.save``-able."""
        return {**self._meta(), **{n: getattr(self, n).detach().cpu().clone() for n in self._state}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Replace the counts with ``state``'s; its settings must match this object's."""
        self._check({k: state.get(k) for k in self._meta()})
        for n in self._state:
            getattr(self, n).copy_(state[n])

    def merge(self, other):
        """Add another object's counts (same class and settings) to this one's; returns self."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        self._check(other._meta())
        for n in self._state:
            getattr(self, n).add_(getattr(other, n).to(getattr(self, n).device))
        return self

    def sync(self, process_group=None):
        """Sum the counts over the ranks of ``process_group`` in place (no-op without torch.distributed);
        call once, before ``compute``. With NCCL the counts must be on the GPU. Returns self."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        parts = [getattr(self, n) for n in self._state]
        flat = torch.cat([p.reshape(-1) for p in parts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
        for p, q in zip(parts, flat.split([p.numel() for p in parts])):
            p.copy_(q.view_as(p))
        return self

    def _check(self, meta: Mapping[str, object]) -> None:
        mine = self._meta()
        if dict(meta) != mine:
            bad = [k for k in mine if meta.get(k) != mine[k]]
            raise ValueError(f"settings differ: {', '.join(f'{k}={meta.get(k)!r} vs {mine[k]!r}' for k in bad)}")


def _touch_lift(touch_images: torch.Tensor, cooc: torch.Tensor, min_images: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(touch_rate, touch_lift) of the module docstring, float64 (C, C)."""
    rate = _div(touch_images, cooc)
    use = (cooc >= max(int(min_images), 1)) & ~torch.eye(cooc.shape[0], dtype=torch.bool)
    r = torch.where(use, rate, torch.zeros_like(rate))
    u = use.double()
    # column b of rate without rows a and b: (sum over used c of rate[c, b]) - rate[a, b] if (a, b) is used
    col_n, col_s = u.sum(0)[None, :] - u, r.sum(0)[None, :] - r
    row_n, row_s = u.sum(1)[:, None] - u, r.sum(1)[:, None] - r
    col = torch.where(col_n > 0, col_s / col_n.clamp(min=1), torch.full_like(r, _NAN))
    row = torch.where(row_n > 0, row_s / row_n.clamp(min=1), torch.full_like(r, _NAN))
    lift = rate / torch.maximum(col, row)  # NaN propagates through maximum; x / 0 = inf, 0 / 0 = NaN
    lift.fill_diagonal_(_NAN)
    return rate, lift


@dataclass(frozen=True)
class ContextResult:
    """:meth:`ContextStatistics.compute`'s result (module docstring): CPU tensors, counts int64,
    ratios float64 (C, C) indexed [a, b]; ``context[a]``, the context classes of a."""

    num_images: int
    images: torch.Tensor
    pixels: torch.Tensor
    boundary: torch.Tensor
    cooccurrence: torch.Tensor
    touch: torch.Tensor
    p_b_given_a: torch.Tensor
    p_a_given_b: torch.Tensor
    lift: torch.Tensor
    touch_frac_a: torch.Tensor
    touch_frac_b: torch.Tensor
    boundary_share: torch.Tensor
    touch_images: torch.Tensor
    p_touch: torch.Tensor
    touch_rate: torch.Tensor
    touch_lift: torch.Tensor
    context: Tuple[Tuple[int, ...], ...]


class ContextStatistics(_Counts):
    """Image co-occurrence and pixel adjacency counts of training label maps (module docstring).

    ``update(target)`` accepts (B, H, W) or (H, W) integer label maps on any device; the
    counts move to that device and ``update`` never syncs with the host."""

    _state = ("num_images", "images", "pixels", "boundary", "cooccurrence", "touch", "touch_images")

    def __init__(self, num_classes: int, ignore_index: int = 255, device: Optional[torch.device] = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        C = self.num_classes
        self.num_images = torch.zeros((), dtype=torch.long, device=device)
        self.images, self.pixels, self.boundary = (torch.zeros(C, dtype=torch.long, device=device) for _ in range(3))
        self.cooccurrence = torch.zeros(C, C, dtype=torch.long, device=device)
        self.touch = torch.zeros(C, C, dtype=torch.long, device=device)
        self.touch_images = torch.zeros(C, C, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, target: torch.Tensor) -> None:
        t = _batch(target, "target")
        self._follow(t.device)
        C, B = self.num_classes, t.shape[0]
        lab, valid = _labels(t, C, self.ignore_index)
        image = torch.arange(B, device=t.device).view(B, 1, 1)
        per_class = _count(torch.where(valid, image * C + lab, B * C), B * C).view(B, C)  # pixels per image
        present = per_class > 0
        self.num_images += B
        self.images += present.sum(0)
        self.cooccurrence += (present[:, :, None] & present[:, None, :]).sum(0)
        self.pixels += per_class.sum(0)
        per_image, touches = _touches(lab, valid, C)
        self.touch += per_image.sum(0)
        self.touch_images += (per_image > 0).sum(0)
        self.boundary += _count(torch.where(touches, lab, C), C)

    @torch.no_grad()
    def compute(self, *, min_images: int = 5, min_cooccurrence: float = 0.5, min_lift: float = 1.25,
                min_touch: float = 0.1, min_touch_lift: float = 1.25, exclude: Sequence[int] = ()) -> ContextResult:
        """Ratios and context sets from the counts; thresholds as in the module docstring.
        ``exclude``: classes (e.g. background) never reported as anyone's context."""
        s = {n: getattr(self, n).cpu() for n in self._state}
        images, cooc, touch, N = s["images"], s["cooccurrence"], s["touch"], s["num_images"]
        p_b_given_a = _div(cooc, images[:, None])
        lift = _div(p_b_given_a, _div(images, N)[None, :])
        share = _div(touch, s["boundary"][:, None])
        p_touch = _div(s["touch_images"], images[:, None])
        rate, touch_lift = _touch_lift(s["touch_images"], cooc, min_images)
        enough = (images[:, None] >= min_images) & (share >= min_touch)  # comparisons with NaN are False
        by_cooccurrence = (p_b_given_a >= min_cooccurrence) & (lift >= min_lift)
        by_adjacency = (p_touch >= min_cooccurrence) & (touch_lift >= min_touch_lift)
        ok = enough & (by_cooccurrence | by_adjacency)
        ok.fill_diagonal_(False)
        ok[:, list(exclude)] = False
        pba, pt = p_b_given_a.tolist(), p_touch.tolist()
        context = tuple(tuple(sorted(ok[a].nonzero().flatten().tolist(), key=lambda b, a=a: (-pba[a][b], -pt[a][b], b)))
                        for a in range(self.num_classes))
        return ContextResult(
            num_images=int(N), images=images, pixels=s["pixels"], boundary=s["boundary"], cooccurrence=cooc,
            touch=touch, p_b_given_a=p_b_given_a, p_a_given_b=_div(cooc, images[None, :]), lift=lift,
            touch_frac_a=_div(touch, s["pixels"][:, None]), touch_frac_b=_div(touch.T, s["pixels"][None, :]),
            boundary_share=share, touch_images=s["touch_images"], p_touch=p_touch, touch_rate=rate,
            touch_lift=touch_lift, context=context,
        )


@dataclass(frozen=True)
class ConflictResult:
    """:meth:`ContextConflictEval.compute`'s result, CPU tensors indexed [view, class], views in
    ``VIEWS`` order: iou (3, C) float64; gap (2, C) = iou[0] - iou[1:]; images and pixels (3, C)
    int64, the images with c and the target pixels of c that each IoU rests on."""

    iou: torch.Tensor
    gap: torch.Tensor
    images: torch.Tensor
    pixels: torch.Tensor

    def as_rows(self, class_names: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
        """One dict per class, for CSV or JSON logs: class (and name), iou_<view>,
        gap_images, gap_pixels, images_<view>, pixels_<view>. NaN stays NaN."""
        rows = []
        for c in range(self.iou.shape[1]):
            row: Dict[str, object] = {"class": c}
            if class_names is not None:
                row["name"] = class_names[c]
            row.update({f"iou_{v}": self.iou[i, c].item() for i, v in enumerate(VIEWS)})
            row.update(gap_images=self.gap[0, c].item(), gap_pixels=self.gap[1, c].item())
            row.update({f"images_{v}": int(self.images[i, c]) for i, v in enumerate(VIEWS)})
            row.update({f"pixels_{v}": int(self.pixels[i, c]) for i, v in enumerate(VIEWS)})
            rows.append(row)
        return rows


class ContextConflictEval(_Counts):
    """IoU per class on all val images and on the views where the class's context is missing
    (module docstring). ``context``: per class, its context classes, as a sequence of length
    num_classes (e.g. ``ContextResult.context``) or a mapping {class: classes}."""

    _state = ("counts",)  # (view, [TP, FP, FN, images with c], class)

    def __init__(self, num_classes: int, context: Union[Sequence[Sequence[int]], Mapping[int, Sequence[int]]],
                 ignore_index: int = 255, min_pixels: int = 100, device: Optional[torch.device] = None):
        C = self.num_classes = int(num_classes)
        self.ignore_index, self.min_pixels = int(ignore_index), int(min_pixels)
        if isinstance(context, Mapping):
            context = [context.get(c, ()) for c in range(C)]
        if len(context) != C:
            raise ValueError(f"context has {len(context)} entries for {C} classes")
        self.context = tuple(tuple(sorted({int(b) for b in context[c]} - {c})) for c in range(C))
        if any(not 0 <= b < C for ctx in self.context for b in ctx):
            raise ValueError(f"context classes must lie in [0, {C})")
        self._ctx = torch.zeros(C + 1, C + 1, dtype=torch.bool)  # [c, k]: k in ctx(c); row/column C: invalid
        for c, ctx in enumerate(self.context):
            self._ctx[c, list(ctx)] = True
        self.counts = torch.zeros(len(VIEWS), 4, C, dtype=torch.long, device=device)

    def _meta(self) -> Dict[str, object]:
        return {**super()._meta(), "context": self.context}

    def _follow(self, device: torch.device) -> None:
        super()._follow(device)
        self._ctx = self._ctx.to(device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred: predicted labels (argmax taken), target: label maps; (B, H, W) or (H, W)."""
        t, p = _batch(target, "target"), _batch(pred, "pred")
        if p.shape != t.shape:
            raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
        self._follow(t.device)
        p = p.to(t.device)
        C, B = self.num_classes, t.shape[0]
        lab, valid = _labels(t, C, self.ignore_index)
        prd = torch.where((p >= 0) & (p < C), p, torch.full_like(p, C))
        # One count of (image, target, prediction, own, fp) over the pixels gives every view. own: the
        # pixel's class touches its context here (the pixel is in its class's contact band); fp: a pixel
        # of ctx(prd) next to a prd pixel (in the predicted class's band, so no false positive there).
        own, fp = torch.zeros_like(valid), torch.zeros_like(valid)
        for nb in _neighbours(lab, C):
            own |= self._ctx[lab, nb]
            fp |= nb == prd
        fp &= self._ctx[prd, lab]
        image = torch.arange(B, device=t.device).view(B, 1, 1)
        key = (((image * (C + 1) + lab) * (C + 1) + prd) * 2 + own.long()) * 2 + fp.long()
        n = _count(key, B * (C + 1) ** 2 * 4).view(B, C + 1, C + 1, 2, 2)[:, :C]  # [image, target, pred, own, fp]
        conf = n.sum((3, 4))
        present = conf.sum(2) > 0
        has_ctx = self._ctx[:C, :C].any(1)
        conflict = present & (n[..., 1, :].sum((2, 3)) == 0) & has_ctx  # no pixel of c touches ctx(c)

        def tp_fp_fn(for_tp_fn: torch.Tensor, for_fp: torch.Tensor) -> torch.Tensor:  # (4, B, C), with present
            tp = for_tp_fn.diagonal(dim1=1, dim2=2)[:, :C]
            fp = for_fp[:, :, :C].sum(1) - for_fp.diagonal(dim1=1, dim2=2)[:, :C]
            return torch.stack([tp, fp, for_tp_fn.sum(2) - tp, present.long()])

        every = tp_fp_fn(conf, conf)
        self.counts[0] += every.sum(1)
        self.counts[1] += (every * conflict).sum(1)
        self.counts[2] += (tp_fp_fn(n[..., 0, :].sum(3), n[..., 0].sum(3)) * (present & has_ctx)).sum(1)

    @torch.no_grad()
    def compute(self, min_pixels: Optional[int] = None) -> ConflictResult:
        """IoU per view and class; NaN without images or below ``min_pixels`` target pixels
        (default: the constructor's)."""
        k = self.counts.cpu()
        tp, fp, fn, images = k.unbind(1)
        pixels = tp + fn
        least = max(self.min_pixels if min_pixels is None else int(min_pixels), 1)
        iou = _div(tp, tp + fp + fn)
        iou = torch.where((images > 0) & (pixels >= least), iou, torch.full_like(iou, _NAN))
        return ConflictResult(iou=iou, gap=iou[:1] - iou[1:], images=images, pixels=pixels)

    def as_rows(self, class_names: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
        """``compute().as_rows(class_names)``."""
        return self.compute().as_rows(class_names)
