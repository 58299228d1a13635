"""Engine output equals plain greedy decoding under batching, chunked prefill, preemption and prefix sharing."""
import random

import pytest
import torch

from conftest import greedy_reference
from leanlm.errors import LeanLMError
from leanlm.infer.engine import Engine, SamplingParams
from leanlm.infer.paged import PagedKVCache
from leanlm.model import ModelConfig
from leanlm.model.transformer import Transformer


def tiny_model(seed=0, **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **kw)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    m = Transformer(ModelConfig.from_hf(hf.config.to_dict()))
    m.load_state_dict(hf.state_dict(), strict=False)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompts(k, lo=3, hi=40, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(128) for _ in range(rng.randint(lo, hi))] for _ in range(k)]


def test_paged_cache_matches_full_forward(model):
    """Chunked prefill with existing context, rows and packed layouts: logits equal the uncached forward."""
    cache = PagedKVCache(model.config, num_blocks=32, block_size=4)
    seqs = prompts(3, 5, 20, seed=1)
    for i, p in enumerate(seqs):
        cache.add_sequence(i)
        cache.ensure(i, len(p))
    with torch.inference_mode():
        full = [model(torch.tensor([p]))[0] for p in seqs]
        done = [0, 0, 0]
        for chunk in ([3, 5, 2], [1, 1, 1], [4, 7, 9]):
            chunk = [min(c, len(p) - d) for c, p, d in zip(chunk, seqs, done)]
            layout = "rows" if all(c == 1 for c in chunk) else "packed"
            B, T = cache.prepare([(i, c) for i, c in enumerate(chunk)], layout)
            if layout == "packed":
                ids = torch.tensor([t for p, d, c in zip(seqs, done, chunk) for t in p[d:d + c]])[None]
            else:
                ids = torch.tensor([[p[d]] for p, d in zip(seqs, done)])
            out = model(ids, cache=cache).reshape(B * T, -1)
            off = 0
            for i, (d, c) in enumerate(zip(done, chunk)):
                rows = out[off:off + c] if layout == "packed" else out[i * T:i * T + c]
                torch.testing.assert_close(rows, full[i][d:d + c], atol=1e-4, rtol=1e-4)
                off += c
            done = [d + c for d, c in zip(done, chunk)]


def test_paged_rows_layout_with_padding(model):
    cache = PagedKVCache(model.config, num_blocks=16, block_size=4)
    seqs = prompts(2, 6, 6, seed=2)
    for i, p in enumerate(seqs):
        cache.add_sequence(i)
        cache.ensure(i, len(p))
    with torch.inference_mode():
        B, T = cache.prepare([(0, 6), (1, 2)], "rows")
        ids = torch.tensor([seqs[0], seqs[1][:2] + [0] * 4])
        out = model(ids, cache=cache)
        torch.testing.assert_close(out[0], model(torch.tensor([seqs[0]]))[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[1, :2], model(torch.tensor([seqs[1][:2]]))[0], atol=1e-4, rtol=1e-4)
        cache.prepare([(1, 4)], "rows")
        out = model(torch.tensor([seqs[1][2:]]), cache=cache)
        torch.testing.assert_close(out[0], model(torch.tensor([seqs[1]]))[0, 2:], atol=1e-4, rtol=1e-4)


def check_equal(model, engine, ps, n):
    got = engine.generate(ps, SamplingParams(max_tokens=n))
    for p, g in zip(ps, got):
        assert g == greedy_reference(model, p, n)
    engine.cache.alloc.check_whole()
    assert not engine.cache.tables


def test_concurrent_batching_chunked_prefill(model):
    eng = Engine(model, block_size=4, num_blocks=200, max_batch_tokens=24, max_num_seqs=8)
    check_equal(model, eng, prompts(10, seed=3), 12)
    assert eng.stats["preemptions"] == 0


def test_preemption_by_recompute(model):
    eng = Engine(model, block_size=4, num_blocks=24, max_batch_tokens=64, max_num_seqs=8, prefix_caching=False)
    check_equal(model, eng, prompts(6, 10, 30, seed=4), 20)
    assert eng.stats["preemptions"] > 0


def test_prefix_sharing(model):
    base = prompts(1, 23, 23, seed=5)[0]
    ps = [base + tail for tail in prompts(5, 1, 9, seed=6)] + [base[:8], base]
    eng = Engine(model, block_size=4, num_blocks=100, max_batch_tokens=32, max_num_seqs=8)
    check_equal(model, eng, ps[:1], 10)  # warm the prefix cache
    check_equal(model, eng, ps, 10)
    assert eng.stats["prefix_hit_tokens"] >= 5 * 20
    # prefix blocks under memory pressure: sharing + preemption + LRU eviction together
    eng = Engine(model, block_size=4, num_blocks=20, max_batch_tokens=16, max_num_seqs=8)
    check_equal(model, eng, ps, 10)


def test_join_leave_abort_accounting(model):
    eng = Engine(model, block_size=4, num_blocks=16, max_batch_tokens=16, max_num_seqs=4)
    rng = random.Random(7)
    ps = prompts(12, 2, 30, seed=8)
    ps += [ps[0] + [3, 4, 5], ps[1][:9] + [7], list(ps[0])]  # shared prefixes too
    want, got, live = {}, {}, []
    for step in range(400):
        if ps and rng.random() < 0.4:
            p = ps.pop()
            rid = eng.add_request(p, SamplingParams(max_tokens=rng.randint(1, 15)))
            want[rid], got[rid] = p, []
            live.append(rid)
        if live and rng.random() < 0.05:
            rid = live.pop(rng.randrange(len(live)))
            assert eng.abort(rid)
            del want[rid]
        for o in eng.step():
            if o.request_id in got:
                got[o.request_id].append(o.token)
            if o.finished and o.request_id in live:
                live.remove(o.request_id)
        if not ps and not eng.has_unfinished():
            break
    assert not eng.has_unfinished()
    for rid, p in want.items():
        assert got[rid] == greedy_reference(model, p, len(got[rid]))
    eng.cache.alloc.check_whole()
    assert eng.stats["preemptions"] > 0 and eng.stats["prefix_hit_tokens"] > 0


def test_stop_and_sampling_seed(model):
    eng = Engine(model, block_size=4, num_blocks=64, eos_ids=(5,))
    p = prompts(1, seed=9)[0]
    ref = greedy_reference(model, p, 12)
    stop = ref[4]
    out = eng.generate([p], SamplingParams(max_tokens=12, stop_token_ids=(stop,)))[0]
    assert out == ref[:ref.index(stop) + 1]
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=3)
    a = eng.generate([p, p], [sp, sp])
    assert a[0] == a[1] == eng.generate([p], sp)[0]
    eng.cache.alloc.check_whole()


