"""debias_ops.context: co-occurrence statistics of label maps and the context-conflict evaluation."""
from __future__ import annotations

import io
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from debias_ops.context import VIEWS, ContextConflictEval, ContextStatistics
from tests.helpers import assert_close

NAN = float("nan")
STEPS = ((-1, 0), (1, 0), (0, -1), (0, 1))


# ---- the definitions, written with Python loops (an independent check of the vectorised code) ----

def _valid(v, C, ignore):
    return 0 <= v < C and v != ignore


def _nbs(m, i, j):
    H, W = len(m), len(m[0])
    return [m[i + di][j + dj] for di, dj in STEPS if 0 <= i + di < H and 0 <= j + dj < W]


def stats_loops(maps, C, ignore=255):
    images, pixels, boundary = (torch.zeros(C, dtype=torch.long) for _ in range(3))
    cooc, touch, touch_images = (torch.zeros(C, C, dtype=torch.long) for _ in range(3))
    for m in maps.tolist():
        touched = set()
        present = {v for row in m for v in row if _valid(v, C, ignore)}
        for a in present:
            images[a] += 1
            for b in present:
                cooc[a, b] += 1
        for i, row in enumerate(m):
            for j, a in enumerate(row):
                if not _valid(a, C, ignore):
                    continue
                pixels[a] += 1
                others = {b for b in _nbs(m, i, j) if _valid(b, C, ignore) and b != a}
                boundary[a] += bool(others)
                for b in others:
                    touch[a, b] += 1
                    touched.add((a, b))
        for a, b in touched:
            touch_images[a, b] += 1
    return dict(num_images=torch.tensor(len(maps)), images=images, pixels=pixels, boundary=boundary,
                cooccurrence=cooc, touch=touch, touch_images=touch_images)


def eval_loops(preds, maps, C, context, ignore=255):
    counts = torch.zeros(3, 4, C, dtype=torch.long)
    for p, m in zip(preds.tolist(), maps.tolist()):
        present = {v for row in m for v in row if _valid(v, C, ignore)}
        for c in range(C):
            ctx = set(context[c])
            band = {(i, j) for i, row in enumerate(m) for j, v in enumerate(row)
                    if (v == c and ctx & set(_nbs(m, i, j))) or (v in ctx and c in _nbs(m, i, j))}
            # c without its context: no pixel of c has a context pixel among its neighbours
            views = [(0, True, set()), (1, c in present and ctx and not any(m[i][j] == c for i, j in band), set()),
                     (2, c in present and bool(ctx), band)]
            for v, included, skip in views:
                if not included:
                    continue
                counts[v, 3, c] += c in present
                for i, row in enumerate(m):
                    for j, t in enumerate(row):
                        if not _valid(t, C, ignore) or (i, j) in skip:
                            continue
                        counts[v, 0, c] += t == c and p[i][j] == c
                        counts[v, 1, c] += t != c and p[i][j] == c
                        counts[v, 2, c] += t == c and p[i][j] != c
    return counts


def random_maps(B, H, W, C, seed, ignore_frac=0.1):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, C, (B, H, W), generator=g)
    t[torch.rand(B, H, W, generator=g) < ignore_frac] = 255
    t[torch.rand(B, H, W, generator=g) < 0.03] = C + 2  # out of range: ignored like ignore_index
    return t


# ---- a planted dependency: class 2 (boat) always sits on class 1 (water) ----
# 0: background in every image; 3: a patch unrelated to boats; 4: never labelled.

def planted(i, water, boat, H=12, W=16):
    m = torch.zeros(H, W, dtype=torch.long)
    if water:
        m[6:, :] = 1
    if boat:
        m[3:6, 4:8] = 2  # 12 pixels; its bottom row touches the water
    if i % 2 == 0:
        m[0:2, 10:14] = 3
    m[0, 0] = 255
    return m


def train_maps():
    return torch.stack([planted(i, water=i % 5 in (0, 1, 2) or i % 10 == 3, boat=i % 5 in (0, 1, 2))
                        for i in range(20)])


