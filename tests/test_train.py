"""The training recipe (debias_ops/recipe/loop.py): end to end on a miniature Cityscapes, resume,
torchrun with 2 gloo ranks, the synthetic data, the clear errors, train_steps / evaluate.

Everything runs on CPU with tiny models and no downloaded weights (smp FPN/resnet18,
torchvision LR-ASPP, `weights=None`), one thread per process (the machine is shared).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")
pytest.importorskip("cityscapesscripts")

from debias_ops.recipe import cli  # noqa: E402
from debias_ops.recipe import data as D  # noqa: E402
from debias_ops.recipe import loop as T  # noqa: E402
from tests.helpers import CITYSCAPES_HW, cityscapes_args, make_cityscapes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
H, W = CITYSCAPES_HW


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared by several jobs: more threads only spin
    yield
    torch.set_num_threads(n)


def _log(out: Path) -> dict:
    return json.loads((out / "log.json").read_text())


# ----------------------------------------------------------------------------- data


def test_cityscapes_masks_are_train_ids(tmp_path):
    """Label IDs -> train IDs by cityscapesscripts' table, 255 for the ignored ones; joint augmentation."""
    from cityscapesscripts.helpers.labels import id2label
    from PIL import Image
    root = make_cityscapes(tmp_path / "cs", counts=(("val", 2),))
    ds = D.CityscapesSegmentation(root, "val", D.eval_transforms())
    assert len(ds) == 2 and D.cityscapes_classes()[:2] == ["road", "sidewalk"] and len(D.cityscapes_classes()) == 19
    for i in range(2):
        image, mask = ds[i]
        ids = np.asarray(Image.open(ds.base.targets[i][0]))
        expected = np.vectorize(lambda v: id2label[int(v)].trainId if id2label[int(v)].trainId < 255 else 255)(ids)
        assert image.shape == (3, H, W) and image.dtype == torch.float32
        assert mask.dtype == torch.int64 and np.array_equal(mask.numpy(), expected)
        assert (mask == 255).any() and (mask == 0).any() and (mask == 13).any()  # ignored, road, car
    aug = D.CityscapesSegmentation(root, "val", D.train_transforms((32, 48), 64, (0.5, 1.0)))
    torch.manual_seed(1)
    image, mask = aug[0]
    assert image.shape == (3, 32, 48) and mask.shape == (32, 48)
    assert set(mask.unique().tolist()) <= set(range(19)) | {255}


# ----------------------------------------------------------------------------- end to end


def test_cityscapes_end_to_end_then_resume(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    out = tmp_path / "run"
    res = cli.main(cityscapes_args(root, out, "--dropclass", "--steps", "4", "--log-every", "2", "--ckpt-every", "2",
                                 "--eval-every", "2"))
    for name in ("checkpoint.pt", "log.json", "train_log.csv", "eval.csv", "curves.png", "iou.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    log = _log(out)
    assert [r["step"] for r in log["train"]] == [1, 2, 3, 4]
    assert [r["p"] for r in log["train"]] == [0.0, 0.25, 0.5, 0.75]  # the paper's schedule: p = t = step / steps
    assert all(r["lam"] == 1 - r["p"] for r in log["train"])
    sup = [r["sup"] for r in log["train"]]
    assert sup[0] == 0.0 and max(sup) > 0.0  # nothing dropped at t = 0, then the suppression term is trained
    lrs = [r["lr"] for r in log["train"]]
    assert lrs[0] == 0.01 and all(a > b for a, b in zip(lrs, lrs[1:]))  # poly decay
    assert [e["step"] for e in log["eval"]] == [2, 4] and len(log["eval"][-1]["iou"]) == 19
    assert len(res["iou"]) == 19 and 0.0 <= res["miou"] <= 1.0
    assert (out / "train_log.csv").read_text().count("\n") == 1 + 4
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 4

    res = cli.main(cityscapes_args(root, out, "--dropclass", "--steps", "6", "--log-every", "2", "--ckpt-every", "2",
                                 "--eval-every", "2", "--resume"))
    log = _log(out)
    assert [r["step"] for r in log["train"]] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in log["eval"]] == [2, 4, 6]
    assert log["train"][4]["t"] == 4 / 6 and log["train"][4]["lr"] > 0  # the schedule of the extended run
    assert (out / "train_log.csv").read_text().count("\n") == 1 + 6
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 6
    assert res["step"] == 6

    # an interrupted run (2 steps, then resumed) is the uninterrupted run, step for step:
    # model, optimizer, scheduler, data order, augmentation and drop RNG all restored
    split = tmp_path / "split"
    common = ("--dropclass", "--steps", "4", "--log-every", "2", "--ckpt-every", "2", "--eval-every", "2")
    cli.main(cityscapes_args(root, split, *common, "--stop-after", "2"))
    assert torch.load(split / "checkpoint.pt", weights_only=False)["step"] == 2 and len(_log(split)["train"]) == 2
    cli.main(cityscapes_args(root, split, *common, "--resume"))
    assert _log(split)["train"] == log["train"][:4]
    assert _log(split)["eval"] == log["eval"][:2]

    with pytest.raises(ValueError, match="other settings.*dropclass True vs False"):
        cli.main(cityscapes_args(root, out, "--steps", "8", "--log-every", "2", "--ckpt-every", "2", "--resume"))

    # baseline vs DropClass: a second run and the comparison plots
    base = tmp_path / "base"
    cli.main(cityscapes_args(root, base, "--steps", "2", "--log-every", "2", "--ckpt-every", "2"))
    paths = cli.main(["plot", "--runs", str(base), str(out), "--out", str(tmp_path / "cmp")])
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)


