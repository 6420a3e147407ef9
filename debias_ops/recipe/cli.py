"""Command line of the training recipe: ``python -m debias_ops.recipe [plot] ...`` (see debias_ops/recipe/loop.py).

A thin layer on :func:`debias_ops.recipe.train_steps` and :func:`debias_ops.recipe.evaluate`:
builds data, model (optionally wrapped by ``dops.dropclass``), optimiser and poly LR,
runs under torchrun when launched by it, evaluates, checkpoints, logs and plots.

Writes to --out: checkpoint.pt (model, optimizer, scheduler, step, RNG of every rank),
log.json (config, classes, one row per step, every evaluation), train_log.csv, eval.csv,
curves.png, iou.png. Only rank 0 writes (several nodes: --out on a shared file system, which
every rank reads on --resume); the logged training losses are rank 0's
(its own batch), the evaluation covers the whole val split (sharded, counts summed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist

import debias_ops as dops
from debias_ops.recipe import data as D
from debias_ops.recipe import runtime as R
from debias_ops.recipe.loop import evaluate, mean_iou, paper_schedule, train_steps, unwrap

DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-4}
DEFAULT_WD = {"sgd": 1e-4, "adamw": 1e-2}
AUX_WEIGHT = 0.5  # torchvision's segmentation reference
# settings a resumed run must share with its checkpoint
RESUME_SAME = ("data", "model", "encoder", "aux_loss", "dropclass", "importance", "k", "optimizer")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m debias_ops.recipe", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--data", choices=("cityscapes", "synthetic"), default="cityscapes")
    g.add_argument("--root", default=None, help="Cityscapes root (holding leftImg8bit/ and gtFine/)")
    g.add_argument("--crop", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"), help="training crop")
    g.add_argument("--base-size", type=int, default=1024, help="shorter side before random scaling")
    g.add_argument("--scale", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"),
                   help="random scale range of the shorter side, x base-size")
    g.add_argument("--val-size", type=int, default=None, help="resize the val shorter side (default: as stored)")
    g.add_argument("--n-train", type=int, default=None, help="synthetic: training images")
    g.add_argument("--n-val", type=int, default=None, help="synthetic: val images")
    g.add_argument("--val-mode", choices=("ordinary", "conflicting"), default="ordinary",
                   help="synthetic: the val split's placement (conflicting: the bias reversed)")
    g.add_argument("--workers", type=int, default=4, help="DataLoader workers per rank")
    g = ap.add_argument_group("model")
    g.add_argument("--model", choices=R.TORCHVISION_MODELS + R.SMP_MODELS, default="deeplabv3_resnet50")
    g.add_argument("--encoder", default="resnet50", help="smp encoder name")
    g.add_argument("--pretrained", action="store_true", help="ImageNet backbone/encoder weights (downloads)")
    g.add_argument("--aux-loss", action="store_true", help=f"torchvision aux head, loss weight {AUX_WEIGHT}")
    g.add_argument("--sync-bn", action="store_true", help="nn.SyncBatchNorm across ranks")
    g = ap.add_argument_group("DropClass")
    g.add_argument("--dropclass", action="store_true", help="wrap the model with dops.dropclass")
    g.add_argument("--alpha", type=float, default=10.0, help="suppression weight")
    g.add_argument("--importance", choices=("weight", "logits"), default="weight")
    g.add_argument("--k", type=int, default=None, help="top-k channels per class (default: all)")
    g.add_argument("--per-batch", action="store_true", help="one dropped class per batch (the paper's)")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=40000, help="total iterations")
    g.add_argument("--batch", type=int, default=8, help="batch size per rank")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    g.add_argument("--lr", type=float, default=None, help=f"default {DEFAULT_LR}")
    g.add_argument("--wd", type=float, default=None, help=f"weight decay, default {DEFAULT_WD}")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--poly-power", type=float, default=0.9)
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (CUDA)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("run")
    g.add_argument("--out", default="runs/train", help="output folder")
    g.add_argument("--log-every", type=int, default=10, help="read the losses every N steps")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end only)")
    g.add_argument("--eval-batch", type=int, default=1)
    g.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (default <out>/checkpoint.pt)")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="run at most N steps now, then evaluate and checkpoint (resume later; e.g. a job time limit)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return ap


def check_args(ap: argparse.ArgumentParser, args) -> None:
    if args.data == "cityscapes" and not args.root:
        ap.error("--data cityscapes needs --root (the folder holding leftImg8bit/ and gtFine/)")
    for name in ("steps", "batch", "log_every", "ckpt_every", "eval_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.stop_after is not None and args.stop_after < 1:
        ap.error("--stop-after must be >= 1")
    if args.eval_every < 0:
        ap.error("--eval-every must be >= 0")
    if args.ckpt_every % args.log_every:
        ap.error(f"--ckpt-every ({args.ckpt_every}) must be a multiple of --log-every ({args.log_every}), "
                 "so that a checkpoint's log holds every step before it")


def datasets(args):
    if args.data == "synthetic":
        return D.synthetic_datasets(args.n_train, args.n_val, args.seed, args.val_mode)
    train = D.CityscapesSegmentation(args.root, "train", D.train_transforms(args.crop, args.base_size, args.scale))
    val = D.CityscapesSegmentation(args.root, "val", D.eval_transforms(args.val_size))
    return train, val, D.cityscapes_classes()


def build(args, num_classes: int, info: R.DistInfo):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = R.build_model(args.model, num_classes, encoder=args.encoder, pretrained=args.pretrained,
                          aux_loss=args.aux_loss)
    if args.dropclass:
        model = dops.dropclass(model, importance=args.importance, k=args.k, alpha=args.alpha,
                               per_sample=not args.per_batch, aux_weight=AUX_WEIGHT if args.aux_loss else None)
    model = R.wrap_ddp(model, info, args.sync_bn)
    lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    wd = DEFAULT_WD[args.optimizer] if args.wd is None else args.wd
    optimizer = R.build_optimizer(model, args.optimizer, lr, wd, args.momentum)
    scheduler = R.poly_scheduler(optimizer, args.steps, args.poly_power)
    return model, optimizer, scheduler


def run(args) -> Dict:
    info = R.init_distributed(args.device)
    try:
        return _run(args, info)
    finally:
        if info.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, info: R.DistInfo) -> Dict:
    say = print if info.main else (lambda *a, **k: None)
    out = Path(args.out)
    train_ds, val_ds, classes = datasets(args)
    K = len(classes)
    model, optimizer, scheduler = build(args, K, info)
    generator = torch.Generator(device=info.device).manual_seed(1000 * args.seed + info.rank + 1)  # drops
    R.seed_everything(args.seed * 1000 + info.rank)  # augmentation and worker seeds, per rank
    log = R.RunLog(out, {k: v for k, v in vars(args).items()}, classes, enabled=info.main)
    ckpt_path = out / "checkpoint.pt"
    start = 0
    if args.resume:
        path = ckpt_path if args.resume == "auto" else Path(args.resume)
        start = R.load_checkpoint(path, info, model=unwrap(model), optimizer=optimizer, scheduler=scheduler,
                                  generator=generator, same={k: getattr(args, k) for k in RESUME_SAME})["step"]
        log.resume(start)
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
    val_loader = D.eval_loader(val_ds, args.eval_batch, rank=info.rank, world=info.world, workers=args.workers,
                               pin_memory=cuda)
    say(f"{args.model}{' + DropClass' if args.dropclass else ''} on {args.data}: {len(train_ds)} train / "
        f"{len(val_ds)} val images, {K} classes, {info.world} rank(s) on {info.device}, steps {start}->{end} of {args.steps}")
    state = {"iou": None}

    def on_step(step: int) -> None:
        if (args.eval_every and step % args.eval_every == 0) or step == end:
            iou = evaluate(model, val_loader, K, info.device, amp=args.amp, distributed=info.world > 1)
            state["iou"] = iou
            log.evaluation(step, iou, mean_iou(iou))
            say(f"\nstep {step}: val mIoU {100 * mean_iou(iou):.2f}")
        if step % args.ckpt_every == 0 or step == end:
            log.save()
            R.save_checkpoint(ckpt_path, info, model=unwrap(model), optimizer=optimizer, scheduler=scheduler,
                              step=step, generator=generator, extra={"config": log.data["config"]})

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
        say("per-class IoU (%): " + ", ".join(f"{c} {100 * v:.1f}" for c, v in zip(classes, iou)))
        say(f"mIoU {100 * mean_iou(iou):.2f}; wrote {out}/(checkpoint.pt, log.json, train_log.csv, eval.csv, "
            "curves.png, iou.png)")
    return {"step": end, "out": str(out), "iou": iou.tolist(), "miou": mean_iou(iou)}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        from debias_ops.recipe.plots import main as plot_main
        return plot_main(argv[1:])
    ap = parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    return run(args)


def entry() -> None:
    """Console entry: bad input (missing folders, labels out of range) ends with one clear line."""
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
