"""The recipe's command line never loses a run and never reports a wrong number silently.

On the miniature Cityscapes (tests/helpers.py) with smp FPN/resnet18 on CPU: bad data (image/label
pairs of different sizes, unreadable or truncated PNGs), bad numbers, an --out holding an earlier run,
bad checkpoints for --resume, a bad log.json for ``plot``, the model's input-size constraint, Ctrl-C;
each ends with one line naming the file or the flag, before the first step where it can be known.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")
pytest.importorskip("cityscapesscripts")

from debias_ops.recipe import cli  # noqa: E402
from tests.helpers import cityscapes_args, make_cityscapes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUN = ("--steps", "2", "--log-every", "1", "--ckpt-every", "2")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cs(tmp_path_factory):
    return make_cityscapes(tmp_path_factory.mktemp("cs") / "cs")


def _copy(cs: Path, dest: Path) -> Path:
    import shutil
    shutil.copytree(cs, dest)
    return dest


def _label(root: Path, split: str, i: int = 0) -> Path:
    return sorted((root / "gtFine" / split).glob("*/*_labelIds.png"))[i]


def _resize_png(path: Path, size) -> None:
    from PIL import Image
    with Image.open(path) as im:
        im.resize(size, Image.NEAREST).save(path)


def _cli_error(capsys, argv) -> str:
    """The one line a command-line error prints (argparse exits with status 2)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def _entry(monkeypatch, argv) -> str:
    """What the console entry ends with (one line)."""
    monkeypatch.setattr(sys, "argv", ["debias-ops-train", *argv])
    with pytest.raises(SystemExit) as exc:
        cli.entry()
    msg = str(exc.value.code)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- silent wrong results: the data


@pytest.mark.parametrize("split,size", [("val", (100, 64)), ("train", (64, 32))])
def test_label_of_another_size_is_named_before_training(tmp_path, split, size):
    root = _copy(make_cityscapes(tmp_path / "a"), tmp_path / "cs")
    bad = _label(root, split)
    _resize_png(bad, size)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"{bad.name}: the label is {size[0]}x{size[1]} but its image .* is 128x64"):
        cli.main(cityscapes_args(root, out, *RUN))
    assert not (out / "checkpoint.pt").exists()


def test_unreadable_and_truncated_pngs_are_named(tmp_path, monkeypatch):
    root = _copy(make_cityscapes(tmp_path / "a"), tmp_path / "cs")
    garbage = _label(root, "train", 1)
    garbage.write_bytes(b"not a png at all")
    msg = _entry(monkeypatch, cityscapes_args(root, tmp_path / "r1", *RUN))
    assert msg.startswith("error: ") and f"{garbage}: cannot read the image" in msg

    root = _copy(make_cityscapes(tmp_path / "b"), tmp_path / "cs2")
    truncated = _label(root, "train", 1)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # the header (size) intact, the pixels cut
    # decoded in a DataLoader worker: the entry still ends with the one line naming the file
    msg = _entry(monkeypatch, cityscapes_args(root, tmp_path / "r2", *RUN, "--workers", "1", "--batch", "4"))
    assert str(truncated) in msg and "cannot decode" in msg and "truncated" in msg, msg


def test_final_checkpoint_is_written_before_the_final_evaluation(tmp_path):
    root = _copy(make_cityscapes(tmp_path / "a"), tmp_path / "cs")
    val = _label(root, "val", 1)
    data = val.read_bytes()
    val.write_bytes(data[: len(data) // 2])
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"{val.name}: cannot decode"):
        cli.main(cityscapes_args(root, out, *RUN))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2  # the training is not lost with the evaluation
    assert [r["step"] for r in json.loads((out / "log.json").read_text())["train"]] == [1, 2]


def test_no_val_trains_without_evaluating(cs, tmp_path):
    out = tmp_path / "run"
    res = cli.main(cityscapes_args(cs, out, *RUN, "--no-val"))
    assert res["step"] == 2 and "miou" not in res
    log = json.loads((out / "log.json").read_text())
    assert log["eval"] == [] and len(log["train"]) == 2 and (out / "curves.png").is_file()


# ----------------------------------------------------------------------------- data loss: --out, Ctrl-C, --resume


def test_out_with_an_earlier_run_is_refused(cs, tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(cityscapes_args(cs, out, *RUN, "--no-val"))
    before = (out / "checkpoint.pt").read_bytes()
    err = _cli_error(capsys, cityscapes_args(cs, out, *RUN, "--no-val"))
    assert f"--out {out} holds an earlier run (checkpoint.pt, log.json" in err and "--overwrite" in err
    assert (out / "checkpoint.pt").read_bytes() == before
    cli.main(cityscapes_args(cs, out, *RUN, "--no-val", "--overwrite"))
    # --resume CKPT into a folder that does not exist yet: the log rows come from the checkpoint's folder
    new = tmp_path / "new" / "deeper"
    res = cli.main(cityscapes_args(cs, new, "--steps", "3", "--log-every", "1", "--ckpt-every", "1", "--no-val",
                                   "--resume", str(out / "checkpoint.pt")))
    assert res["step"] == 3
    assert [r["step"] for r in json.loads((new / "log.json").read_text())["train"]] == [1, 2, 3]


def _bad_checkpoints(tmp_path: Path, good: Path):
    data = good.read_bytes()
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 3])
    torch.save(torch.load(good, weights_only=False)["model"], tmp_path / "bare.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    return [(tmp_path / "garbage.pt", "cannot read the checkpoint"),
            (tmp_path / "truncated.pt", "cannot read the checkpoint"),
            (tmp_path / "bare.pt", "not a checkpoint written by the recipe .it is a bare state_dict"),
            (tmp_path / "list.pt", "not a checkpoint written by the recipe .it is a list")]


