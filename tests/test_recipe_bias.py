"""The recipe's co-occurrence bias measurement (debias_ops/recipe/bias.py, ``--context-stats``).

A miniature Cityscapes folder (tests/helpers.py's generator, label maps replaced by planted
ones) where, in training, every car stands on the road (present in every image: only the
adjacency test can find it) and every rider on a bicycle (a co-occurrence); the val split breaks
both in known images. And the generated scenes: the rider's context recovered from the labels alone.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")
pytest.importorskip("cityscapesscripts")

from debias_ops.context import ContextConflictEval  # noqa: E402
from debias_ops.recipe import bias as B  # noqa: E402
from debias_ops.recipe import (
    cli,  # noqa: E402
    scenes,  # noqa: E402
)
from debias_ops.recipe import data as D  # noqa: E402
from debias_ops.recipe import loop as T  # noqa: E402
from tests.helpers import CITYSCAPES_HW, cityscapes_args, make_cityscapes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
H, W = CITYSCAPES_HW
# label IDs (Cityscapes' table) and the train IDs they map to
ROAD, BUILDING, SKY, PERSON, RIDER, CAR, BICYCLE = 7, 11, 23, 24, 25, 26, 33
T_ROAD, T_PERSON, T_RIDER, T_CAR, T_BICYCLE = 0, 11, 12, 13, 18
CAR_PX, RIDER_PX = 8 * 12, 8 * 8
FAIL_RIDER, FAIL_CAR = 1, 2  # the oracle's instructions, in the green channel


pytestmark = pytest.mark.usefixtures("one_thread")


def label_ids(rider="on", car="on"):
    """64x128 label IDs: sky, building, road (rows 40+, every image), a person in the building;
    car (8x12) on the road or up in the building; rider (8x8) on a bicycle (4x16) below it,
    alone ("alone"), beside a bicycle it does not touch ("apart") or absent with its bicycle (None)."""
    ids = np.full((H, W), BUILDING, np.uint8)
    ids[:16] = SKY
    ids[40:] = ROAD
    ids[0, 0] = 0  # unlabeled: ignored
    ids[20:28, 100:104] = PERSON
    if car == "on":
        ids[32:40, 10:22] = CAR  # bottom row on the road
    else:
        ids[20:28, 10:22] = CAR
    if rider is not None:
        ids[24:32, 60:68] = RIDER
    if rider == "on":
        ids[32:36, 56:72] = BICYCLE  # under the rider
    elif rider == "apart":
        ids[32:36, 100:116] = BICYCLE
    return ids


TRAIN = [label_ids(rider=None if i % 4 == 3 else "on") for i in range(8)]
VAL = [(label_ids(), 0), (label_ids(rider="alone"), FAIL_RIDER), (label_ids(car="away"), FAIL_CAR),
       (label_ids(rider="apart"), FAIL_RIDER)]


def planted_cityscapes(root):
    """make_cityscapes' folder with its label maps (and images) replaced: image red = 7 x label ID,
    green = what the oracle gets wrong in that image."""
    from PIL import Image
    make_cityscapes(root, counts=(("train", len(TRAIN)), ("val", len(VAL))))
    for split, maps in (("train", [(m, 0) for m in TRAIN]), ("val", VAL)):
        for lab in sorted((root / "gtFine" / split).glob("*/*_gtFine_labelIds.png")):
            i = int(re.match(r"[a-z]+_(\d+)_", lab.name).group(1))
            ids, fail = maps[i]
            Image.fromarray(ids).save(lab)
            img = np.zeros((H, W, 3), np.uint8)
            img[..., 0], img[..., 1] = 7 * ids, 40 * fail
            stem = lab.name[: -len("_gtFine_labelIds.png")]
            Image.fromarray(img).save(root / "leftImg8bit" / split / lab.parent.name / f"{stem}_leftImg8bit.png")
    return root


class BiasedOracle(torch.nn.Module):
    """Reads the labels from the image; where told, predicts riders as persons and cars as buildings."""

    def __init__(self):
        super().__init__()
        from cityscapesscripts.helpers.labels import id2label
        lut = torch.full((256,), 0, dtype=torch.long)
        for i, lab in id2label.items():
            if 0 <= i < 256 and 0 <= lab.trainId < 19:
                lut[i] = lab.trainId
        self.register_buffer("lut", lut)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        rgb = ((x * torch.tensor(D.STD).view(1, 3, 1, 1) + torch.tensor(D.MEAN).view(1, 3, 1, 1)) * 255).round()
        pred = self.lut[(rgb[:, 0] / 7).round().long().clamp(0, 255)]
        fail = (rgb[:, 1] / 40).round().long()
        pred[(fail == FAIL_RIDER) & (pred == T_RIDER)] = T_PERSON
        pred[(fail == FAIL_CAR) & (pred == T_CAR)] = 2  # building
        return torch.nn.functional.one_hot(pred, 19).permute(0, 3, 1, 2).float() + self.w


def test_planted_context_found_in_cityscapes_labels(tmp_path):
    root = planted_cityscapes(tmp_path / "cs")
    train = D.CityscapesSegmentation(root, "train", D.train_transforms((32, 64), 64))  # augmentation unused
    res = B.context_statistics(train, 19).compute(**B.RULE)
    assert res.num_images == 8 and res.images[T_ROAD] == 8 and res.images[T_RIDER] == 6
    # car -> road: the road is in every image (lift 1), found by adjacency: the car touches it in
    # every image, the other classes rarely (the building always, sky, person, rider, bicycle never)
    assert res.lift[T_CAR, T_ROAD] == 1.0 and res.p_touch[T_CAR, T_ROAD] == 1.0
    assert res.touch_lift[T_CAR, T_ROAD] == 1.0 / 0.2
    assert res.touch[T_CAR, T_ROAD] == 8 * 12 and res.boundary[T_CAR] == 8 * 36
    # rider -> bicycle: a co-occurrence (bicycles in 6 of 8 images, always with the rider on top)
    assert res.p_b_given_a[T_RIDER, T_BICYCLE] == 1.0 and res.lift[T_RIDER, T_BICYCLE] == 8 / 6
    assert res.context[T_CAR] == (T_ROAD,) and res.context[T_RIDER] == (T_BICYCLE,)
    assert res.context[T_PERSON] == () and res.context[2] == ()  # the building touches everything
    assert all(T_ROAD not in res.context[c] for c in range(19) if c != T_CAR)

    # evaluation of a model that fails exactly where the context is missing
    val = D.CityscapesSegmentation(root, "val", D.eval_transforms())
    ev = ContextConflictEval(19, res.context, min_pixels=1)
    iou = T.evaluate(BiasedOracle(), D.eval_loader(val, 2), 19, "cpu", on_batch=ev.update)
    got = ev.compute()
    # conflicting images: the rider alone (val 1) and beside a bicycle it does not touch (val 3); the car off the road (val 2)
    assert got.images[:, T_RIDER].tolist() == [4, 2, 4] and got.images[:, T_CAR].tolist() == [4, 1, 4]
    # rider: 64 pixels in every val image, right in val 0 and 2; its bottom row (8 pixels) on the bicycle
    # in val 0 and 2 is the contact band. all: 128 / 256; conflicting images: 0 / 128;
    # conflicting pixels: TP 2 x 56, FN 2 x 64 -> 112 / 240
    assert got.iou[:, T_RIDER].tolist() == [0.5, 0.0, 112 / 240]
    assert got.pixels[:, T_RIDER].tolist() == [256, 128, 240]
    # car: 96 pixels, wrong in val 2 only; its bottom row (12 pixels) on the road elsewhere is the band
    assert got.iou[:, T_CAR].tolist() == [0.75, 0.0, 3 * 84 / (3 * 84 + 96)]
    assert got.gap[:, T_CAR].tolist() == [0.75, 0.75 - 3 * 84 / (3 * 84 + 96)]
    assert iou[T_RIDER] == 0.5 and iou[T_CAR] == 0.75  # the all view is torchmetrics' IoU
    assert torch.isnan(got.iou[1:, T_PERSON]).all() and not torch.isnan(got.iou[0, T_PERSON])


def test_cli_context_stats_end_to_end(tmp_path, capsys):
    root = planted_cityscapes(tmp_path / "cs")
    base, dc = tmp_path / "base", tmp_path / "dc"
    flags = ("--steps", "2", "--log-every", "1", "--ckpt-every", "2", "--context-stats", "--context-min-pixels", "1")
    cli.main(cityscapes_args(root, base, *flags))
    assert "rider <- bicycle" in capsys.readouterr().out
    cached = B.load_stats(base / B.STATS_FILE)
    assert cached["dataset"] == B.dataset_key(D.CityscapesSegmentation(root, "train"), 19)
    assert cached["dataset"]["files"] == 8 and cached["dataset"]["split"] == "train"
    assert cached["context"][T_CAR] == [T_ROAD] and cached["rule"] == B.RULE
    log = json.loads((base / "log.json").read_text())
    assert log["context"]["context"]["car"] == ["road"] and log["context"]["context"]["rider"] == ["bicycle"]
    rows = {r["name"]: r for r in log["eval"][-1]["conflict"]}
    assert rows["rider"]["images_conflict_images"] == 2 and rows["car"]["pixels_conflict_pixels"] == 3 * 84 + 96
    with open(base / "eval.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 1 and float(table[0]["rider"]) == pytest.approx(log["eval"][-1]["iou"][T_RIDER])
    assert table[0]["car/conflict_images"] != "" and "sky/conflict_pixels" in table[0]

    # the resumed run reads the cache (same data set): no second pass over the labels
    cli.main(cityscapes_args(root, base, *flags[:1], "4", *flags[2:], "--resume"))
    assert "read from" in capsys.readouterr().out
    assert [len(e.get("conflict", [])) for e in json.loads((base / "log.json").read_text())["eval"]] == [19, 19]
    cli.main(cityscapes_args(root, dc, *flags, "--dropclass"))
    paths = cli.main(["plot", "--runs", str(base), str(dc), "--out", str(tmp_path / "cmp")])
    names = sorted(p.name for p in paths)
    assert names == ["context_adjacency.png", "context_iou.png", "curves.png", "iou.png"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_cache_key_follows_the_data(tmp_path):
    from PIL import Image
    root = planted_cityscapes(tmp_path / "cs")
    key = B.dataset_key(D.CityscapesSegmentation(root, "train"), 19)
    assert B.dataset_key(D.CityscapesSegmentation(root, "train"), 19) == key
    assert B.dataset_key(D.CityscapesSegmentation(root, "train"), 19, ignore_index=0) != key
    assert B.dataset_key(D.CityscapesSegmentation(root, "val"), 19)["split"] == "val"
    lab = sorted((root / "gtFine" / "train").glob("*/*_gtFine_labelIds.png"))[0]
    Image.fromarray(np.full((H, W), ROAD, np.uint8)).save(lab)  # another label map, another size
    assert B.dataset_key(D.CityscapesSegmentation(root, "train"), 19)["sha256"] != key["sha256"]
    x, y = scenes.make_split(8, 1, scenes.Config(), "train")
    mem = B.dataset_key(D.TensorSegmentation(x, y), 6)
    y[0, 0, 0] = 1 - y[0, 0, 0]
    assert B.dataset_key(D.TensorSegmentation(x, y), 6)["sha256"] != mem["sha256"]
    with pytest.raises(TypeError, match="dataset must be"):
        B.dataset_key([y], 6)


def _touches_context(lab: np.ndarray, c: int, ctx: int) -> np.ndarray:
    """Per image: does a pixel of c have a 4-neighbour of class ctx (numpy shifts)."""
    m, k = lab == c, np.pad(lab == ctx, ((0, 0), (1, 1), (1, 1)))
    near = k[:, :-2, 1:-1] | k[:, 2:, 1:-1] | k[:, 1:-1, :-2] | k[:, 1:-1, 2:]
    return (m & near).reshape(len(lab), -1).any(1)


@pytest.mark.parametrize("context,expected", [("road", scenes.FREQ), ("bicycle", scenes.BICYCLE)])
def test_scenes_rider_context_recovered_from_the_labels(context, expected):
    cfg = scenes.Config(context=context)
    train = D.TensorSegmentation(*scenes.make_split(cfg.n_train, 1, cfg, "train"))
    res = B.context_statistics(train, scenes.K).compute(**B.RULE)
    rider, sign = scenes.RARE, scenes.SIGN
    assert res.context[rider] == (expected,)  # not the background, which touches everything
    assert res.context[sign] == () and all(0 not in ctx for ctx in res.context)
    if context == "road":  # present in ~90% of images: the co-occurrence test cannot see it
        assert res.lift[rider, expected] < 1.25 <= res.touch_lift[rider, expected]
    for mode in scenes.SPLITS:
        _, lab = scenes.make_split(400, 3, cfg, mode)
        ev = ContextConflictEval(scenes.K, res.context, min_pixels=1)
        ev.update(lab, lab)
        got, y = ev.compute(), lab.numpy()
        has = (y == rider).reshape(len(y), -1).any(1)
        away = has & ~_touches_context(y, rider, expected)
        if mode == "conflicting":  # every rider away from its context
            assert away.sum() == has.sum() > 50
        assert got.images[1, rider] == away.sum() and got.pixels[1, rider] == (y[away] == rider).sum()
        m, k = y == rider, np.pad(y == expected, ((0, 0), (1, 1), (1, 1)))
        band = m & (k[:, :-2, 1:-1] | k[:, 2:, 1:-1] | k[:, 1:-1, :-2] | k[:, 1:-1, 2:])
        assert got.pixels[2, rider] == (m & ~band).sum()


RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from debias_ops.context import ContextConflictEval
from debias_ops.recipe import bias, data
rank, world, init, labels, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world)
y = torch.load(labels)
stats = bias.context_statistics(data.TensorSegmentation(y, y), 6, rank=rank, world=world)
ev = ContextConflictEval(6, stats.compute().context, min_pixels=1)
ev.update(y[rank::world], y[rank::world])
entry = bias.eval_entry(ev, [str(c) for c in range(6)], distributed=True)
if rank == 0:
    torch.save({"stats": stats.state_dict(), "entry": entry}, out)
dist.destroy_process_group()
"""