def test_bad_requests(model):
    eng = Engine(model, block_size=4, num_blocks=8)
    with pytest.raises(LeanLMError):
        eng.add_request([])
    with pytest.raises(LeanLMError):
        eng.add_request([1000])
    with pytest.raises(LeanLMError):
        eng.add_request([1] * 10, SamplingParams(max_tokens=100))  # needs more blocks than exist


def test_matches_plain_generation_sampled(model):
    """Seeded sampling (temperature, top-k, top-p, repetition penalty) equals the static-cache generate loop."""
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig

    eng = Engine(model, block_size=4, num_blocks=64)
    for i, p in enumerate(prompts(3, seed=10)):
        kw = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=100 + i)
        ref = [s[0] for s in generate_tokens(model, [p], GenerationConfig(max_new_tokens=10, **kw))]
        got = eng.generate([p], SamplingParams(max_tokens=10, **kw))[0]
        assert got == ref


def test_bench_concurrency_runs(model):
    from leanlm.eval.concurrency import bench_concurrency

    r = bench_concurrency(model, prompts(6, seed=11), max_new_tokens=5, concurrency=(1, 4),
                          engine_kwargs=dict(block_size=4, num_blocks=64))
    for n in (1, 4):
        e = r["engine"][n]
        assert e["identical_outputs"] == 6 and e["tokens_per_s"] > 0 and e["latency_p99"] >= e["latency_p50"]
    assert r["engine"][4]["steps"] < r["engine"][1]["steps"]
    r = bench_concurrency(model, concurrency=2, prompt_len=8, new_tokens=3, engine_kwargs=dict(block_size=4))
    assert r["requests"] == 4 and r["x2_tokens_per_s"] > 0 and r["engine"][2]["identical_outputs"] == 4


def test_sliding_window_model():
    """Mistral-style sliding window: the paged masks apply the window like the uncached forward."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, sliding_window=8))
    m = Transformer(ModelConfig.from_hf(hf.config.to_dict()))
    m.load_state_dict(hf.state_dict(), strict=False)
    m.eval()
    assert m.config.sliding_window == 8
    eng = Engine(m, block_size=4, num_blocks=64, max_batch_tokens=10)
    check_equal(m, eng, prompts(4, 5, 20, seed=12), 10)


def test_gemma_local_and_global_layers():
    """Gemma 2: sliding-window and global layers in one model, soft-capped attention and logits; the
    paged masks per layer type give plain greedy decoding's tokens (chunked prefill past the window)."""
    from conftest import tiny_hf, to_leanlm

    m = to_leanlm(tiny_hf("gemma2", max_position_embeddings=512, attn_logit_softcapping=3.0,
                          final_logit_softcapping=6.0))
    assert m.config.layer_types == ["sliding_attention", "full_attention"] and m.config.sliding_window == 6
    eng = Engine(m, block_size=4, num_blocks=64, max_batch_tokens=10)
    check_equal(m, eng, prompts(4, 5, 20, seed=12), 10)


@pytest.mark.slow
def test_default_model_engine_matches_plain_generation(default_model):
    """SmolLM2-135M: batched engine output (chunked prefill, shared prefix) equals plain greedy generation."""
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig

    model, tok = default_model
    sys_prompt = "You are a helpful assistant. Answer in one short sentence."
    ps = [tok.encode_chat([{"role": "system", "content": sys_prompt}, {"role": "user", "content": q}])
          for q in ("What is the capital of France?", "Name a primary colour.", "What is 2 + 2?")]
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True, stop_token_ids=[])
    ref = [[s[0] for s in generate_tokens(model, [p], cfg)] for p in ps]
    eng = Engine(model, block_size=16, num_blocks=64, max_batch_tokens=48, max_num_seqs=3)
    assert eng.generate(ps, SamplingParams(max_tokens=8, ignore_eos=True)) == ref
    assert eng.stats["prefix_hit_tokens"] > 0
    eng.cache.alloc.check_whole()


@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_bf16_and_quantized_models(model, kind):
    """The engine keeps the model's dtype for its pool and runs QuantLinear layers; output = plain greedy."""
    if kind == "bf16":
        m = tiny_model().to(torch.bfloat16)
    else:
        pytest.importorskip("leanlm.compress.quant")
        from leanlm.infer.speculative import quantized_draft
        m = quantized_draft(model)
    eng = Engine(m, block_size=4, num_blocks=200, max_batch_tokens=24, max_num_seqs=8)
    assert eng.cache.k[0].dtype == m.dtype
    check_equal(m, eng, prompts(10, seed=3), 12)
