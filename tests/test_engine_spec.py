"""Speculative decoding inside the engine: greedy output identical to plain engine decoding in mixed batches,
the sampled distribution unchanged, rejected drafts rolled back (blocks freed), preemption/abort/prefix caching."""
import random

import pytest
import torch

from conftest import greedy_reference
from leanlm.errors import LeanLMError
from leanlm.infer.engine import Engine, SamplingParams
from leanlm.infer.engine_spec import SpecParams
from leanlm.infer.sampling import SamplingConfig, sample_probs
from test_engine import tiny_model
from test_spec import chi2, chi2_crit
from test_spec import tiny_model as tiny_vocab_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def other():
    return tiny_model(seed=1)


def prompts(k, seed=0):
    rng = random.Random(seed)
    out = [[rng.randrange(128) for _ in range(rng.randint(3, 30))] for _ in range(k)]
    out[0] = out[0] * 3  # repeated n-grams: prompt lookup finds drafts
    return out


def engine(model, kind, other=None, **kw):
    extra = {"draft": dict(draft=other), "self": dict(draft=model), "layer_skip": dict(layer_skip=[1]),
             "small": dict(draft=tiny_vocab_model(2, layers=1))}.get(kind, {})
    return Engine(model, block_size=4, **extra, **kw)


METHOD = {"draft": "draft", "self": "draft", "small": "draft", "prompt_lookup": "prompt_lookup",
          "layer_skip": "layer_skip"}


def check_tables(eng):
    """Every sequence holds exactly the blocks its length needs: no block past the end survives a rollback."""
    caches = [eng.cache] + [m.cache for m in eng.spec.models.values()]
    for c in caches:
        for sid, n in c.lengths.items():
            assert len(c.tables[sid]) == -(-n // c.block_size), (sid, n, c.tables[sid])


def run(eng, ps, params, every=None):
    rids = [eng.add_request(p, sp) for p, sp in zip(ps, params)]
    out = {r: [] for r in rids}
    while eng.has_unfinished():
        for o in eng.step():
            if o.token is not None:
                out[o.request_id].append(o.token)
        check_tables(eng)
        if every is not None:
            every(eng)
    eng.cache.check_whole()
    eng.spec.check_whole()
    return [out[r] for r in rids]


@pytest.mark.parametrize("kind", ["draft", "self", "small", "prompt_lookup", "layer_skip"])
def test_greedy_identical_mixed_batch(model, other, kind):
    """draft: another random model of the same shape (starts from the target's prompt K/V); small: a 1-layer
    draft (prefills the prompt itself); self: the target drafts for itself (every draft accepted)."""
    ps = prompts(6)
    plain = Engine(model, block_size=4).generate(ps, SamplingParams(max_tokens=24, ignore_eos=True))
    assert plain[0] == greedy_reference(model, ps[0], 24)
    eng = engine(model, kind, other)
    params = [SamplingParams(max_tokens=24, ignore_eos=True,
                             speculative=SpecParams(METHOD[kind], k=3) if i % 2 == 0 else None) for i in range(6)]
    assert run(eng, ps, params) == plain
    s = eng.stats
    assert s["draft_proposed"] > 0 and s["generation_tokens"] == 6 * 24
    if kind == "self":
        assert s["draft_accepted"] == s["draft_proposed"]
    else:
        assert s["draft_accepted"] < s["draft_proposed"]
    if "draft" in eng.spec.models:
        assert eng.spec.models["draft"].share_prefill == (kind != "small")


def test_stop_inside_accepted_drafts(model):
    """A stop token among the accepted drafts ends the output there, as plain decoding does."""
    p = prompts(1)[0]
    ref = greedy_reference(model, p, 30)
    stop = ref[7]
    eng = engine(model, "self")
    out = run(eng, [p], [SamplingParams(max_tokens=30, stop_token_ids=(stop,), speculative=SpecParams("draft", 4))])
    assert out[0] == ref[:ref.index(stop) + 1]
    # max_tokens that is not a multiple of the round length
    out = run(eng, [p], [SamplingParams(max_tokens=11, ignore_eos=True, speculative=SpecParams("draft", 4))])
    assert out[0] == ref[:11]


def test_preemption_abort_prefix_cache(model, other):
    """A pool too small for every sequence: speculating sequences are preempted and recomputed, one is
    aborted mid-run; prefix blocks are shared (target and draft pools); the output stays the plain one."""
    base = prompts(1, seed=3)[0][:20]
    ps = [base + [i, i + 1] for i in range(6)]
    sp = [SamplingParams(max_tokens=30, ignore_eos=True, speculative=SpecParams("draft", 3) if i != 1 else None)
          for i in range(6)]
    plain = Engine(model, block_size=4).generate(ps, SamplingParams(max_tokens=30, ignore_eos=True))
    eng = engine(model, "draft", other, num_blocks=40, max_num_seqs=6)
    assert run(eng, ps[:1], sp[:1]) == plain[:1]  # fills the prefix caches
    assert run(eng, ps, sp) == plain
    assert eng.stats["preemptions"] > 0 and eng.stats["prefix_hit_tokens"] > 0
    draft = eng.spec.models["draft"]
    assert draft.cache.alloc.table  # the draft's full blocks were registered for prefix hits
    rid = eng.add_request(ps[2], sp[2])
    eng.step()
    eng.step()
    assert draft.registered[rid] >= len(base) // 4  # the draft started on its cached prefix blocks
    eng.abort(rid)
    eng.cache.check_whole()
    eng.spec.check_whole()


def test_adaptive_draft_length(model, other):
    p = prompts(1)[0]
    for kind, k, want in (("self", 2, 6), ("draft", 5, 1)):
        eng = engine(model, kind, other)
        rid = eng.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True,
                                                speculative=SpecParams("draft", k=k, k_max=6)))
        seq = eng.seqs[rid]
        ks = []
        while eng.has_unfinished():
            eng.step()
            ks.append(seq.spec.k)
        assert max(ks) == want if kind == "self" else min(ks) == want, ks
    eng = engine(model, "self")  # adaptive=False keeps k
    rid = eng.add_request(p, SamplingParams(max_tokens=20, ignore_eos=True,
                                            speculative=SpecParams("draft", k=2, adaptive=False)))
    seq = eng.seqs[rid]
    while eng.has_unfinished():
        eng.step()
    assert seq.spec.k == 2 and seq.spec.rounds == 6  # 2 drafts + 1 token per round after the first token


