"""The cases of the offline compile checks (``benchmarks/aot.py``): what the ops
launch at design §8's shapes -- the gate (forward, backward, backward with dg,
a stride-0 dOut), the moments (fp32, bf16, fp16, mixed; NCHW and channels_last)
and the loss (fp32 / bf16 logits, int64 / int32 / uint8 labels, with / without
class weights, eager and as torch.compile traces it).
"""
from __future__ import annotations

# design §8 shapes
W48 = dict(B=8, C=720, H=128, W=256, K=19)
W18S = dict(B=12, C=270, H=128, W=256, K=19)
LOSS = dict(B=8, K=19, h=128, w=256, H=512, W=1024)


def cases() -> dict:
    """{case name: body(wrap)}: each body calls one launcher on fake CUDA tensors (made
    inside ``benchmarks.aot``'s FakeTensorMode) with ``wrap=wrap``."""
    import torch

    from debias_ops.kernels import gate as g
    from debias_ops.kernels import loss as lo
    from debias_ops.kernels import moments as mo

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    cases = {}

    def feats(s, dtype, cl, K=False):
        C = s["K"] if K else s["C"]
        fmt = torch.channels_last if cl else torch.contiguous_format
        return torch.empty(s["B"], C, s["H"], s["W"], dtype=dtype, device="cuda", memory_format=fmt)

    # gate (design §3): forward apply (suppress, class_drop), backward dA (+ dg for class_drop)
    for sname, s in (("W48", W48), ("W18s", W18S)):
        for dname in ("bf16", "fp32", "fp16"):
            for cl in (False, True):
                lay = "cl" if cl else "nchw"

                def apply(wrap, s=s, d=dt[dname], cl=cl):
                    a = feats(s, d, cl)
                    gt = torch.empty(s["B"], s["C"], dtype=torch.float32, device="cuda")
                    g.launch(a, gt, torch.empty_like(a), wrap=wrap)

                def bwd(wrap, s=s, d=dt[dname], cl=cl):  # suppress: dA only
                    a = feats(s, d, cl)
                    gt = torch.empty(s["B"], s["C"], dtype=torch.float32, device="cuda")
                    g.launch(torch.empty_like(a), gt, torch.empty_like(a), None, wrap=wrap)

                def bwd_dg(wrap, s=s, d=dt[dname], cl=cl):  # class_drop: dA and dg
                    a = feats(s, d, cl)
                    gt = torch.empty(s["B"], s["C"], dtype=torch.float32, device="cuda")
                    g.launch(torch.empty_like(a), gt, torch.empty_like(a), a, wrap=wrap)

                cases[f"gate-apply-{sname}-{dname}-{lay}"] = apply
                cases[f"gate-bwd-{sname}-{dname}-{lay}"] = bwd
                cases[f"gate-bwd-dg-{sname}-{dname}-{lay}"] = bwd_dg
        for dname in ("bf16", "fp32"):
            # out.sum().backward(): a stride-0 expanded dOut
            def bwd_exp(wrap, s=s, d=dt[dname]):
                a = feats(s, d, False)
                gt = torch.empty(s["B"], s["C"], dtype=torch.float32, device="cuda")
                dout = torch.empty((), dtype=d, device="cuda").expand(a.shape)
                g.launch(dout, gt, torch.empty_like(a), a, wrap=wrap)
            cases[f"gate-bwd-dg-{sname}-{dname}-expanded"] = bwd_exp

    # moments (design §2): fp32 (tf32x3), bf16, fp16, mixed (bf16 feats, fp32 logits)
    for sname, s in (("W48", W48), ("W18s", W18S)):
        for dname, (da, dl) in (("fp32", ("fp32", "fp32")), ("bf16", ("bf16", "bf16")),
                                ("fp16", ("fp16", "fp16")), ("mixed", ("bf16", "fp32"))):
            for cl in (False, True):
                def mom(wrap, s=s, da=dt[da], dl=dt[dl], cl=cl):
                    mo.launch(feats(s, da, cl), feats(s, dl, cl, K=True), wrap=wrap)
                cases[f"moments-{sname}-{dname}-{'cl' if cl else 'nchw'}"] = mom

    # loss (design §4): fp32 / bf16 logits, int64 / int32 / uint8 labels, with / without class weights
    s = LOSS
    for dname in ("fp32", "bf16"):
        for yname, ydt in (("i64", torch.int64), ("i32", torch.int32), ("u8", torch.uint8)):
            for wname in ("", "-w"):
                def loss(wrap, d=dt[dname], ydt=ydt, weighted=bool(wname)):
                    x = torch.empty(s["B"], s["K"], s["h"], s["w"], dtype=d, device="cuda")
                    xd = torch.empty_like(x)
                    y = torch.empty(s["B"], s["H"], s["W"], dtype=ydt, device="cuda")
                    dropped = torch.empty(s["B"], s["K"], dtype=torch.bool, device="cuda")
                    wc = torch.empty(s["K"], dtype=torch.float32, device="cuda") if weighted else None
                    lo.launch(x, xd, y, dropped, wc, 0.5, 1.0, 255, True, True,
                              torch.empty_like(x), torch.empty_like(xd), wrap=wrap)
                cases[f"loss-{dname}-{yname}{wname}"] = loss
                if yname == "i64" and not wname:
                    # the launch torch.compile traces (no maxnreg: wrap_triton does not forward it)
                    cases[f"loss-{dname}-{yname}-traced"] = loss
    return cases
