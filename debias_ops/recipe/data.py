"""Datasets, transforms and batch streams for the training recipe (debias_ops/recipe/loop.py).

* Cityscapes in its standard layout, read by ``torchvision.datasets.Cityscapes``
  (mode="fine", target_type="semantic")::

      <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
      <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

  Label IDs are mapped to the 19 train IDs with Cityscapes' own label table
  (``cityscapesscripts.helpers.labels``); every other ID becomes 255 (ignored).
  A mask holding an ID outside the table raises a ValueError naming the file;
  so do an unreadable PNG and an image/label pair of different sizes (every
  pair's size is read from the PNG headers when the dataset is built; a file
  that fails to decode is named when it is loaded).
* The generated scenes of :mod:`debias_ops.recipe.scenes` (a co-occurrence
  shortcut by construction; the debiasing study trains on them too).

Training augmentation (applied jointly to image and mask with
``torchvision.transforms.v2``, the mask as a ``tv_tensors.Mask`` so it is resized
with nearest neighbours and padded with 255): random scale of the shorter side
in [scale_min, scale_max] x base_size, random crop (padded where the scaled
image is smaller), horizontal flip, then ImageNet normalisation.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from . import scenes

IGNORE = 255
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

LAYOUT = ("<root>/leftImg8bit/{split}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
          "<root>/gtFine/{split}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png")


# ----------------------------------------------------------------------------- Cityscapes labels

def cityscapes_classes() -> List[str]:
    """The 19 evaluated classes, in train-ID order (from cityscapesscripts' label table)."""
    from cityscapesscripts.helpers.labels import labels
    names = {lab.trainId: lab.name for lab in labels if 0 <= lab.trainId < IGNORE}
    return [names[i] for i in range(len(names))]


def cityscapes_lut() -> Tuple[np.ndarray, int]:
    """(lookup table label ID -> train ID (255 = ignored), number of valid label IDs)."""
    from cityscapesscripts.helpers.labels import labels
    ids = [lab.id for lab in labels if lab.id >= 0]
    n = max(ids) + 1
    lut = np.full(256, IGNORE, np.uint8)
    for lab in labels:
        if lab.id >= 0:
            lut[lab.id] = lab.trainId if 0 <= lab.trainId < IGNORE else IGNORE
    return lut, n


def _png_size(path: Path) -> Tuple[int, int]:
    """(width, height) from the PNG header, or a ValueError naming the file (nothing decoded)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None


def check_cityscapes_layout(root, split: str) -> List[Tuple[Path, Path, Tuple[int, int]]]:
    """Raise FileNotFoundError naming the missing folder/file and the expected layout; ValueError naming
    an unreadable PNG or an image/label pair of different sizes (from the PNG headers: every pair is
    checked, nothing decoded). Returns the (image, label, (width, height)) pairs."""
    root = Path(root)
    layout = LAYOUT.format(split=split)
    if not root.is_dir():
        raise FileNotFoundError(f"Cityscapes root {str(root)!r} is not a folder; expected the layout {layout}")
    for sub in ("leftImg8bit", "gtFine"):
        d = root / sub / split
        if not d.is_dir():
            raise FileNotFoundError(f"missing folder {str(d)!r}; expected the Cityscapes layout {layout}")
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    if not images:
        raise FileNotFoundError(f"no *_leftImg8bit.png images in {str(root / 'leftImg8bit' / split)!r}/<city>/; "
                                f"expected the Cityscapes layout {layout}")
    missing, pairs = [], []
    for img in images:
        stem = img.name[: -len("_leftImg8bit.png")]
        lab = root / "gtFine" / split / img.parent.name / f"{stem}_gtFine_labelIds.png"
        if not lab.is_file():
            missing.append(str(lab))
        else:
            pairs.append((img, lab))
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(images)} label files missing, e.g. {missing[0]!r}; "
                                f"expected the Cityscapes layout {layout}")
    out = []
    for img, lab in pairs:
        size, lsize = _png_size(img), _png_size(lab)
        if size != lsize:
            raise ValueError(f"{lab}: the label is {lsize[0]}x{lsize[1]} but its image {img.name} is "
                             f"{size[0]}x{size[1]} (width x height); labels must match their images pixel for pixel")
        out.append((img, lab, size))
    return out


class CityscapesSegmentation(Dataset):
    """``torchvision.datasets.Cityscapes`` with train-ID masks: (image (3,H,W) float, mask (H,W) int64)."""

    def __init__(self, root, split: str, transforms=None):
        from torchvision.datasets import Cityscapes
        self.pairs = check_cityscapes_layout(root, split)
        self.base = Cityscapes(str(root), split=split, mode="fine", target_type="semantic")
        self.lut, self.num_ids = cityscapes_lut()
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF
        try:
            image, target = self.base[index]
            ids = np.asarray(target)  # decodes the label (Image.open is lazy)
        except (OSError, SyntaxError, ValueError) as e:  # e.g. "image file is truncated"
            raise ValueError(f"{self.base.images[index]} / {self.base.targets[index][0]}: cannot decode "
                             f"({e})") from None
        if ids.ndim != 2:
            raise ValueError(f"{self.base.targets[index][0]}: expected a single-channel label-ID image, "
                             f"got shape {ids.shape}")
        if image.size != (ids.shape[1], ids.shape[0]):
            raise ValueError(f"{self.base.targets[index][0]}: the label is {ids.shape[1]}x{ids.shape[0]} but its "
                             f"image is {image.size[0]}x{image.size[1]} (width x height)")
        bad = np.unique(ids[ids >= self.num_ids])
        if bad.size:
            raise ValueError(f"{self.base.targets[index][0]}: label IDs {bad.tolist()[:10]} are outside the "
                             f"Cityscapes label table (0..{self.num_ids - 1}); expected *_gtFine_labelIds.png")
        mask = tv_tensors.Mask(torch.from_numpy(self.lut[ids]))
        image = tv_tensors.Image(TF.pil_to_tensor(image))
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask.as_subclass(torch.Tensor).long()


def train_transforms(crop: Sequence[int], base_size: int, scale: Sequence[float] = (0.5, 2.0), flip: bool = True):
    """Random-scale + random crop + horizontal flip, image and mask jointly (torchvision.transforms.v2)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    lo, hi = int(scale[0] * base_size), int(scale[1] * base_size)
    ops = [v2.RandomResize(lo, max(hi, lo + 1)),
           v2.RandomCrop(tuple(crop), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE})]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(MEAN, STD)]
    return v2.Compose(ops)