def test_bad_checkpoints_for_resume_are_named(cs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cli.main(cityscapes_args(cs, out, *RUN, "--no-val"))
    for path, why in _bad_checkpoints(tmp_path, out / "checkpoint.pt"):
        msg = _entry(monkeypatch, cityscapes_args(cs, out, "--steps", "3", "--no-val", "--resume", str(path)))
        assert msg.startswith(f"error: {path}: ") and re.search(why, msg), msg


def test_plot_of_a_bad_log_is_named(cs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.json").write_text("{not json")
    msg = _entry(monkeypatch, ["plot", "--runs", str(run)])
    assert msg.startswith(f"error: {run / 'log.json'}: not a log.json written by the recipe"), msg
    (run / "log.json").write_text(json.dumps({"classes": ["a"]}))
    assert "needs 'classes', 'train' and 'eval'" in _entry(monkeypatch, ["plot", "--runs", str(run)])


@pytest.mark.timeout(300)
def test_ctrl_c_leaves_a_resumable_checkpoint(cs, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    argv = cityscapes_args(cs, out, "--steps", "1000", "--log-every", "1", "--ckpt-every", "500", "--no-val")
    proc = subprocess.Popen([sys.executable, "-c", "from debias_ops.recipe.cli import entry; entry()", *argv],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    csv = out / "train_log.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if csv.is_file() and csv.read_text().count("\n") >= 3:  # the header and two steps
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "continue with --resume" in stderr, stderr[-3000:]
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 2 <= step < 1000
    assert [r["step"] for r in json.loads((out / "log.json").read_text())["train"]] == list(range(1, step + 1))
    res = cli.main(cityscapes_args(cs, out, "--steps", str(step + 1), "--log-every", "1", "--ckpt-every", "500",
                                   "--no-val", "--resume"))
    assert res["step"] == step + 1


# ----------------------------------------------------------------------------- unchecked numbers and the model


BAD_FLAGS = [
    (("--alpha", "nan"), "--alpha"), (("--alpha", "inf"), "--alpha"), (("--alpha", "-1"), "--alpha"),
    (("--lr", "0"), "--lr"), (("--lr", "nan"), "--lr"), (("--wd", "-1"), "--wd"),
    (("--momentum", "1.5"), "--momentum"), (("--poly-power", "-1"), "--poly-power"),
    (("--k", "0"), "--k"), (("--scale", "0", "1"), "--scale"), (("--scale", "2", "1"), "--scale"),
    (("--crop", "0", "64"), "--crop"), (("--steps", "0"), "--steps"), (("--batch", "0"), "--batch"),
    (("--val-size", "0"), "--val-size"), (("--workers", "-1"), "--workers"), (("--base-size", "0"), "--base-size"),
    (("--importance", "grad"), "--importance"), (("--ckpt-every", "3"), "--ckpt-every"),
    (("--no-val", "--eval-every", "2"), "--no-val"), (("--resume", "--overwrite"), "--resume"),
]


@pytest.mark.parametrize("flags,named", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_numbers_are_one_line_naming_the_flag(cs, tmp_path, capsys, flags, named):
    argv = cityscapes_args(cs, tmp_path / "run", "--steps", "2", "--log-every", "2", *flags)
    err = _cli_error(capsys, argv)
    assert err.startswith("debias-ops-train: error: ") and named in err, err
    assert not (tmp_path / "run").exists()


def test_library_errors_in_the_command_lines_words(cs, tmp_path, monkeypatch):
    msg = _entry(monkeypatch, cityscapes_args(cs, tmp_path / "r", *RUN, "--model", "Unet", "--dropclass",
                                              "--crop", "32", "64"))
    assert "--importance logits" in msg and "importance=" not in msg, msg
    msg = _entry(monkeypatch, cityscapes_args(cs, tmp_path / "r", *RUN, "--dropclass", "--k", "100000"))
    assert "--k 100000" in msg and "k=" not in msg, msg


@pytest.mark.parametrize("flags,match", [
    (("--crop", "48", "64"), r"--crop 48 64: FPN \(encoder resnet18\) takes heights and widths divisible by 32; "
                             r"e\.g\. --crop 64 64"),
    (("--val-size", "48"), r"_leftImg8bit\.png: a val image resized by --val-size 48 to 96x48 .* does not fit FPN"),
])
def test_input_size_constraints_before_the_first_step(cs, tmp_path, flags, match):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        cli.main(cityscapes_args(cs, out, *RUN, *flags))
    assert not (out / "train_log.csv").exists()


def test_help_is_complete_and_says_each_default_once():
    ap = cli.parser()
    undocumented = [a.option_strings[0] for a in ap._actions if a.option_strings and not a.help]
    assert undocumented == []
    for action in ap._actions:
        if action.option_strings and action.help != "==SUPPRESS==":
            text = ap._get_formatter()._expand_help(action) if action.help else ""
            assert text.count("default") <= 1, (action.option_strings, text)
    text = ap.format_help()
    for flag in ("--data", "--model", "--device", "--seed", "--no-val", "--overwrite"):
        assert flag in text
