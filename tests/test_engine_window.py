"""Sliding-window layers in the engine's paged cache keep only their window: outputs equal plain greedy
decoding (and transformers' log-probabilities) while the local layers' blocks stay bounded."""
import random

import pytest
import torch

from conftest import greedy_reference, tiny_hf, to_leanlm
from leanlm.infer.engine import Engine, SamplingParams

WINDOW = 6
KINDS = {  # Gemma 3: local, global, local layers; Mistral: every layer windowed
    "gemma3": ("gemma3_text", dict(num_hidden_layers=3, sliding_window=WINDOW, max_position_embeddings=160,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "mistral": ("mistral", dict(sliding_window=WINDOW, max_position_embeddings=160)),
}


@pytest.fixture(scope="module", params=list(KINDS))
def pair(request):
    kind, kw = KINDS[request.param]
    hf = tiny_hf(kind, **kw)
    return hf, to_leanlm(hf)


def prompts(k, lo, hi, seed, shared=()):
    rng = random.Random(seed)
    return [list(shared) + [rng.randrange(128) for _ in range(rng.randint(lo, hi))] for _ in range(k)]


def local_group(eng):
    return next(g for g in eng.cache.groups if g.window == WINDOW)


def test_engine_equals_greedy_and_frees_every_block(pair):
    """Chunked prefill, batching, prefix sharing (a second round hits the cache) and preemption (a small
    pool) give plain greedy decoding's tokens, far past the window."""
    _, m = pair
    head = [7, 3, 99, 41, 8, 15, 23, 42, 4, 16, 77, 5]
    ps = prompts(4, 5, 30, seed=1, shared=head)
    ref = [greedy_reference(m, p, 24) for p in ps]
    eng = Engine(m, block_size=4, num_blocks=200, max_batch_tokens=16, max_num_seqs=4)
    assert eng.generate(ps, SamplingParams(max_tokens=24)) == ref
    eng.cache.check_whole()
    assert eng.generate(ps[::-1], SamplingParams(max_tokens=24)) == ref[::-1]
    assert eng.stats["prefix_hit_tokens"] > 0
    eng.cache.check_whole()
    pool = 8 if m.config.layer_types is None else 24  # Mistral: every layer holds just its window
    small = Engine(m, block_size=4, num_blocks=pool, max_batch_tokens=16, max_num_seqs=4)
    assert small.generate(ps, SamplingParams(max_tokens=24)) == ref
    assert small.stats["preemptions"] > 0
    small.cache.check_whole()


def test_local_blocks_stay_bounded(pair):
    _, m = pair
    eng = Engine(m, block_size=4, num_blocks=64, max_batch_tokens=8)
    full = Engine(m, block_size=4, num_blocks=64, max_batch_tokens=8, trim_windows=False)
    prompt = prompts(1, 20, 20, seed=2)[0]
    got = {}
    held = []
    for e in (eng, full):
        rid = e.add_request(prompt, SamplingParams(max_tokens=80))
        got[e] = []
        while e.has_unfinished():
            got[e] += [o.token for o in e.step()]
            if rid in e.cache.lengths:
                if e is eng:
                    n = e.cache.lengths[rid]
                    g = local_group(e)
                    assert len(g.held(rid)) <= g.max_blocks(n, 8) <= -(-(WINDOW - 1 + 8) // 4) + 1
                    if g is not e.cache.primary:  # the global layers keep everything
                        assert len(e.cache.primary.held(rid)) == -(-n // 4)
                held.append((e, e.cache.lengths[rid], e.cache.kv_bytes(rid)))
        e.cache.check_whole()
    assert got[eng] == got[full] == greedy_reference(m, prompt, 80)
    last = {e: b for e, n, b in held if n == 60}
    assert last[eng] < last[full]
    assert full.cache.groups[0].window is None and len(full.cache.groups) == 1


def test_logprobs_match_transformers(pair):
    """The engine's log-probabilities of its greedy tokens equal transformers' on the same sequence."""
    hf, m = pair
    prompt = prompts(1, 9, 9, seed=3)[0]
    eng = Engine(m, block_size=4, num_blocks=64, max_batch_tokens=8)
    rid = eng.add_request(prompt, SamplingParams(max_tokens=20, logprobs=0))
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.request_id == rid]
    toks = [o.token for o in outs]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt + toks])).logits[0].float(), -1)
    want = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(toks)]
    assert [o.logprob for o in outs] == pytest.approx(want, abs=1e-4)
