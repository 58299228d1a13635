"""KV-cache compression: exact at full budget, StreamingLLM equals an explicit attention mask, H2O scores equal
transformers' attention probabilities, budgets are respected."""
import math

import pytest
import torch

from leanlm.errors import LeanLMError
from leanlm.infer.kv_evict import EvictingKVCache, evict_perplexity
from leanlm.model import ModelConfig
from leanlm.model.transformer import Transformer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attn_implementation="eager"))
    m = Transformer(ModelConfig.from_hf(hf.config.to_dict()))
    m.load_state_dict(hf.state_dict(), strict=False)
    return m.eval(), hf.eval()


IDS = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(1))


@torch.inference_mode()
def plain_ppl(model, ids, mask=None):
    class MaskCache:  # whole sequence in one forward with an explicit boolean mask
        def begin(self, T, positions, window):
            return torch.arange(T)[None], mask[None, None]

        def update(self, layer, k, v):
            return k, v

        def end(self):
            pass
    logits = model(ids[:, :-1], cache=None if mask is None else MaskCache()).float()
    return math.exp(float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:])))


@pytest.mark.parametrize("policy", ["full", "streaming", "h2o", "scissorhands"])
@pytest.mark.parametrize("chunk", [1, 7])
def test_exact_when_budget_covers_everything(pair, policy, chunk):
    model, _ = pair
    got = evict_perplexity(model, IDS, policy, budget=IDS.shape[1], chunk=chunk)
    assert abs(got - plain_ppl(model, IDS)) < 1e-3 * got


def test_streaming_equals_explicit_mask(pair):
    model, _ = pair
    B, sink = 16, 4
    n = IDS.shape[1] - 1
    q, k = torch.arange(n)[:, None], torch.arange(n)[None]
    # query j sees the sinks and the B - sink keys before it, plus itself (B + 1 keys)
    mask = (k <= q) & ((k < sink) | (k >= q - (B - sink)))
    want = plain_ppl(model, IDS, mask)
    got = evict_perplexity(model, IDS, "streaming", budget=B, sink=sink)
    assert abs(got - want) < 1e-3 * want
    assert abs(got - plain_ppl(model, IDS)) > 1e-3 * got  # the budget really bites


@torch.inference_mode()
def test_h2o_scores_are_attention_probabilities(pair):
    model, hf = pair
    n = 20
    att = hf(IDS[:, :n], output_attentions=True).attentions  # [1, H, n, n] per layer
    cache = EvictingKVCache(model, "h2o", budget=64)
    with cache:
        for t in range(n):
            model(IDS[:, t:t + 1], cache=cache)
    for layer in range(2):
        want = att[layer][0].reshape(2, 2, n, n).sum((1, 2))  # KV head groups, summed over queries
        torch.testing.assert_close(cache.score[layer][0], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "scissorhands"])
def test_budget_respected_and_recent_kept(pair, policy):
    model, _ = pair
    cache = EvictingKVCache(model, policy, budget=12, recent=4)
    with torch.inference_mode(), cache:
        for t in range(40):
            model(IDS[:, t:t + 1], cache=cache)
            assert cache.length <= 12
            pos = cache.pos[0][0]
            assert t < 3 or bool((pos[:, -4:] == torch.arange(t - 3, t + 1)).all())  # the recent window is always kept
    ppl = evict_perplexity(model, IDS, policy, budget=12)
    assert math.isfinite(ppl)


def test_h2o_keeps_heavy_hitters_and_recent(pair):
    cache = EvictingKVCache(pair[0], "h2o", budget=6, recent=2)
    score = torch.tensor([[[5.0, 0.1, 9.0, 0.2, 3.0, 0.0, 0.0, 0.0], [0.5, 1.0, 0.0, 2.0, 0.7, 3.0, 0.0, 0.0]]])
    pos = torch.arange(8).expand(1, 2, 8)
    keep = cache._choose(pos, score, 6)
    assert keep.tolist() == [[[0, 2, 3, 4, 6, 7], [1, 3, 4, 5, 6, 7]]]  # top-4 old per KV head + the 2 newest
    cache = EvictingKVCache(pair[0], "streaming", budget=6, sink=2)
    assert cache._choose(pos, score, 6).tolist() == [[[0, 1, 4, 5, 6, 7]] * 2]


def test_bad_policy(pair):
    with pytest.raises(LeanLMError):
        EvictingKVCache(pair[0], "lru", 10)
    with pytest.raises(LeanLMError):
        evict_perplexity(pair[0], IDS, "h2o", budget=1)
