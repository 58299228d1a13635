"""The engine serves every adapter type: its greedy output equals plain greedy decoding with the same adapter."""
import random

import pytest
import torch

from conftest import greedy_reference
from leanlm import peft
from leanlm.infer.engine import Engine, SamplingParams


def tiny(seed=0):
    from test_engine import tiny_model

    return tiny_model(seed)


def prompts(k, lo=3, hi=30, seed=0):
    rng = random.Random(seed)
    base = [rng.randrange(128) for _ in range(9)]
    out = [[rng.randrange(128) for _ in range(rng.randint(lo, hi))] for _ in range(k)]
    return out + [base + [5], base + [6, 7]]  # a shared prefix: prefix caching with the adapter's tokens


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in ("lora_", "ia3_", "prompt_embeddings")):
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_" in n else 1.0) + ("ia3" in n))
    return model


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt", "prefix"])
def test_engine_serves_every_adapter(method):
    opts = {"num_virtual_tokens": 5} if method in ("prompt", "prefix") else {}
    model = randomize(peft.apply(tiny(), method, **opts)).eval()
    ps = prompts(5)
    want = [greedy_reference(model, p, 8) for p in ps]
    assert want != [greedy_reference(peft.apply(tiny(), "lora"), p, 8) for p in ps]  # the adapter matters
    eng = Engine(model, block_size=4, num_blocks=60, max_batch_tokens=16, max_num_seqs=4)
    assert eng.generate(ps, SamplingParams(max_tokens=8)) == want
    eng.cache.alloc.check_whole()
    # under memory pressure: preemption recomputes the virtual tokens too
    eng = Engine(model, block_size=4, num_blocks=14, max_batch_tokens=32, max_num_seqs=4)
    assert eng.generate(ps, SamplingParams(max_tokens=8)) == want
    assert eng.stats["preemptions"] > 0 or method not in ("prompt", "prefix")
    eng.cache.alloc.check_whole()