def test_planted_context_is_found():
    stats = ContextStatistics(5)
    stats.update(train_maps())
    res = stats.compute()
    assert res.num_images == 20
    assert res.images.tolist() == [20, 14, 12, 10, 0]
    # boat: 12 images x 12 pixels; 10 boundary pixels per boat, 4 of them on the water, 8 touch background
    assert res.touch[2, 1] == 48 and res.touch[2, 0] == 96 and res.boundary[2] == 120
    assert res.p_b_given_a[2, 1] == 1.0 and res.p_a_given_b[2, 1] == 12 / 14
    assert_close(res.lift[2, 1], torch.tensor(1 / 0.7, dtype=torch.float64), name="lift")
    assert res.boundary_share[2, 1] == 0.4 and res.touch_frac_a[2, 1] == 48 / 144
    assert res.touch_frac_b[2, 1].item() == res.touch[1, 2].item() / res.pixels[1].item()
    assert res.context == ((), (2,), (1,), (), ())
    # background accompanies every boat and touches it most, but is in every image (lift 1)
    assert res.context[2] == (1,)
    assert stats.compute(min_lift=1.0).context[2] == (0, 1)
    assert stats.compute(min_lift=1.0, exclude=[0]).context[2] == (1,)
    assert torch.isnan(res.p_b_given_a[4]).all() and torch.isnan(res.lift[:, 4]).all()


def street(i, on_road):
    """Road (1) along the bottom of every image; a rider (2) on it or away from it; a sign (3) in the air."""
    m = torch.zeros(10, 12, dtype=torch.long)
    m[7:, :] = 1
    if on_road is not None:
        m[(4 if on_road else 1):(7 if on_road else 4), 2:4] = 2  # on the road: the bottom row touches it
    if i % 2 == 0:
        m[1:3, 8:10] = 3
    return m


def test_context_of_a_ubiquitous_class_is_found_by_adjacency():
    # the rider stands on the road in 9 of its 10 images; the road is in every image (lift 1),
    # the background touches everything (touch lift about 1), the sign never touches the road
    maps = torch.stack([street(i, on_road=i != 0 if i < 10 else None) for i in range(16)])
    stats = ContextStatistics(4)
    stats.update(maps)
    res = stats.compute()
    assert res.lift[2, 1] == 1.0 and res.p_b_given_a[2, 1] == 1.0 and res.p_touch[2, 1] == 0.9
    assert res.touch_images[2, 1] == res.touch_images[1, 2] == 9
    # touch_rate column "road": background 16/16, rider 9/10, sign 0/8; row "rider": background 1, sign 0/5
    assert res.touch_rate[2, 1] == 0.9 and res.touch_rate[3, 1] == 0.0 and res.touch_rate[0, 1] == 1.0
    assert_close(res.touch_lift[2, 1], torch.tensor(0.9 / max((1.0 + 0.0) / 2, (1.0 + 0.0) / 2),
                                                    dtype=torch.float64), name="touch lift")
    assert res.touch_lift[0, 1] < 1.25  # background: the road is no more its neighbour than anyone's
    assert res.context[2] == (1,) and res.context[3] == () and res.context[0] == ()
    assert stats.compute(min_touch_lift=2.0).context[2] == ()  # the co-occurrence test alone misses it
    assert stats.compute(exclude=[1]).context[2] == ()


def test_touch_lift_matches_the_definition():
    t = random_maps(12, 6, 8, C=5, seed=5, ignore_frac=0.3)
    t[::3][t[::3] == 4] = 0  # class 4 absent from a third of the images
    stats = ContextStatistics(5)
    stats.update(t)
    res = stats.compute(min_images=3)
    ti, cooc = res.touch_images.double(), res.cooccurrence.double()
    expected = torch.full((5, 5), NAN, dtype=torch.float64)
    for a in range(5):
        for b in range(5):
            if a == b or cooc[a, b] == 0:
                continue
            col = [ti[c, b] / cooc[c, b] for c in range(5) if c not in (a, b) and cooc[c, b] >= 3]
            row = [ti[a, c] / cooc[a, c] for c in range(5) if c not in (a, b) and cooc[a, c] >= 3]
            expected[a, b] = ti[a, b] / cooc[a, b] / max(sum(col) / len(col), sum(row) / len(row))
    assert_close(res.touch_lift, expected, name="touch_lift")
    assert_close(res.p_touch, ti / res.images.double()[:, None], name="p_touch")


@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 7, 37), (7, 37), (2, 1, 9)])
def test_statistics_match_the_definition(shape):
    full = (1,) + shape if len(shape) == 2 else shape
    t = random_maps(*full, C=4, seed=sum(shape)).view(shape)  # (H, W) maps are one image
    stats = ContextStatistics(4)
    stats.update(t)
    ref = stats_loops(t.view(-1, *t.shape[-2:]), 4)
    for name, value in ref.items():
        assert_close(getattr(stats, name), value, name=name)


