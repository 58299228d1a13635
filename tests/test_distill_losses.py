"""Distillation losses against dense float64 formulas written from the papers, chunked vs unchunked."""
from __future__ import annotations

import pytest
import torch

from leanlm.train.losses import DistillLoss, chunked_loss, distill_loss_fn, divergence
from leanlm.errors import LeanLMError


def dense_reference(s, t, kind, T, beta, skew):
    """Probabilities (not log-probabilities), float64, one formula per paper."""
    q = torch.softmax(s.double() / T, -1)
    p = torch.softmax(t.double() / T, -1)

    def kl(a, b):
        return (a * (a / b).log()).sum(-1)
    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "skl":  # DistiLLM: KL(p || a p + (1-a) q)
        return kl(p, skew * p + (1 - skew) * q)
    if kind == "srkl":  # DistiLLM: KL(q || a q + (1-a) p)
        return kl(q, skew * q + (1 - skew) * p)
    if kind == "jsd":  # GKD: b KL(p||m) + (1-b) KL(q||m), m = b p + (1-b) q
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "skl", "srkl", "jsd"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_divergence_matches_dense_formula(kind, T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 50, generator=g) * 3, torch.randn(7, 50, generator=g) * 3
    for beta, skew in ((0.5, 0.1), (0.2, 0.3), (0.9, 0.5)):
        got = divergence(s, t, kind, T, beta, skew)
        ref = dense_reference(s, t, kind, T, beta, skew)
        torch.testing.assert_close(got.double(), ref, atol=2e-6, rtol=1e-5)
        assert (got >= -1e-6).all()


def test_jsd_endpoints_are_forward_and_reverse_kl():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 40, generator=g), torch.randn(5, 40, generator=g)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=0.0), divergence(s, t, "fkl"))
    torch.testing.assert_close(divergence(s, t, "jsd", beta=1.0), divergence(s, t, "rkl"))
    # identical distributions: every divergence is zero
    for kind in ("fkl", "rkl", "skl", "srkl", "jsd"):
        assert divergence(t, t, kind).abs().max() < 1e-6


def test_unknown_loss_and_bad_values_are_errors():
    for bad in (dict(kind="kl"), dict(temperature=0.0), dict(beta=1.5), dict(skew=1.0), dict(chunk=0)):
        with pytest.raises(LeanLMError):
            DistillLoss(**bad).validate()


@pytest.mark.parametrize("kind", ["fkl", "rkl", "skl", "srkl", "jsd", "ce"])
def test_chunked_equals_unchunked_loss_and_gradient(kind):
    g = torch.Generator().manual_seed(2)
    n, H, V = 37, 16, 90
    W_s, W_t = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    hs = torch.randn(n, H, generator=g, dtype=torch.float64)
    ht = torch.randn(n, H, generator=g, dtype=torch.float64)
    tgt = torch.randint(0, V, (n,), generator=g)
    results = []
    for chunk in (1000, 8, 5):
        h = hs.clone().requires_grad_(True)
        head_s = torch.nn.Linear(H, V, bias=False).double()
        head_s.weight.data.copy_(W_s)
        cfg = DistillLoss(kind=kind, temperature=1.5, beta=0.3, chunk=chunk)
        rows = []
        head_s.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
        loss = chunked_loss(h, head_s, lambda a, b: ht[a:b] @ W_t.double().T, tgt, cfg)
        loss.backward()
        assert max(rows) == min(chunk, n)  # no logits wider than a chunk, in forward or in backward
        results.append((loss.detach(), h.grad.clone(), head_s.weight.grad.clone()))
    full = results[0]
    dense = (dense_reference(hs @ W_s.double().T, ht @ W_t.double().T, kind, 1.5, 0.3, 0.1).mean()
             if kind != "ce" else torch.nn.functional.cross_entropy(hs @ W_s.double().T, tgt))
    torch.testing.assert_close(full[0], dense, atol=1e-6, rtol=1e-6)
    for other in results[1:]:
        for a, b in zip(full, other):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_online_loss_fn_only_labelled_positions(tiny_pair):
    student, teacher = tiny_pair
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt: no loss there
    labels[1, 9:] = -100  # padding
    fn = distill_loss_fn(teacher, DistillLoss("fkl", chunk=4))
    loss, n = fn(student, ids, labels)
    assert n == int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        s, t = student(ids)[:, :-1], teacher(ids)[:, :-1]
    keep = labels[:, 1:] != -100
    ref = dense_reference(s[keep], t[keep], "fkl", 1.0, 0, 0).mean()
    torch.testing.assert_close(loss.detach().double(), ref, atol=1e-5, rtol=1e-5)
    # a student identical to its teacher has zero loss
    assert float(fn(teacher, ids, labels)[0].detach()) < 1e-6


@pytest.fixture
def tiny_pair():
    from conftest import tiny_hf, to_leanlm

    return to_leanlm(tiny_hf(seed=0)), to_leanlm(tiny_hf(seed=1))
