"""debias_ops.class_overlap: the K×K Jaccard overlap of the classes' top-k channel sets."""
from __future__ import annotations

import itertools

import pytest
import torch

import debias_ops as dops
from tests.helpers import assert_close


def _jaccard_loops(S: torch.Tensor, k: int) -> torch.Tensor:
    """The definition, written with Python sets (an independent check of the vectorised code)."""
    K = S.shape[0]
    sets = []
    for i in range(K):
        top = torch.topk(S[i], k).indices.tolist()
        sets.append({c for c in top if S[i, c] > 0})
    out = torch.zeros(K, K)
    for i, j in itertools.product(range(K), range(K)):
        u = sets[i] | sets[j]
        out[i, j] = len(sets[i] & sets[j]) / len(u) if u else 0.0
    return out


@pytest.mark.parametrize("K,C,k", [(2, 1, 1), (5, 7, 3), (19, 37, 9), (3, 16, 16)])
def test_matches_the_definition(K, C, k):
    g = torch.Generator().manual_seed(K * 100 + C)
    S = torch.rand(K, C, generator=g) - 0.3  # some non-positive entries: they never join a set
    ov = dops.class_overlap(S, k)
    assert_close(ov.matrix, _jaccard_loops(S, k), name="overlap")
    off = ~torch.eye(K, dtype=torch.bool)
    assert_close(ov.mean, ov.matrix[off].mean(), name="mean")
    assert torch.equal(ov.matrix, ov.matrix.T)
    assert ov.sets.sum(1).le(k).all() and ov.chance == pytest.approx(k / (2 * C - k))


def test_extremes():
    # disjoint blocks of channels: overlap 0; identical rows: overlap 1
    S = torch.zeros(3, 12)
    for i in range(3):
        S[i, 4 * i:4 * i + 4] = 1.0 + torch.arange(4.0)
    ov = dops.class_overlap(S, 4)
    assert_close(ov.matrix, torch.eye(3), name="disjoint")
    assert float(ov.mean) == 0.0
    same = dops.class_overlap(torch.arange(1.0, 13.0).repeat(3, 1), 4)
    assert float(same.mean) == 1.0
    # a class with no positive channel has an empty set: overlap 0 with everyone, itself included
    S[1] = -1.0
    assert dops.class_overlap(S, 4).matrix[1].abs().sum() == 0


def test_conv_weight_is_max0_w_and_default_k():
    w = torch.randn(5, 32, 1, 1, generator=torch.Generator().manual_seed(0))
    a = dops.class_overlap(w)
    b = dops.class_overlap(torch.relu(w.reshape(5, 32)), 8)  # default k = C // 4
    assert torch.equal(a.matrix, b.matrix) and torch.equal(a.sets, b.sets)


def test_strided_and_low_precision_inputs():
    S = torch.rand(7, 40, generator=torch.Generator().manual_seed(1))
    ref = dops.class_overlap(S, 5)
    assert torch.equal(dops.class_overlap(S.T.contiguous().T, 5).matrix, ref.matrix)  # a transposed view
    assert dops.class_overlap(S.half(), 5).matrix.dtype == torch.float32


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="S"):
        dops.class_overlap(torch.rand(1, 4))
    with pytest.raises(ValueError, match="k"):
        dops.class_overlap(torch.rand(3, 4), 5)
    with pytest.raises(ValueError, match="S"):
        dops.class_overlap(torch.rand(3, 4, 3, 3))
    with pytest.raises(TypeError, match="S"):
        dops.class_overlap(torch.ones(3, 4, dtype=torch.int64))