def test_ignored_pixels_neither_count_nor_touch():
    stats = ContextStatistics(3)
    stats.update(torch.tensor([[1, 255, 2], [1, 7, 2]]))
    assert stats.pixels.tolist() == [0, 2, 2]
    assert stats.touch.sum() == 0 and stats.boundary.sum() == 0
    stats.update(torch.full((1, 2, 2), 255))
    assert stats.num_images == 2 and stats.images.tolist() == [0, 1, 1]


def test_halves_merge_and_state_dict_round_trip():
    t = random_maps(6, 5, 9, C=4, seed=3)
    whole, a, b = ContextStatistics(4), ContextStatistics(4), ContextStatistics(4)
    whole.update(t)
    a.update(t[:2])
    b.update(t[2:])
    a.merge(b)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c = ContextStatistics(4)
    c.load_state_dict(torch.load(buf))
    for name in ContextStatistics._state:
        assert_close(getattr(c, name), getattr(whole, name), name=name)
    assert c.compute(min_images=1).context == whole.compute(min_images=1).context
    with pytest.raises(ValueError, match="num_classes"):
        ContextStatistics(5).load_state_dict(whole.state_dict())
    assert c.reset().touch.sum() == 0 and c.num_images == 0


# ---- the context-conflict evaluation ----

def test_conflicting_subset_is_the_planted_images():
    stats = ContextStatistics(5)
    stats.update(train_maps())
    context = stats.compute().context
    val = torch.stack([planted(0, True, True)] * 4 + [planted(1, False, True)] * 3 + [planted(3, True, False)] * 2)
    ev = ContextConflictEval(5, context, min_pixels=1)
    ev.update(val.clone(), val)  # a perfect prediction
    res = ev.compute()
    boat, water = 2, 1
    assert res.images[:, boat].tolist() == [7, 3, 7] and res.pixels[:, boat].tolist() == [84, 36, 84 - 4 * 4]
    assert res.images[:, water].tolist() == [6, 2, 6]
    assert res.pixels[:, water].tolist() == [6 * 96, 2 * 96, 6 * 96 - 4 * 4]
    assert res.iou[0, :4].tolist() == [1.0] * 4 and res.iou[1:, boat].tolist() == [1.0, 1.0]
    assert torch.isnan(res.iou[1:, [0, 3, 4]]).all() and torch.isnan(res.iou[:, 4]).all()  # no context / absent
    assert res.gap[:, boat].tolist() == [0.0, 0.0]


def tiny():
    """Two 4x5 images; image 0 has a boat (2) on water (1), image 1 a boat alone; context {2: [1]}."""
    t = torch.tensor([[[0, 0, 0, 0, 0], [0, 2, 2, 0, 0], [0, 2, 2, 0, 0], [1, 1, 1, 1, 1]],
                      [[0, 0, 0, 0, 0], [0, 2, 2, 0, 0], [0, 2, 2, 0, 0], [0, 0, 0, 0, 255]]])
    p = torch.tensor([[[0, 0, 0, 0, 0], [0, 2, 0, 0, 0], [0, 2, 2, 2, 0], [1, 2, 1, 1, 1]],
                      [[0, 0, 0, 0, 2], [0, 2, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 2]]])
    return p, t


def test_iou_by_hand():
    p, t = tiny()
    ev = ContextConflictEval(5, {2: [1]}, min_pixels=1)
    ev.update(p, t)
    res = ev.compute()
    # boat, all images: image 0 TP 3 FP 2 ((2,3), (3,1)) FN 1; image 1 TP 1 FP 1 ((0,4); (3,4) is ignored) FN 3
    # conflicting images: image 1 alone. Conflicting pixels: the band of image 0 is (2,1), (2,2) (boat on
    # water) and (3,1), (3,2) (water under boat): image 0 leaves TP 1 FN 1 FP 1 ((2,3)); image 1 is unchanged.
    assert_close(res.iou[:, 2], torch.tensor([4 / 11, 1 / 5, 2 / 8], dtype=torch.float64), name="boat iou")
    assert_close(res.gap[:, 2], torch.tensor([4 / 11 - 1 / 5, 4 / 11 - 2 / 8], dtype=torch.float64), name="gap")
    assert res.images[:, 2].tolist() == [2, 1, 2] and res.pixels[:, 2].tolist() == [8, 4, 6]
    # water: TP 4, FN 1 ((3,1) predicted boat), no FP; it has no context, so no conflict views
    assert res.iou[0, 1] == 4 / 5 and torch.isnan(res.iou[1:, 1]).all() and res.images[1:, 1].tolist() == [0, 0]
    assert torch.isnan(res.iou[:, 3:]).all() and res.pixels[:, 3:].sum() == 0  # absent classes: NaN, not 0
    rows = ev.as_rows(["bg", "water", "boat", "sky", "tree"])
    assert rows[2]["name"] == "boat" and rows[2]["iou_all"] == 4 / 11 and rows[2]["pixels_conflict_pixels"] == 6
    assert math.isnan(rows[3]["iou_all"]) and rows[3]["images_all"] == 0
    assert set(rows[0]) >= {f"{k}_{v}" for k in ("iou", "images", "pixels") for v in VIEWS}