@pytest.mark.parametrize("method", ["draft", "prompt_lookup"])
@torch.inference_mode()
def test_sampled_distribution_unchanged(method):
    """Tokens 2 and 3 (accepted drafts or resampled, from one round of 2 drafts) follow the target's exact
    marginals."""
    V = 16
    tgt, drf = tiny_vocab_model(3, vocab=V, layers=1, hidden=32), tiny_vocab_model(4, vocab=V, layers=1, hidden=32)
    prompt = [*range(V), 1, 5]  # every token occurs: prompt lookup always drafts (the two after it)
    cfg = SamplingConfig(temperature=1.0, top_k=12)
    p1 = sample_probs(tgt(torch.tensor([prompt]))[0, -1:], cfg)[0]
    nxt = sample_probs(tgt(torch.tensor([[*prompt, t] for t in range(V)]))[:, -1], cfg)  # [t1, V]
    p2 = (p1[:, None] * nxt).sum(0)
    both = torch.tensor([[*prompt, a, b] for a in range(V) for b in range(V)])
    nxt2 = sample_probs(tgt(both)[:, -1], cfg).view(V, V, V)
    p3 = (p1[:, None, None] * nxt[:, :, None] * nxt2).sum((0, 1))
    N = 1200
    eng = Engine(tgt, block_size=4, max_num_seqs=64, max_batch_tokens=512, draft=drf)
    sp = [SamplingParams(max_tokens=4, temperature=1.0, top_k=12, seed=i, ignore_eos=True,
                         speculative=SpecParams(method, k=2, adaptive=False)) for i in range(N)]
    outs = eng.generate([prompt] * N, sp)
    c2, c3 = [0] * V, [0] * V
    for o in outs:
        c2[o[1]] += 1
        c3[o[2]] += 1
    for counts, probs in ((c2, p2), (c3, p3)):
        stat, df = chi2(counts, probs.tolist(), N)
        assert stat < chi2_crit(df), (stat, df)
    stat, df = chi2(c2, p1.tolist(), N)  # negative control: token 2 is not distributed like token 1
    assert stat > chi2_crit(df)
    s = eng.stats
    assert s["draft_proposed"] >= 2 * N and 0 < s["draft_accepted"] < s["draft_proposed"]
    if method == "draft":
        assert 0.1 < s["draft_accepted"] / s["draft_proposed"] < 0.95


def test_logprobs_with_speculation(model):
    p = prompts(1)[0]
    eng = Engine(model, block_size=4)
    rid = eng.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2))
    plain = [o for _ in range(40) for o in eng.step() if o.request_id == rid]
    eng = engine(model, "self")
    rid = eng.add_request(p, SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2,
                                            speculative=SpecParams("draft", 3)))
    spec = [o for _ in range(40) for o in eng.step() if o.request_id == rid]
    assert [o.token for o in spec] == [o.token for o in plain]
    for a, b in zip(spec, plain):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
    assert sum(o.draft_proposed for o in spec) > 0 and len(spec) == 12


def test_bad_requests(model, other):
    eng = Engine(model, block_size=4)
    cases = [SpecParams("draft"), SpecParams("layer_skip"), SpecParams("medusa"), SpecParams("prompt_lookup", k=0),
             SpecParams("prompt_lookup", k=4, k_max=2), SpecParams("prompt_lookup", k=99)]
    for sp in cases:
        with pytest.raises(LeanLMError):
            eng.add_request([1, 2, 3], SamplingParams(speculative=sp))
    with pytest.raises(LeanLMError, match="repetition_penalty"):
        eng.add_request([1, 2, 3], SamplingParams(repetition_penalty=1.2, speculative=SpecParams("prompt_lookup")))
    with pytest.raises(LeanLMError, match="vocabulary"):
        Engine(model, draft=tiny_vocab_model(1, vocab=64))
    assert not eng.has_unfinished()
