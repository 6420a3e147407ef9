"""Minimal repro: torch.compile (Inductor, CPU) gives a wrong gradient for the
reference DropClass loss's drop branch, while aot_eager is right.

Seen with torch 2.13.0+cpu (2026-11-22): relative max error of d(ce_drop +
10·sup)/d logits_drop ≈ 0.25 under inductor, ≈ 1e-7 under aot_eager; each
term alone is right. Run: python -m benchmarks.repro_inductor_cpu_grad
"""
import torch

from debias_ops import reference as ref


def main() -> None:
    torch.manual_seed(0)
    B, K = 2, 5
    x = torch.randn(B, K, 8, 8, requires_grad=True)
    target = torch.randint(0, K, (B, 16, 16))
    target[0, :3] = 255
    dropped = torch.zeros(B, K, dtype=torch.bool)
    dropped[0, 1] = dropped[1, 3] = True

    def ce_drop(b):
        return ref.weighted_ce(ref.upsample(b, (16, 16)), ref.drop_labels(target, dropped, 255), None, 255)

    def both(b):
        return ce_drop(b) + 10 * ref.suppression_term(b, dropped)

    for name, fn in (("ce_drop", ce_drop), ("ce_drop + 10*sup", both)):
        (expect,) = torch.autograd.grad(fn(x), x)
        for backend in ("aot_eager", "inductor"):
            torch._dynamo.reset()
            (got,) = torch.autograd.grad(torch.compile(fn, backend=backend)(x), x)
            err = ((got - expect).abs().max() / expect.abs().max()).item()
            print(f"{name:18s} {backend:10s} relative max error {err:.2e}")
    print(f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
