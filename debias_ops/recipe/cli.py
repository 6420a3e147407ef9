"""Command line of the training recipe: ``debias-ops-train [plot] ...`` or ``python -m debias_ops.recipe`` (see debias_ops/recipe/loop.py).

A thin layer on :func:`debias_ops.recipe.train_steps` and :func:`debias_ops.recipe.evaluate`:
builds data, model (optionally wrapped by ``dops.dropclass``), optimiser and poly LR,
runs under torchrun when launched by it, evaluates, checkpoints, logs and plots.

Refuses an --out that holds an earlier run unless --resume (continue it) or --overwrite.
Ctrl-C finishes the step in progress, writes a checkpoint and exits (status 130); --resume continues.
Writes to --out: checkpoint.pt (model, optimizer, scheduler, step, RNG of every rank),
log.json (config, classes, one row per step, every evaluation), train_log.csv, eval.csv,
curves.png, iou.png. Only rank 0 writes (several nodes: --out on a shared file system, which
every rank reads on --resume); the logged training losses are rank 0's
(its own batch), the evaluation covers the whole val split (sharded, counts summed).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

import debias_ops as dops
from debias_ops.adapters import input_multiple
from debias_ops.recipe import bias as B
from debias_ops.recipe import data as D
from debias_ops.recipe import runtime as R
from debias_ops.recipe.loop import evaluate, mean_iou, paper_schedule, train_steps, unwrap

DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-4}
DEFAULT_WD = {"sgd": 1e-4, "adamw": 1e-2}
AUX_WEIGHT = 0.5  # torchvision's segmentation reference
# settings a resumed run must share with its checkpoint
RESUME_SAME = ("data", "model", "encoder", "aux_loss", "dropclass", "importance", "k", "optimizer")
PROG = "debias-ops-train"


class _Help(argparse.HelpFormatter):
    """Each option's default once, after its help (options without a default say what None means)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or not action.option_strings or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Errors as one line (``debias-ops-train: error: ...``), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=_Help)
    g = ap.add_argument_group("data")
    g.add_argument("--data", choices=("cityscapes", "synthetic"), default="cityscapes",
                   help="Cityscapes in its standard layout, or the generated scenes with a co-occurrence shortcut")
    g.add_argument("--root", default=None, help="Cityscapes root (holding leftImg8bit/ and gtFine/); required with "
                                                "--data cityscapes")
    g.add_argument("--crop", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"), help="training crop")
    g.add_argument("--base-size", type=int, default=1024, help="shorter side before random scaling")
    g.add_argument("--scale", type=finite_float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"),
                   help="random scale range of the shorter side, x base-size")
    g.add_argument("--val-size", type=int, default=None, help="resize the val shorter side (default: as stored)")
    g.add_argument("--no-val", action="store_true", help="train without a val split: no evaluation, no mIoU")
    g.add_argument("--n-train", type=int, default=None, help="synthetic: training images (default: the scenes' own)")
    g.add_argument("--n-val", type=int, default=None, help="synthetic: val images (default: the scenes' own)")
    g.add_argument("--val-mode", choices=("ordinary", "conflicting"), default="ordinary",
                   help="synthetic: the val split's placement (conflicting: the bias reversed)")
    g.add_argument("--workers", type=int, default=4, help="DataLoader workers per rank")
    g = ap.add_argument_group("model")
    g.add_argument("--model", choices=R.TORCHVISION_MODELS + R.SMP_MODELS, default="deeplabv3_resnet50",
                   help="torchvision segmentation model or smp architecture")
    g.add_argument("--encoder", default="resnet50", help="smp encoder name (smp models only)")
    g.add_argument("--pretrained", action="store_true", help="ImageNet backbone/encoder weights (downloads)")
    g.add_argument("--aux-loss", action="store_true", help=f"torchvision aux head, loss weight {AUX_WEIGHT}")
    g.add_argument("--sync-bn", action="store_true", help="nn.SyncBatchNorm across ranks (CUDA)")
    g = ap.add_argument_group("DropClass")
    g.add_argument("--dropclass", action="store_true", help="wrap the model with dops.dropclass")
    g.add_argument("--alpha", type=finite_float, default=10.0, help="suppression weight, >= 0")
    g.add_argument("--importance", choices=("weight", "logits"), default="weight",
                   help="channel importance: the classifier's weight (the paper's; 1x1 classifiers) or a probe "
                        "fitted on the logits (any head)")
    g.add_argument("--k", type=int, default=None, help="top-k channels per class (default: all)")
    g.add_argument("--per-batch", action="store_true", help="one dropped class per batch (the paper's)")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=40000, help="total iterations")
    g.add_argument("--batch", type=int, default=8, help="batch size per rank")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="SGD with momentum, or AdamW")
    g.add_argument("--lr", type=finite_float, default=None,
                   help=f"learning rate (default: sgd {DEFAULT_LR['sgd']}, adamw {DEFAULT_LR['adamw']})")
    g.add_argument("--wd", type=finite_float, default=None,
                   help=f"weight decay (default: sgd {DEFAULT_WD['sgd']}, adamw {DEFAULT_WD['adamw']})")
    g.add_argument("--momentum", type=finite_float, default=0.9, help="SGD momentum, in [0, 1)")
    g.add_argument("--poly-power", type=finite_float, default=0.9, help="poly LR decay power")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (CUDA only)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available, else CPU")
    g.add_argument("--seed", type=int, default=0, help="initial weights, data order, augmentation and drops")
    g = ap.add_argument_group("run")
    g.add_argument("--out", default="runs/train", help="output folder")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out (else refused)")
    g.add_argument("--log-every", type=int, default=10, help="read the losses every N steps")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    g.add_argument("--eval-batch", type=int, default=1, help="val batch size per rank")
    g.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (default <out>/checkpoint.pt); a run stopped by Ctrl-C continues too")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="run at most N steps now, then checkpoint and evaluate (resume later; e.g. a job time limit)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    g.add_argument("--context-stats", action="store_true", help="co-occurrence statistics of the training labels "
                   "(cached in <out>/context_stats.pt); evaluation adds each class's IoU without its context")
    g.add_argument("--context-min-pixels", type=int, default=100, help="conflict-view IoU below N pixels: NaN")
    return ap


