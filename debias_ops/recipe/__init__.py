"""The training recipe: DropClass on torchvision / segmentation_models_pytorch models.

Installed with the package (``pip install "debias_ops[train]"`` brings its
dependencies); run it as ``debias-ops-train`` or ``python -m debias_ops.recipe``::

    debias-ops-train --data cityscapes --root /data/cityscapes --model deeplabv3_resnet50 \\
        --steps 40000 --batch 8 --crop 512 1024 --dropclass --out runs/dc
    debias-ops-train --data synthetic --model Unet --encoder resnet18 --steps 300 --out runs/syn
    debias-ops-train plot --runs runs/base runs/dc --out runs/compare

Modules, top-down:

* :mod:`~debias_ops.recipe.cli`: the command line (arguments, one run, ``plot``);
* :mod:`~debias_ops.recipe.loop`: the training loop ``train_steps`` and ``evaluate``;
* :mod:`~debias_ops.recipe.runtime`: models, optimiser, poly LR, torchrun / DDP,
  checkpoints and logs;
* :mod:`~debias_ops.recipe.data`: Cityscapes (torchvision's reader), transforms,
  resumable loaders;
* :mod:`~debias_ops.recipe.bias`: ``--context-stats``: the classes' contexts in the
  training labels, and IoU where a class lacks its context;
* :mod:`~debias_ops.recipe.scenes`: generated scenes with a co-occurrence shortcut;
* :mod:`~debias_ops.recipe.plots`: curves and per-class IoU plots.

Nothing here is imported by ``import debias_ops``.
"""
