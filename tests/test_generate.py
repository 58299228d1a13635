"""Generation: cached == uncached, batched == one by one, samplers == transformers' processors, stops, stream."""
import pytest
import torch

import leanlm
from conftest import greedy_reference, tiny_hf, to_leanlm
from gguf_util import byte_vocab, write_tiny_gguf
from leanlm.infer.generate import generate_tokens
from leanlm.infer.sampling import GenerationConfig, SamplingConfig, apply_repetition_penalty, warp_logits

NV = len(byte_vocab()[0])


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("g")
    hf = tiny_hf("llama", vocab_size=NV, seed=3)
    return leanlm.load(write_tiny_gguf(d / "m.gguf", hf, "F32"), convert_cache=False)


def test_cached_generation_equals_uncached(model_tok):
    m, _ = model_tok
    prompt = [5, 9, 33, 70, 2 + 10]
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    got = [s[0] for s in generate_tokens(m, [prompt], cfg)]
    assert got == greedy_reference(m, prompt, 12)


def test_batched_equals_one_by_one(model_tok):
    m, _ = model_tok
    prompts = [[5, 9, 33], [70, 71, 72, 73, 74, 75, 76], [100]]
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    batched = list(zip(*[s for s in generate_tokens(m, prompts, cfg)]))
    for i, p in enumerate(prompts):
        alone = [s[0] for s in generate_tokens(m, [p], cfg)]
        assert list(batched[i]) == alone


def test_matches_transformers_generate_greedy():
    hf = tiny_hf("qwen2", vocab_size=NV, seed=5)
    m = to_leanlm(hf)
    prompt = [7, 8, 9, 10, 11]
    cfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    ours = [s[0] for s in generate_tokens(m, [prompt], cfg)]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                      pad_token_id=0)[0, 5:].tolist()
    assert ours == ref


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=0.7, top_k=5), SamplingConfig(temperature=1.3, top_p=0.8),
                                 SamplingConfig(temperature=1.0, top_k=20, top_p=0.5)])
def test_warpers_match_transformers_processors(cfg):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    procs = [TemperatureLogitsWarper(cfg.temperature)]
    if cfg.top_k:
        procs.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1:
        procs.append(TopPLogitsWarper(cfg.top_p))
    ref = LogitsProcessorList(procs)(None, logits.clone())
    ours = warp_logits(logits, cfg)
    assert torch.equal(torch.isinf(ref), torch.isinf(ours))
    fin = ~torch.isinf(ref)
    assert torch.allclose(ref[fin], ours[fin], atol=1e-5)


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 30)
    prev = torch.tensor([[1, 4, 4, 9], [0, 2, 3, 29]])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(prev, logits.clone())
    seen = torch.zeros(2, 30, dtype=torch.bool)
    seen[torch.arange(2)[:, None], prev] = True
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), ref)


def test_seed_reproducible_and_temperature_varies(model_tok):
    m, tok = model_tok
    a = leanlm.generate(m, tok, "the cat", max_new_tokens=15, temperature=1.0, seed=1, ignore_eos=True)
    b = leanlm.generate(m, tok, "the cat", max_new_tokens=15, temperature=1.0, seed=1, ignore_eos=True)
    c = leanlm.generate(m, tok, "the cat", max_new_tokens=15, temperature=1.0, seed=2, ignore_eos=True)
    assert a == b and a != c


def test_stop_token_and_stop_string(model_tok):
    m, tok = model_tok
    cfg = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    free = [s[0] for s in generate_tokens(m, [[5, 6, 7]], cfg)]
    stop_at = free[4]
    cfg2 = GenerationConfig(max_new_tokens=20, stop_token_ids=[stop_at])
    got = [s[0] for s in generate_tokens(m, [[5, 6, 7]], cfg2)]
    assert got == free[: free.index(stop_at) + 1]
    full = leanlm.generate(m, tok, "the cat", max_new_tokens=20, ignore_eos=True)
    needle = full[5:7]
    cut = leanlm.generate(m, tok, "the cat", max_new_tokens=20, ignore_eos=True, stop_strings=[needle])
    assert cut == full[: full.find(needle)]


def test_stream_equals_generate(model_tok):
    m, tok = model_tok
    kw = dict(max_new_tokens=25, ignore_eos=True)
    pieces = list(leanlm.stream(m, tok, "the hat", **kw))
    assert len(pieces) > 1
    assert "".join(pieces) == leanlm.generate(m, tok, "the hat", **kw)
    full = leanlm.generate(m, tok, "the hat", **kw)
    needle = full[8:10]
    assert "".join(leanlm.stream(m, tok, "the hat", stop_strings=[needle], **kw)) == full[: full.find(needle)]


def test_batched_text_generation_different_lengths(model_tok):
    m, tok = model_tok
    prompts = ["the", "the cat in the hat sat on it", "a"]
    kw = dict(max_new_tokens=6, ignore_eos=True)
    assert leanlm.generate(m, tok, prompts, **kw) == [leanlm.generate(m, tok, p, **kw) for p in prompts]


def test_cli_generate_and_bench_json(model_tok, tmp_path, capsys):
    import json

    from leanlm.cli import main

    m, tok = model_tok
    leanlm.save(m, tok, tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "the", "--max-new-tokens", "5"]) == 0
    capsys.readouterr()
    assert main(["bench", str(tmp_path / "m"), "--prompt-len", "8", "--new-tokens", "4", "--prefill-len", "16",
                 "--repeats", "1", "--batch", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s", "peak_rss_mb", "model_bytes"):
        assert res[k] > 0