@pytest.mark.timeout(120)
def test_statistics_sharded_over_two_ranks_sum_to_one_pass(tmp_path):
    """Two gloo ranks, each over its shard of the label maps (statistics, then an evaluation):
    the summed counts are one pass's."""
    _, y = scenes.make_split(30, 2, scenes.Config(), "train")
    torch.save(y, tmp_path / "labels.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), "2", str(tmp_path / "pg"),
                               str(tmp_path / "labels.pt"), str(tmp_path / "stats.pt")], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=110)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    got = torch.load(tmp_path / "stats.pt")
    stats = B.context_statistics(D.TensorSegmentation(y, y), scenes.K)
    whole = stats.state_dict()
    ev = ContextConflictEval(6, stats.compute().context, min_pixels=1)
    ev.update(y, y)
    assert got["entry"] == B.eval_entry(ev, [str(c) for c in range(6)])
    assert any(r["images_conflict_pixels"] for r in got["entry"]["conflict"])  # some class has a context
    got = got["stats"]
    half = B.context_statistics(D.TensorSegmentation(y, y), scenes.K, rank=1, world=2)  # no process group: a shard
    assert half.num_images == 15
    for name, value in whole.items():
        assert (got[name] == value).all() if torch.is_tensor(value) else got[name] == value, name