def test_min_pixels_gives_nan():
    p, t = tiny()
    ev = ContextConflictEval(5, {2: [1]})  # default min_pixels=100: every number rests on fewer pixels
    ev.update(p, t)
    assert torch.isnan(ev.compute().iou).all()
    res = ev.compute(min_pixels=5)  # boat: 8, 4, 6 pixels; water: 5
    assert not math.isnan(res.iou[0, 2]) and math.isnan(res.iou[1, 2]) and not math.isnan(res.iou[2, 2])
    assert math.isnan(res.gap[0, 2]) and res.iou[0, 1] == 4 / 5
    assert math.isnan(ev.compute(min_pixels=6).iou[0, 1])


@pytest.mark.parametrize("B,H,W", [(1, 7, 37), (3, 5, 6), (2, 1, 4)])
def test_eval_matches_the_definition(B, H, W):
    C = 4
    t = random_maps(B, H, W, C, seed=B * H * W)
    g = torch.Generator().manual_seed(7)
    p = torch.where(torch.rand(B, H, W, generator=g) < 0.6, t, torch.randint(0, C + 1, (B, H, W), generator=g))
    context = [(1,), (2, 3), (), (0,)]
    ev = ContextConflictEval(C, context, min_pixels=1)
    ev.update(p, t)
    assert_close(ev.counts, eval_loops(p, t, C, context), name="counts")
    one = ContextConflictEval(C, context, min_pixels=1)
    for b in range(B):  # B = 1 batches of (H, W) maps, merged across two objects
        other = ContextConflictEval(C, context, min_pixels=1)
        other.update(p[b], t[b])
        one.merge(other)
    assert_close(one.counts, ev.counts, name="merged counts")


def test_eval_state_dict_and_settings():
    p, t = tiny()
    ev = ContextConflictEval(5, {2: [1]}, min_pixels=1)
    ev.update(p, t)
    other = ContextConflictEval(5, [(), (), (1,), (), ()], min_pixels=1)
    other.load_state_dict(ev.state_dict())
    assert_close(other.compute().iou, ev.compute().iou, name="iou")
    with pytest.raises(ValueError, match="context"):
        ContextConflictEval(5, {2: [0]}).merge(ev)
    with pytest.raises(ValueError, match="shape"):
        ev.update(p[:, :3], t)


def test_sync_sums_over_one_rank():
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not yet initialised")
    t = random_maps(2, 4, 6, C=3, seed=1)
    stats, ev = ContextStatistics(3), ContextConflictEval(3, [(1,), (), ()])
    stats.update(t)
    ev.update(t, t)
    before = stats.state_dict(), ev.counts.clone()
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(d, "pg"), rank=0, world_size=1)
        try:
            stats.sync()
            ev.sync()
        finally:
            dist.destroy_process_group()
    for name in ContextStatistics._state:
        assert_close(getattr(stats, name), before[0][name], name=name)
    assert_close(ev.counts, before[1], name="counts")


@pytest.mark.gpu
def test_updates_never_sync_with_the_host():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    t = random_maps(3, 9, 11, C=4, seed=2).cuda()
    stats, ev = ContextStatistics(4, device="cuda"), ContextConflictEval(4, [(1,), (2, 3), (), (0,)], min_pixels=1)
    ev.update(t, t)  # the first update moves the evaluator's tables to the GPU
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats.update(t)
        ev.update((t + 1) % 5, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(ev.counts.cpu(), eval_loops(t.cpu(), t.cpu(), 4, [(1,), (2, 3), (), (0,)])
                 + eval_loops(((t + 1) % 5).cpu(), t.cpu(), 4, [(1,), (2, 3), (), (0,)]), name="counts")
    assert_close(stats.images.cpu(), stats_loops(t.cpu(), 4)["images"], name="images")
