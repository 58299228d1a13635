"""GPTQ's solver against a line-by-line transcription of the reference `fasterquant` (IST-DASLab/gptq,
gptq.py, with its `static_groups` option and the symmetric `Quantizer`): same codes, bit for bit."""
import pytest
import torch

from leanlm.compress.quant.gptq import gptq_quantize
from leanlm.compress.quant.grid import dequantize


def _ref_params(x, bits):
    """Quantizer.find_params(x, weight=True), sym=True; the scale rounded to fp16 as leanlm stores it."""
    maxq = 2 ** bits - 1
    zeros = torch.zeros(x.shape[0])
    xmin, xmax = torch.minimum(x.min(1).values, zeros), torch.maximum(x.max(1).values, zeros)
    xmax = torch.maximum(xmin.abs(), xmax)
    xmin = torch.where(xmin < 0, -xmax, xmin)
    scale = ((xmax - xmin) / maxq).half().float()
    return scale, torch.full_like(scale, (maxq + 1) / 2)


def _ref_fasterquant(W, H, bits, groupsize, actorder, static_groups, blocksize, percdamp=0.01):
    W, H = W.clone().float(), H.clone()
    K, maxq = W.shape[1], 2 ** bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = [_ref_params(W[:, i:i + groupsize], bits) for i in range(0, K, groupsize)] if static_groups else None
    perm = torch.arange(K)
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H[torch.arange(K), torch.arange(K)] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    params = None
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), torch.zeros(W.shape[0], i2 - i1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if static_groups:
                params = groups[int(perm[i1 + i]) // groupsize]
            elif (i1 + i) % groupsize == 0:
                params = _ref_params(W[:, i1 + i:i1 + i + groupsize], bits)
            scale, zero = params
            q = scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q[:, torch.argsort(perm)] if actorder else Q


@pytest.mark.parametrize("bits,K,g,act_order,block", [
    (3, 576, 64, True, 128),    # the w3a16-gptq-g64 setting on a 576-wide layer: act-order, static groups
    (3, 320, 64, True, 128),
    (4, 256, 32, True, 128),
    (3, 256, 64, False, 64),    # in order: groups start at lazy-block boundaries, where the reference's W is current
    (3, 192, 32, False, 32),
])
def test_gptq_codes_equal_reference_fasterquant(bits, K, g, act_order, block):
    gen = torch.Generator().manual_seed(K + bits)
    W = torch.randn(24, K, generator=gen)
    mix = torch.eye(K) + 0.3 * torch.randn(K, K, generator=gen)
    X = torch.randn(1024, K, generator=gen) @ mix * (3 * torch.rand(K, generator=gen))  # correlated, uneven
    X[:, 5] = 0  # a dead input column
    H = 2 * X.T @ X / X.shape[0]
    codes, scales, offsets = gptq_quantize(W, H, bits, g, True, 0.01, act_order, block)
    ours = dequantize(codes, scales, offsets, g)
    ref = _ref_fasterquant(W, H, bits, g, act_order, static_groups=act_order, blocksize=block)
    assert torch.equal(ours, ref)
    # and it is GPTQ, not rounding: its output error on X is below round-to-nearest's on the same grid
    rtn = _ref_fasterquant(W, torch.eye(K), bits, g, False, static_groups=True, blocksize=block)
    assert ((X @ (ours - W).T).norm() < 0.8 * (X @ (rtn - W).T).norm())