def check_args(ap: argparse.ArgumentParser, args) -> None:
    """Every bad value before anything is built, in the command line's own words."""
    if args.data == "cityscapes" and not args.root:
        ap.error("--data cityscapes needs --root (the folder holding leftImg8bit/ and gtFine/)")
    for name in ("steps", "batch", "log_every", "ckpt_every", "eval_batch", "base_size", "context_min_pixels"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("stop_after", "val_size", "n_train", "n_val", "k"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.crop) < 1:
        ap.error(f"--crop H W must be >= 1, got {args.crop[0]} {args.crop[1]}")
    if args.workers < 0:
        ap.error(f"--workers must be >= 0, got {args.workers}")
    if args.eval_every < 0:
        ap.error("--eval-every must be >= 0")
    if not 0 < args.scale[0] <= args.scale[1]:
        ap.error(f"--scale MIN MAX needs 0 < MIN <= MAX, got {args.scale[0]} {args.scale[1]}")
    if args.alpha < 0:
        ap.error(f"--alpha must be >= 0, got {args.alpha}")
    if args.lr is not None and args.lr <= 0:
        ap.error(f"--lr must be > 0, got {args.lr}")
    if args.wd is not None and args.wd < 0:
        ap.error(f"--wd must be >= 0, got {args.wd}")
    if not 0 <= args.momentum < 1:
        ap.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.poly_power < 0:
        ap.error(f"--poly-power must be >= 0, got {args.poly_power}")
    if args.ckpt_every % args.log_every:
        ap.error(f"--ckpt-every ({args.ckpt_every}) must be a multiple of --log-every ({args.log_every}), "
                 "so that a checkpoint's log holds every step before it")
    if args.no_val and args.eval_every:
        ap.error("--no-val and --eval-every exclude each other (there is nothing to evaluate on)")
    if args.resume and args.overwrite:
        ap.error("--resume continues the run in --out, --overwrite replaces it: pass one")
    if not args.resume and not args.overwrite and os.environ.get("RANK", "0") == "0":
        found = R.earlier_run(Path(args.out))
        if found:
            ap.error(f"--out {args.out} holds an earlier run ({', '.join(found)}): pass --resume to continue it, "
                     "--overwrite to replace it, or another --out")


def datasets(args):
    """(train, val or None with --no-val, class names)."""
    if args.data == "synthetic":
        train, val, classes = D.synthetic_datasets(args.n_train, args.n_val, args.seed, args.val_mode)
        return train, (None if args.no_val else val), classes
    train = D.CityscapesSegmentation(args.root, "train", D.train_transforms(args.crop, args.base_size, args.scale))
    val = None if args.no_val else D.CityscapesSegmentation(args.root, "val", D.eval_transforms(args.val_size))
    return train, val, D.cityscapes_classes()


def _cli_words(message: str) -> str:
    """A library error in the command line's words: importance='logits' -> --importance logits."""
    message = message.removeprefix("dropclass: ")
    message = message.replace(", or name a 1×1 classifier with classifier='dotted.path'", "")
    return re.sub(r"\b(importance|alpha|k)=('?)([^'\s,;)]+)\2", lambda m: f"--{m.group(1)} {m.group(3)}", message)


def _resized(size, short: Optional[int]):
    """(H, W) of a (width, height) image after torchvision's Resize(short) of the shorter side."""
    w, h = size
    if short is None:
        return h, w
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


def check_input_sizes(args, model, train_ds, val_ds) -> None:
    """The model's input-size constraint against the training crop and every val size, before step 1."""
    mult = input_multiple(model)
    if mult <= 1:
        return
    name = args.model + (f" (encoder {args.encoder})" if args.model in R.SMP_MODELS else "")
    up = lambda v: -(-v // mult) * mult  # noqa: E731
    if args.data == "cityscapes":
        if args.crop[0] % mult or args.crop[1] % mult:
            raise ValueError(f"--crop {args.crop[0]} {args.crop[1]}: {name} takes heights and widths divisible by "
                             f"{mult}; e.g. --crop {up(args.crop[0])} {up(args.crop[1])}")
        if val_ds is not None:
            for img, _, size in val_ds.pairs:
                h, w = _resized(size, args.val_size)
                if h % mult or w % mult:
                    how = f"resized by --val-size {args.val_size} to" if args.val_size else "of"
                    raise ValueError(f"{img}: a val image {how} {w}x{h} (width x height) does not fit {name}, "
                                     f"which takes heights and widths divisible by {mult}; pick --val-size so "
                                     "that both sides are")
        return
    for split, ds in (("train", train_ds), ("val", val_ds)):
        if ds is not None and len(ds):
            h, w = ds[0][0].shape[-2:]
            if h % mult or w % mult:
                raise ValueError(f"the synthetic {split} images are {w}x{h}: {name} takes heights and widths "
                                 f"divisible by {mult}; pick another --model")


def build(args, num_classes: int, info: R.DistInfo):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = R.build_model(args.model, num_classes, encoder=args.encoder, pretrained=args.pretrained,
                          aux_loss=args.aux_loss)
    if args.dropclass:
        try:
            model = dops.dropclass(model, importance=args.importance, k=args.k, alpha=args.alpha,
                                   per_sample=not args.per_batch, aux_weight=AUX_WEIGHT if args.aux_loss else None)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--dropclass on {args.model}: {_cli_words(str(e))}") from None
    model = R.wrap_ddp(model, info, args.sync_bn)
    lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    wd = DEFAULT_WD[args.optimizer] if args.wd is None else args.wd
    optimizer = R.build_optimizer(model, args.optimizer, lr, wd, args.momentum)
    scheduler = R.poly_scheduler(optimizer, args.steps, args.poly_power)
    return model, optimizer, scheduler


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training: the step in progress finished and a checkpoint was written."""


class _StopFlag:
    """SIGINT sets a flag that the loop reads after each step (the main thread only; a second Ctrl-C
    interrupts at once). Under torchrun the ranks agree on it at log intervals."""

    def __init__(self):
        self.set, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.set = True
        signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def agreed(self, info: R.DistInfo, step: int, log_every: int) -> bool:
        if info.world == 1:
            return self.set
        if step % log_every:
            return False
        flag = torch.tensor([1.0 if self.set else 0.0], device=info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def run(args) -> Dict:
    info = R.init_distributed(args.device)
    try:
        with _StopFlag() as stop:
            return _run(args, info, stop)
    finally:
        if info.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, info: R.DistInfo, stop: _StopFlag) -> Dict:
    say = print if info.main else (lambda *a, **k: None)
    out = Path(args.out)
    train_ds, val_ds, classes = datasets(args)
    K = len(classes)
    model, optimizer, scheduler = build(args, K, info)
    check_input_sizes(args, model, train_ds, val_ds)
    generator = torch.Generator(device=info.device).manual_seed(1000 * args.seed + info.rank + 1)  # drops
    R.seed_everything(args.seed * 1000 + info.rank)  # augmentation and worker seeds, per rank
    ctx = B.prepare(args, train_ds, classes, info)  # None without --context-stats
    log = R.RunLog(out, {k: v for k, v in vars(args).items()}, classes, enabled=info.main,
                   eval_columns=B.eval_columns(ctx, classes))
    if ctx is not None:
        log.data["context"] = ctx.summary()
    ckpt_path = out / "checkpoint.pt"
    start = 0
    if args.resume:
        path = ckpt_path if args.resume == "auto" else Path(args.resume)
        start = R.load_checkpoint(path, info, model=unwrap(model), optimizer=optimizer, scheduler=scheduler,
                                  generator=generator, same={k: getattr(args, k) for k in RESUME_SAME})["step"]
        log.resume(start, source=path.parent)
        say(f"resumed from {path} at step {start}")
    else:
        log.start()
    if start >= args.steps:
        say(f"nothing to do: the checkpoint is at step {start} >= --steps {args.steps}")
        return {"step": start, "out": str(out)}
    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)

    cuda = info.device.type == "cuda"
    loader = D.train_loader(train_ds, args.batch, rank=info.rank, world=info.world, seed=args.seed,
                            workers=args.workers, pin_memory=cuda)
    val_loader = None if val_ds is None else D.eval_loader(val_ds, args.eval_batch, rank=info.rank, world=info.world,
                                                           workers=args.workers, pin_memory=cuda)
    n_val = "no" if val_ds is None else len(val_ds)
    say(f"{args.model}{' + DropClass' if args.dropclass else ''} on {args.data}: {len(train_ds)} train / "
        f"{n_val} val images, {K} classes, {info.world} rank(s) on {info.device}, steps {start}->{end} of {args.steps}")
    state = {"iou": None}

    def checkpoint(step: int) -> None:
        log.save()
        R.save_checkpoint(ckpt_path, info, model=unwrap(model), optimizer=optimizer, scheduler=scheduler,
                          step=step, generator=generator, extra={"config": log.data["config"]})

    def on_step(step: int) -> None:
        # checkpoint first: an evaluation that fails or is interrupted loses nothing
        saved = step % args.ckpt_every == 0 or step == end
        if saved:
            checkpoint(step)
        if val_loader is not None and ((args.eval_every and step % args.eval_every == 0) or step == end):
            rng = R.rng_state(generator)  # the evaluation leaves the training's random streams as they were
            ev = B.conflict_eval(ctx, K, info.device)
            iou = evaluate(model, val_loader, K, info.device, amp=args.amp, distributed=info.world > 1,
                           on_batch=None if ev is None else ev.update)
            R.set_rng_state(rng, generator)
            state["iou"] = iou
            log.evaluation(step, iou, mean_iou(iou), extra=B.eval_entry(ev, classes, info.world > 1))
            say(f"\nstep {step}: val mIoU {100 * mean_iou(iou):.2f}"
                + ("" if ev is None else "; " + B.describe_entry(log.data["eval"][-1])))
            if saved:
                log.save()
        if step < end and stop.agreed(info, step, args.log_every):
            if not saved:
                checkpoint(step)
            raise Interrupted(f"interrupted at step {step} of {args.steps}: wrote {ckpt_path}; continue with "
                              f"--resume --out {out}")

    train_steps(model, D.batch_stream(loader, start), steps=end - start, optimizer=optimizer,
                scheduler=scheduler, device=info.device, amp=args.amp, dropclass_schedule=paper_schedule,
                start_step=start, total_steps=args.steps, on_step=on_step,
                progress_bar=info.main and not args.no_progress, log_every=args.log_every,
                on_log=log.train_rows, aux_weight=AUX_WEIGHT if args.aux_loss else None, generator=generator,
                desc="DropClass" if args.dropclass else "baseline")
    iou = state["iou"]
    if info.main:
        from debias_ops.recipe.plots import plot_runs
        plot_runs([out], out)
        if iou is not None:
            say("per-class IoU (%): " + ", ".join(f"{c} {100 * v:.1f}" for c, v in zip(classes, iou)))
            say(f"mIoU {100 * mean_iou(iou):.2f}")
        say(f"wrote {out}/(checkpoint.pt, log.json, train_log.csv, eval.csv, curves.png, iou.png)")
    res = {"step": end, "out": str(out)}
    if iou is not None:
        res.update(iou=iou.tolist(), miou=mean_iou(iou))
    return res


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        from debias_ops.recipe.plots import main as plot_main
        return plot_main(argv[1:])
    ap = parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    return run(args)


def _one_line(e: BaseException) -> str:
    """The message of ``e`` as one line; an error re-raised from a DataLoader worker keeps its last line."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
        text = re.sub(r"^\w+(Error|Exception): ", "", text)
    return " ".join(text.split())


def entry() -> None:
    """Console entry: bad input (missing or unreadable files, bad values, a diverging loss) ends with one
    clear line and exit status 1; Ctrl-C with a line saying how to resume, exit status 130."""
    try:
        main()
    except Interrupted as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        sys.exit(130)
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {_one_line(e)}")
