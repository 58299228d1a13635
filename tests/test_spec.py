"""Speculative decoding: greedy output identical to plain decoding; sampled output has the target's distribution."""
import math
import random

import pytest
import torch

from conftest import greedy_reference
from leanlm.errors import LeanLMError
from leanlm.infer.sampling import GenerationConfig
from leanlm.infer.speculative import accept_reject, generate_speculative  # noqa: I001
from leanlm.model import ModelConfig
from leanlm.model.transformer import Transformer


def tiny_model(seed=0, vocab=128, layers=2, hidden=64):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512))
    m = Transformer(ModelConfig.from_hf(hf.config.to_dict()))
    m.load_state_dict(hf.state_dict(), strict=False)
    return m.eval()


@pytest.fixture(scope="module")
def target():
    return tiny_model(0, layers=4)


def rand_prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(128) for _ in range(n)]


@pytest.mark.parametrize("kind", ["draft", "same", "lookup", "skip", "q4"])
def test_greedy_identical(target, kind):
    prompt = rand_prompt(12, 1) * 2  # repeated, so prompt lookup finds n-grams
    ref = greedy_reference(target, prompt, 40)
    kw = {"draft": dict(draft=tiny_model(1, layers=1)), "same": dict(draft=target),
          "lookup": dict(prompt_lookup=True), "skip": dict(skip_layers=[1, 2])}.get(kind)
    if kind == "q4":
        pytest.importorskip("leanlm.compress.quant")
        from leanlm.infer.speculative import quantized_draft
        kw = dict(draft=quantized_draft(target))
    out, st = generate_speculative(target, prompt, max_new_tokens=40, num_draft=4, **kw)
    assert out == ref
    if kind in ("q4", "skip"):  # without starting from the target's prompt K/V
        assert generate_speculative(target, prompt, max_new_tokens=40, share_prefill=False, **kw)[0] == ref
    assert st.generated == 40 and st.proposed > 0
    if kind == "same":
        assert st.acceptance_rate == 1.0 and st.rounds == 8  # 4 drafts + 1 bonus token per round
    elif kind == "q4":
        assert st.acceptance_rate > 0.5
    else:
        assert st.accepted < st.proposed
    stop = ref[10]
    out, _ = generate_speculative(target, prompt, max_new_tokens=40, stop_token_ids=[stop], **kw)
    assert out == ref[:ref.index(stop) + 1]


def test_prompt_lookup_accepts_repeats(target):
    # the model's own greedy continuation, pasted into the prompt, is drafted verbatim
    base = rand_prompt(10, 2)
    cont = greedy_reference(target, base, 30)
    prompt = base + cont + base
    out, st = generate_speculative(target, prompt, max_new_tokens=30, prompt_lookup=True, num_draft=5)
    assert out == greedy_reference(target, prompt, 30)
    assert st.accepted >= 8 and st.rounds <= 30 - st.accepted  # fewer target forwards than tokens


def chi2_crit(df, z=3.09):  # Wilson-Hilferty approximation of the 0.999 quantile
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts, probs, n):
    """Pearson statistic over bins merged so that each expects at least 5 draws."""
    order = sorted(range(len(probs)), key=lambda i: probs[i])
    stat, df, acc_c, acc_p = 0.0, -1, 0, 0.0
    for i in order:
        acc_c += counts[i]
        acc_p += probs[i]
        if acc_p * n >= 5:
            stat += (acc_c - acc_p * n) ** 2 / (acc_p * n)
            df += 1
            acc_c, acc_p = 0, 0.0
    return stat, df


@torch.inference_mode()
def test_sampled_distribution_unchanged():
    """Tokens 1 and 2 of speculative sampling follow the target's exact marginals (chi-square, fixed seed)."""
    V = 16
    tgt, drf = tiny_model(3, vocab=V, layers=1, hidden=32), tiny_model(4, vocab=V, layers=1, hidden=32)
    prompt = [1, 5, 7]
    cfg = GenerationConfig(temperature=1.0, max_new_tokens=3, top_k=12)
    from leanlm.infer.sampling import sample_probs
    p1 = sample_probs(tgt(torch.tensor([prompt]))[0, -1:], cfg)[0]
    nxt = sample_probs(tgt(torch.tensor([[*prompt, t] for t in range(V)]))[:, -1], cfg)
    p2 = (p1[:, None] * nxt).sum(0)
    q1 = sample_probs(drf(torch.tensor([prompt]))[0, -1:], cfg)[0]
    N = 1500
    c1, c2, cq = [0] * V, [0] * V, [0] * V
    g = torch.Generator().manual_seed(0)
    accepted = proposed = 0
    for i in range(N):
        out, st = generate_speculative(tgt, prompt, cfg, draft=drf, num_draft=2, seed=i)
        c1[out[0]] += 1
        c2[out[1]] += 1
        cq[int(torch.multinomial(q1, 1, generator=g))] += 1  # negative control: the draft's own distribution
        accepted, proposed = accepted + st.accepted, proposed + st.proposed
    for counts, probs in ((c1, p1), (c2, p2)):
        stat, df = chi2(counts, probs.tolist(), N)
        assert stat < chi2_crit(df), (stat, df)
    stat, df = chi2(cq, p1.tolist(), N)
    assert stat > chi2_crit(df)  # the test can tell the draft's distribution from the target's
    assert 0.1 < accepted / proposed < 0.95


def test_accept_reject_rule_exact():
    """Single position, deterministic draft (prompt lookup): accepted-or-resampled token ~ p exactly."""
    p = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    g = torch.Generator().manual_seed(0)
    counts = [0, 0, 0]
    N = 6000
    for _ in range(N):
        counts[accept_reject(p, None, [2], g)[0]] += 1
    stat, df = chi2(counts, p[0].tolist(), N)
    assert stat < chi2_crit(df)


def test_stop_ids_alias(target):
    prompt = rand_prompt(8, 3)
    ref = greedy_reference(target, prompt, 12)
    out, _ = generate_speculative(target, prompt, GenerationConfig(max_new_tokens=12), prompt_lookup=True,
                                  stop_ids=[ref[5]])
    assert out == ref[:ref.index(ref[5]) + 1]


def test_bad_arguments(target):
    with pytest.raises(LeanLMError):
        generate_speculative(target, [1, 2], max_new_tokens=4)  # no proposer
    with pytest.raises(LeanLMError):
        generate_speculative(target, [1, 2], max_new_tokens=4, draft=tiny_model(1, vocab=64))
    with pytest.raises(LeanLMError):
        generate_speculative(target, [1, 2], max_new_tokens=4, skip_layers=[0, 1, 2, 3])
