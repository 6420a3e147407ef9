"""The recipe's plumbing: models, optimiser and poly LR, torchrun / DDP, checkpoints, JSON + CSV logs.

Used by the CLI (debias_ops/recipe/cli.py); the loop itself is debias_ops/recipe/loop.py.
"""
from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

TORCHVISION_MODELS = ("deeplabv3_resnet50", "fcn_resnet50", "lraspp_mobilenet_v3_large")
SMP_MODELS = ("Unet", "DeepLabV3Plus", "FPN")
TRAIN_KEYS = ("step", "t", "p", "lam", "lr", "loss", "ce", "ce_drop", "sup")

# ----------------------------------------------------------------------------- models and optimisation


def build_model(name: str, num_classes: int, *, encoder: str = "resnet50", pretrained: bool = False,
                aux_loss: bool = False) -> torch.nn.Module:
    """A torchvision segmentation model or an smp model (``name`` = architecture, ``encoder`` its encoder).

    ``pretrained``: ImageNet backbone / encoder weights (downloaded by torchvision / smp);
    the segmentation head is always trained from scratch for ``num_classes``.
    """
    if name in TORCHVISION_MODELS:
        from torchvision.models import segmentation
        kw = dict(weights=None, weights_backbone="DEFAULT" if pretrained else None, num_classes=num_classes)
        if name != "lraspp_mobilenet_v3_large":  # LR-ASPP has no auxiliary head
            kw["aux_loss"] = aux_loss
        elif aux_loss:
            raise ValueError("lraspp_mobilenet_v3_large has no auxiliary head: drop --aux-loss")
        return getattr(segmentation, name)(**kw)
    if name in SMP_MODELS:
        if aux_loss:
            raise ValueError(f"--aux-loss is for torchvision's deeplabv3/fcn models, not smp's {name}")
        import segmentation_models_pytorch as smp
        return smp.create_model(name, encoder_name=encoder, encoder_weights="imagenet" if pretrained else None,
                                classes=num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {TORCHVISION_MODELS + SMP_MODELS}")


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD with momentum (torchvision's segmentation reference) or AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd or adamw")


def poly_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9):
    """lr = base_lr * (1 - step / total_steps) ** power, stepped once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1.0 - step / total_steps) ** power)


# ----------------------------------------------------------------------------- torchrun / DDP


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """One process, or the process group torchrun describes (nccl on CUDA, gloo on CPU)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistInfo(rank, local, world, dev)


def wrap_ddp(model: torch.nn.Module, info: DistInfo, sync_bn: bool = False) -> torch.nn.Module:
    if sync_bn and info.device.type == "cpu":
        raise ValueError("--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm does not run on CPU")
    if sync_bn and info.world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(info.device)
    if info.world > 1:
        ids = [info.device.index] if info.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- checkpoints


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(generator: Optional[torch.Generator] = None) -> Dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: Dict, generator: Optional[torch.Generator] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def save_checkpoint(path: Path, info: DistInfo, *, model, optimizer, scheduler, step: int,
                    generator: Optional[torch.Generator] = None, extra: Optional[Dict] = None) -> None:
    """Rank 0 writes model, optimizer, scheduler, step and every rank's RNG state (atomic rename)."""
    rng = rng_state(generator)
    if info.world > 1:
        states: List = [None] * info.world
        dist.all_gather_object(states, rng)
    else:
        states = [rng]
    if info.main:
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "step": step, "world": info.world, "rng": states, **(extra or {})}
        tmp = path.with_suffix(".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
        print(f"rank {info.rank}: wrote checkpoint {path} (step {step})", flush=True)
    barrier(info)


def read_checkpoint(path: Path) -> Dict:
    """The recipe's checkpoint at ``path``, or a ValueError/FileNotFoundError naming the file in one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {str(path)!r}")
    try:
        # Our own file, holding Python/NumPy RNG states besides tensors: not a weights-only pickle.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated zip, garbage, another pickle: all "cannot read"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {first[:200]}); "
                         "is the file complete?") from None
    missing = [k for k in ("model", "optimizer", "step") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        what = "a bare state_dict" if isinstance(ckpt, dict) and ckpt and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()) else f"a {type(ckpt).__name__}"
        raise ValueError(f"{path}: not a checkpoint written by the recipe (it is {what}, without "
                         f"{', '.join(repr(k) for k in missing)}); --resume continues a run from its checkpoint.pt")
    return ckpt


def load_checkpoint(path: Path, info: DistInfo, *, model, optimizer, scheduler,
                    generator: Optional[torch.Generator] = None, same: Optional[Dict] = None) -> Dict:
    """Restore what save_checkpoint wrote; this rank's RNG state when the world size is unchanged.

    same: settings that must equal the checkpoint's ``config`` (else a ValueError naming them).
    Any other problem with the file is a one-line ValueError naming it.
    """
    ckpt = read_checkpoint(path)
    old = ckpt.get("config", {})
    differ = {k: (old.get(k), v) for k, v in (same or {}).items() if k in old and old[k] != v}
    if differ:
        raise ValueError(f"cannot resume {str(path)!r}: it was trained with other settings (checkpoint, now): "
                         + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in differ.items()))
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: its weights do not fit this model/optimizer ({first[:300]})") from None
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
        # The optimizer's stored lr is the old schedule's: recompute it (the run may have been extended).
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, getattr(scheduler, "lr_lambdas", ())):
            group["lr"] = base * fn(scheduler.last_epoch)
    if ckpt.get("world") == info.world and "rng" in ckpt:
        set_rng_state(ckpt["rng"][info.rank], generator)
    elif info.main:
        print(f"resume: checkpoint written by {ckpt.get('world')} rank(s), now {info.world}: RNG states reseeded")
    return ckpt


RUN_FILES = ("checkpoint.pt", "log.json", "train_log.csv", "eval.csv")


def earlier_run(out: Path) -> List[str]:
    """The files of an earlier run in ``out`` (empty when there is none)."""
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []


def read_log(path: Path) -> Dict:
    """A run's log.json, or a ValueError naming the file in one line."""
    path = Path(path)
    try:
        log = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a log.json written by the recipe ({type(e).__name__}: {e})") from None
    if not isinstance(log, dict) or not all(isinstance(log.get(k), list) for k in ("classes", "train", "eval")):
        raise ValueError(f"{path}: not a log.json written by the recipe (it needs 'classes', 'train' and 'eval' "
                         "lists)")
    return log


# ----------------------------------------------------------------------------- logs


class RunLog:
    """log.json (config, classes, every train row, every evaluation) + train_log.csv + eval.csv.

    Only the main rank writes. CSV rows are appended as they come; log.json is rewritten with
    each checkpoint (and at the end), so on resume it matches the checkpoint's step.
    """

    def __init__(self, out: Path, config: Dict, classes: List[str], enabled: bool = True, eval_columns=()):
        self.out, self.enabled = Path(out), enabled
        self.eval_columns = list(eval_columns)  # extra eval.csv columns, from an evaluation's "columns"
        self.data = {"config": config, "classes": list(classes), "train": [], "eval": []}

    def resume(self, step: int, source: Optional[Path] = None) -> None:
        """Keep the logged rows of steps <= step (from ``source``/log.json, default the output folder's:
        the folder of the checkpoint resumed from) and rewrite the CSVs from them."""
        path = Path(source or self.out) / "log.json"
        if path.is_file():
            old = read_log(path)
            self.data["train"] = [r for r in old["train"] if r["step"] <= step]
            self.data["eval"] = [r for r in old["eval"] if r["step"] <= step]
        if self.enabled:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_csv("train_log.csv", TRAIN_KEYS, self.data["train"], "w")
            self._write_csv("eval.csv", self._eval_keys(), [self._eval_row(e) for e in self.data["eval"]], "w")

    def start(self) -> None:
        if self.enabled:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_csv("train_log.csv", TRAIN_KEYS, [], "w")
            self._write_csv("eval.csv", self._eval_keys(), [], "w")

    def train_rows(self, rows: List[Dict]) -> None:
        self.data["train"].extend(rows)
        if self.enabled:
            self._write_csv("train_log.csv", TRAIN_KEYS, rows, "a")

    def evaluation(self, step: int, iou: np.ndarray, miou: float, extra: Optional[Dict] = None) -> None:
        entry = {"step": step, "miou": miou, "iou": [None if np.isnan(v) else float(v) for v in iou], **(extra or {})}
        self.data["eval"].append(entry)
        if self.enabled:
            self._write_csv("eval.csv", self._eval_keys(), [self._eval_row(entry)], "a")

    def save(self) -> None:
        if self.enabled:
            tmp = self.out / "log.json.tmp"
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.out / "log.json")

    def _eval_keys(self):
        return ["step", "miou"] + self.data["classes"] + self.eval_columns

    def _eval_row(self, entry: Dict) -> Dict:
        cols = {k: v for k, v in entry.get("columns", {}).items() if k in self.eval_columns}
        return {"step": entry["step"], "miou": entry["miou"], **dict(zip(self.data["classes"], entry["iou"])), **cols}

    def _write_csv(self, name: str, keys, rows, mode: str) -> None:
        path = self.out / name
        with open(path, mode, newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(keys))
            if mode == "w":
                w.writeheader()
            w.writerows(rows)
