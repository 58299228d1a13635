"""Data-free QAT/distillation (LLM-QAT): the teacher writes its training text; cached, reproducible, by name."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_hf, to_leanlm
from leanlm.errors import LeanLMError
from leanlm.train.datafree import GenerationSpec, self_generated


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "generated"


@torch.no_grad()
def reference_generation(model, spec: GenerationSpec) -> list[list[int]]:
    """The same draws without a KV cache: a full forward over the prefix at every step."""
    g = torch.Generator().manual_seed(spec.seed)
    out = []
    for i in range(0, spec.count, spec.batch):
        seq = torch.randint(0, model.config.vocab_size, (min(spec.batch, spec.count - i), 1), generator=g)
        for j in range(spec.length - 1):
            logits = model(seq)[:, -1]
            nxt = (logits.argmax(-1, keepdim=True) if j < spec.greedy
                   else torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=g))
            seq = torch.cat([seq, nxt], 1)
        out += seq.tolist()
    return out


def test_generation_matches_uncached_reference_and_is_cached(cache, monkeypatch):
    import leanlm.train.datafree as df

    model = to_leanlm(tiny_hf(seed=0))
    spec = GenerationSpec(count=5, length=12, greedy=3, seed=1, batch=2)
    data, hit = self_generated(model, spec, progress=False)
    assert not hit and len(data) == 5
    assert [d["input_ids"] for d in data] == reference_generation(model, spec)
    assert all(d["labels"] == d["input_ids"] for d in data)
    assert len({d["input_ids"][0] for d in data}) > 1  # random first tokens
    assert len(list(cache.glob("*.safetensors"))) == 1
    # a rerun reads the file and never runs the model
    monkeypatch.setattr(df, "generate_batch", lambda *a, **k: pytest.fail("generated again"))
    again, hit = self_generated(model, spec, progress=False)
    assert hit and again == data
    # another seed, or other weights, is another text
    monkeypatch.undo()
    monkeypatch.setenv("LEANLM_CACHE", str(cache.parent))
    other, hit = self_generated(model, GenerationSpec(count=5, length=12, greedy=3, seed=2, batch=2), progress=False)
    assert not hit and other != data
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    assert not self_generated(changed, spec, progress=False)[1]
    assert len(list(cache.glob("*.safetensors"))) == 3


def test_generation_stops_rows_at_end_of_sequence(cache):
    model = to_leanlm(tiny_hf(seed=0))
    spec = GenerationSpec(count=8, length=20, greedy=0, seed=0, batch=8)
    free = [d["input_ids"] for d in self_generated(model, spec, progress=False)[0]]
    stop = free[0][5]  # a token the model really produces at position 5 of row 0
    cut = [d["input_ids"] for d in self_generated(model, spec, [stop], progress=False)[0]]
    for f, c in zip(free, cut):
        k = next((j for j, t in enumerate(f) if j > 0 and t == stop), None)
        assert c == (f if k is None else f[:k + 1])
    assert len(cut[0]) <= 6


def test_bad_generation_settings_are_one_line():
    with pytest.raises(LeanLMError, match="length must be >= 2"):
        GenerationSpec(length=1).validate()
    from leanlm.compress.recipe import load_recipe, resolve

    with pytest.raises(LeanLMError, match="-datafree applies to qat recipes only"):
        load_recipe("w4a16-gptq-g32-datafree")
    r = load_recipe("w4a16-qat-g32-datafree")
    r.steps[0].fields["data"] = "invented"
    with pytest.raises(LeanLMError, match="data must be one of calib, generated"):
        resolve(r, to_leanlm(tiny_hf(seed=0)))


def test_datafree_qat_recipe_needs_no_data_trains_and_is_reproducible(cache):
    from leanlm.compress.quant import QuantLinear
    from leanlm.compress.recipe import apply_recipe, load_recipe, parse_recipe
    from test_distill import mean_kl

    r = load_recipe("w3a16-qat-g32-datafree")
    assert [(s.method, s.fields) for s in r.steps] == [("qat", {"bits": 3, "group_size": 32, "data": "generated"})]
    assert not r.needs_data and load_recipe("w3a16-qat-g32").needs_data
    r.steps[0].fields.update(steps=25, lr=2e-3, batch_size=4, seq_len=24, gen_count=12, progress=False)
    original = to_leanlm(tiny_hf(seed=0))
    rtn = copy.deepcopy(original)
    # step 0 of QAT: round to nearest on the same (asymmetric) grid
    apply_recipe(rtn, parse_recipe("- method: rtn\n  bits: 3\n  group_size: 32\n  sym: false\n"), None, progress=False)
    runs, losses = [], []
    for _ in range(2):
        model = copy.deepcopy(original)
        seen = []
        import leanlm.compress.qat as qat
        orig = qat.distill_step
        qat.distill_step = lambda *a, **k: orig(*a, **{**k, "callback": lambda s, loss: seen.append(loss)})
        try:
            apply_recipe(model, r, None, progress=False)  # no calibration samples at all
        finally:
            qat.distill_step = orig
        runs.append(model)
        losses.append(seen)
    assert len(list(cache.glob("*.safetensors"))) == 1  # the second run read the first run's text
    assert losses[0] == losses[1] and len(losses[0]) == 25
    assert sum(losses[0][-5:]) < sum(losses[0][:5])
    for (n, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    assert all(isinstance(runs[0].get_submodule(n), QuantLinear) for n, m in rtn.named_modules()
               if isinstance(m, QuantLinear))
    # judged on text the teacher never wrote: random tokens
    g = torch.Generator().manual_seed(5)
    data = [{"input_ids": torch.randint(0, 128, (24,), generator=g).tolist()} for _ in range(8)]
    assert mean_kl(runs[0], original, data) < 0.95 * mean_kl(rtn, original, data)  # measured 0.60 vs 0.68
