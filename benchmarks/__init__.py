"""debias_ops benchmarks: the README's main command.

``python -m benchmarks`` (or ``make bench``) measures the device's copy
bandwidth, then checks and times every op (suppress, class_drop,
dropclass_loss, a DropClass head step) at design §8's shapes against the eager
reference and ``torch.compile(reference)``, sweeps N / C / B, prints a
roofline table and writes JSON + PNG plots under ``benchmarks/results/``.
Without a GPU it runs a small CPU mode instead. See ``benchmarks/README.md``.

``pytest benchmarks/ --benchmark-only`` runs the same cases as a
pytest-benchmark suite (``benchmarks/test_bench.py``).

Modules: ``shapes`` (design §8 shapes, sweeps), ``byte_model`` (minimal bytes
and flops: the single source of GB/s, % copy BW, TFLOP/s), ``timing``
(do_bench / CUDA events / wall clock, peak memory), ``cases`` (inputs and
implementations, the correctness check), ``run`` (the CLI's run), ``report`` (fits, table, plots),
``train_step`` (the optional DeepLabV3-ResNet50 step), ``gpu_check`` (the stage
plan and summary of ``scripts/gpu_check.sh``, the one-command check on a GPU machine).
"""