def eval_transforms(base_size: Optional[int] = None):
    """Optional resize of the shorter side, then normalisation (the mask keeps its labels)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    ops = [] if base_size is None else [v2.Resize(base_size)]
    ops += [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(MEAN, STD)]
    return v2.Compose(ops)


# ----------------------------------------------------------------------------- synthetic data

class TensorSegmentation(Dataset):
    """In-memory (images (N,3,H,W) float, labels (N,H,W) int64), optional horizontal flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, flip: bool = False):
        self.images, self.labels, self.flip = images, labels, flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        x, y = self.images[index], self.labels[index]
        if self.flip and torch.rand(()) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


def synthetic_datasets(n_train: Optional[int] = None, n_val: Optional[int] = None, seed: int = 0,
                       val_mode: str = "ordinary"):
    """(train, val, class names) from :mod:`debias_ops.recipe.scenes` (train split vs its `val_mode` test split)."""
    from dataclasses import replace

    cfg = scenes.Config()
    if n_train is not None:
        cfg = replace(cfg, n_train=n_train)
    if n_val is not None:
        cfg = replace(cfg, n_test=n_val)
    train = TensorSegmentation(*scenes.make_split(cfg.n_train, 1000 * seed + 1, cfg, "train"), flip=True)
    offset = {"ordinary": 2, "conflicting": 3}[val_mode]  # the data seeds of scenes.splits
    val = TensorSegmentation(*scenes.make_split(cfg.n_test, 1000 * seed + offset, cfg, val_mode))
    return train, val, list(scenes.CLASSES)


# ----------------------------------------------------------------------------- loaders and batch streams

class ResumableSampler(Sampler):
    """A DistributedSampler whose next epoch can start part-way through (to resume mid-epoch)."""

    def __init__(self, base: DistributedSampler):
        self.base, self.skip = base, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.base), skip, None)

    def __len__(self) -> int:
        return len(self.base) - self.skip


def train_loader(dataset, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0, workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """Shuffled, sharded over ranks (DistributedSampler, also with one rank), whole batches only."""
    base = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=ResumableSampler(base), num_workers=workers,
                        drop_last=True, pin_memory=pin_memory, persistent_workers=workers > 0)
    if len(loader) == 0:
        raise ValueError(f"the training set has {len(dataset)} samples: fewer than one batch of {batch_size} "
                         f"per rank on {world} rank(s)")
    return loader


def eval_loader(dataset, batch_size: int, *, rank: int = 0, world: int = 1, workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """Every sample exactly once over all ranks (rank r takes samples r, r + world, ...)."""
    from torch.utils.data import Subset
    shard = Subset(dataset, list(range(rank, len(dataset), world)))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)


def batch_stream(loader: DataLoader, start_step: int = 0) -> Iterator:
    """Endless batches, epoch after epoch; starts where step `start_step` left off (resume)."""
    sampler = loader.sampler
    sampler.set_epoch(0)
    per_epoch = len(loader)
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch, skip * loader.batch_size)
        yield from loader
        epoch, skip = epoch + 1, 0