def test_synthetic_runs(tmp_path):
    out = tmp_path / "syn"
    res = cli.main(["--data", "synthetic", "--model", "lraspp_mobilenet_v3_large", "--n-train", "16", "--n-val", "8",
                  "--steps", "3", "--batch", "4", "--log-every", "1", "--ckpt-every", "3", "--optimizer", "adamw",
                  "--val-mode", "conflicting",
                  "--workers", "0", "--device", "cpu", "--no-progress", "--out", str(out)])
    log = _log(out)
    assert log["classes"] == ["background", "road", "rider", "sign", "car", "bicycle"]
    assert [r["step"] for r in log["train"]] == [1, 2, 3] and len(res["iou"]) == 6
    assert log["train"][0]["lr"] == 1e-4 and log["config"]["optimizer"] == "adamw"
    with pytest.raises(ValueError, match="--sync-bn needs CUDA"):
        cli.main(["--data", "synthetic", "--model", "lraspp_mobilenet_v3_large", "--n-train", "8", "--n-val", "4",
                "--steps", "1", "--device", "cpu", "--sync-bn", "--out", str(tmp_path / "x")])


@pytest.mark.timeout(300)
def test_torchrun_two_ranks(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "debias_ops.recipe", "--data", "synthetic", "--model", "lraspp_mobilenet_v3_large",
           "--dropclass", "--n-train", "16", "--n-val", "6", "--steps", "3", "--batch", "2",
           "--log-every", "1", "--ckpt-every", "3", "--workers", "0", "--device", "cpu", "--no-progress",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]  # torchrun fails if any rank fails
    assert "2 rank(s) on cpu" in text
    assert text.count("wrote checkpoint") == 1 and "rank 0: wrote checkpoint" in text, text[-4000:]
    assert text.count("val mIoU") == 1  # logging from rank 0 only
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "curves.png", "eval.csv", "iou.png",
                                                    "log.json", "train_log.csv"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 3 and ckpt["world"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["generator"], ckpt["rng"][1]["generator"])  # per-rank drop streams


# ----------------------------------------------------------------------------- errors


def test_missing_folder_says_which_and_the_layout(tmp_path, monkeypatch):
    root = tmp_path / "cs"
    (root / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"missing folder .*gtFine/train.*_gtFine_labelIds\.png"):
        cli.main(cityscapes_args(root, tmp_path / "run", "--steps", "1"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.* is not a folder; expected the layout"):
        cli.main(cityscapes_args(tmp_path / "nowhere", tmp_path / "run", "--steps", "1"))
    # the command line ends with that one line, no traceback
    from debias_ops.recipe.cli import entry
    monkeypatch.setattr(sys, "argv", ["debias_ops.recipe", *cityscapes_args(root, tmp_path / "run", "--steps", "1")])
    with pytest.raises(SystemExit) as exc:
        entry()
    assert str(exc.value.code).startswith("error: missing folder")


def test_label_out_of_range_says_so(tmp_path):
    root = make_cityscapes(tmp_path / "cs", bad_id=40)
    with pytest.raises(ValueError, match=r"label IDs \[40\] are outside the Cityscapes label table \(0\.\.33\)"):
        cli.main(cityscapes_args(root, tmp_path / "run", "--steps", "1"))


# ----------------------------------------------------------------------------- the loop's API


class _Oracle(torch.nn.Module):
    """Predicts the label of every pixel (from a lookup), except class 1 predicted as 2."""

    def __init__(self, labels):
        super().__init__()
        self.labels = labels
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        y = self.labels[x[:, 0, 0, 0].long()].clone()
        y[y == 1] = 2
        y[y == 255] = 0
        return {"out": torch.nn.functional.one_hot(y, 4).permute(0, 3, 1, 2).float() + self.w}


def test_evaluate_iou():
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, :2] = 1
    labels[1, :, :1] = 255
    x = torch.arange(2).float().view(2, 1, 1, 1).expand(2, 3, 4, 4)
    model = _Oracle(labels)
    iou = T.evaluate(model, [(x, labels)], 4, "cpu")
    # class 0: 20 right; class 1: all 8 predicted as 2 -> 0; class 2: 0 / 8; class 3 absent -> NaN
    assert iou[0] == 1.0 and iou[1] == 0.0 and iou[2] == 0.0 and np.isnan(iou[3])
    assert model.training  # mode restored
    assert T.mean_iou(iou) == pytest.approx(1 / 3)


def test_train_steps_rows_and_log_interval():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 8, 8)
    y = torch.randint(0, 3, (2, 8, 8))
    y[:, 0] = 255
    flushes = []
    rows = T.train_steps(model, iter([(x, y)] * 7), steps=7, optimizer=opt, device="cpu", start_step=3,
                         total_steps=12, log_every=3, on_log=lambda r: flushes.append([q["step"] for q in r]),
                         dropclass_schedule=T.constant_schedule(0.2), progress_bar=False)
    assert [r["step"] for r in rows] == list(range(4, 11))
    assert flushes == [[4, 5, 6], [7, 8, 9], [10]]  # one read of the losses per interval, plus the end
    assert rows[0]["t"] == 3 / 12 and rows[0]["p"] == 0.2 and rows[0]["lam"] == pytest.approx(0.8)
    assert rows[-1]["loss"] < rows[0]["loss"]  # memorising one batch
    assert all(r["ce"] == r["loss"] and r["sup"] == 0.0 for r in rows)  # the baseline: plain CE
    with pytest.raises(ValueError, match="batches ran out after 2 of 3 steps"):
        T.train_steps(model, [(x, y)] * 2, steps=3, optimizer=opt, device="cpu", progress_bar=False)
    with pytest.raises(ValueError, match="total_steps"):
        T.train_steps(model, iter([]), steps=5, optimizer=opt, device="cpu", start_step=2, total_steps=4)
