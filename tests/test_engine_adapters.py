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


def lora_folders(tmp_path, k=3, targets=None):
    """k random LoRA adapters (different ranks and targets) saved in peft's format."""
    out = []
    for i in range(k):
        m = peft.apply(tiny(), "lora", r=4 + 2 * i, alpha=8.0 + i, use_rslora=i == 2,
                       **({"target_modules": targets[i]} if targets and targets[i] else {}))
        randomize(m, seed=10 + i)
        out.append(peft.save_adapter(m, tmp_path / f"a{i}"))
    return out


def merged_reference(folder, ps, n):
    m = peft.load_adapter(tiny(), folder)
    peft.merge(m)
    return [greedy_reference(m, p, n) for p in ps]


def test_many_loras_in_one_batch(tmp_path):
    from leanlm.peft.multi_lora import LoraPool

    folders = lora_folders(tmp_path, targets=[None, ["q_proj", "v_proj"], ["down_proj", "up_proj", "o_proj"]])
    ps = prompts(5, seed=21)
    jobs = [(p, a) for i, p in enumerate(ps) for a in ((i % 4), ((i + 1) % 4))]  # adapter 0: the base model
    refs = {a: merged_reference(f, ps, 6) for a, f in enumerate(folders, 1)}
    refs[0] = [greedy_reference(tiny(), p, 6) for p in ps]
    for slots in (3, 2):  # 2 slots for 3 adapters: requests wait for a slot, idle adapters are evicted
        model = tiny()
        pool = LoraPool(model, slots=slots, max_rank=8)
        for a, f in enumerate(folders, 1):
            pool.register_folder(a, f"ad{a}", f)
        eng = Engine(model, block_size=4, num_blocks=80, max_batch_tokens=64, max_num_seqs=8, adapters=pool)
        rids = [eng.add_request(p, SamplingParams(max_tokens=6), adapter=a) for p, a in jobs]
        got = {r: [] for r in rids}
        mixed = 0
        while eng.has_unfinished():
            for o in eng.step():
                got[o.request_id].append(o.token)
            mixed = max(mixed, len(pool.rows.groups))
        for r, (p, a) in zip(rids, jobs):
            assert got[r] == refs[a][ps.index(p)], (slots, a)
        assert mixed == slots  # several adapters in one forward
        assert not pool.pins and (slots == 3 or pool.loads > 3)
        eng.cache.alloc.check_whole()
