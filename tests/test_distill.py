"""Distillation: training moves the student to the teacher, exact resume, top-k cache, recipes with +distill."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_hf, to_leanlm
from leanlm.errors import LeanLMError
from leanlm.train.distill import DistillConfig, distill
from leanlm.train.losses import divergence


def _data(n=12, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, 128, (T,), generator=g).tolist()), "labels": ids}
            for _ in range(n)]


@torch.no_grad()
def mean_kl(student, teacher, data, kind="fkl"):
    ids = torch.tensor([d["input_ids"] for d in data])
    return float(divergence(student(ids).flatten(0, 1), teacher(ids).flatten(0, 1), kind).mean())


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd", "skl", "srkl"])
def test_distill_moves_student_towards_teacher(loss):
    teacher, student = to_leanlm(tiny_hf(seed=0)), to_leanlm(tiny_hf(seed=1))
    data = _data()
    before = mean_kl(student, teacher, data, loss)
    res = distill(student, teacher, data, DistillConfig(loss=loss, steps=20, lr=3e-3, batch_size=4, warmup=0,
                                                       chunk=16), progress=False)
    assert mean_kl(student, teacher, data, loss) < 0.75 * before
    assert res.losses[-1] < res.losses[0]
    assert all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("on_policy", [0.0, 0.5])
def test_distill_resume_is_exact(tmp_path, on_policy):
    teacher = to_leanlm(tiny_hf(seed=0))
    data = _data()
    cfg = DistillConfig(loss="jsd", steps=6, lr=1e-3, batch_size=4, chunk=16, on_policy=on_policy,
                        on_policy_prompt=5, on_policy_tokens=6)
    ref = to_leanlm(tiny_hf(seed=1))
    distill(ref, teacher, data, cfg, progress=False)

    class Crash(Exception):
        pass

    def crash(step, loss):
        if step == 3:
            raise Crash
    s = to_leanlm(tiny_hf(seed=1))
    with pytest.raises(Crash):
        distill(s, teacher, data, cfg, out_dir=str(tmp_path), save_every=1, progress=False, callback=crash)
    s2 = to_leanlm(tiny_hf(seed=1))
    distill(s2, teacher, data, cfg, out_dir=str(tmp_path), save_every=1, resume=True, progress=False)
    for (n, a), b in zip(ref.state_dict().items(), s2.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)


def test_topk_cache_full_k_matches_online_and_is_reused(tmp_path):
    from leanlm.train.distill import cached_loss_fn
    from leanlm.train.losses import DistillLoss, distill_loss_fn
    from leanlm.train.teacher import TopKCache, cache_fingerprint

    teacher, student = to_leanlm(tiny_hf(seed=0)), to_leanlm(tiny_hf(seed=1))
    data = _data(n=5)
    data[2] = {"input_ids": data[2]["input_ids"][:15], "labels": [-100] * 5 + data[2]["input_ids"][5:15]}
    fp = cache_fingerprint("t", data, 128, 2.0)
    cache = TopKCache.build(teacher, data, 128, 2.0, batch_size=2, progress=False)
    path = tmp_path / "c.safetensors"
    cache.save(path, fp)
    assert TopKCache.load(path, cache_fingerprint("t", data, 64, 2.0)) is None  # other k: not reused
    loaded = TopKCache.load(path, fp)
    from leanlm.train.loop import collate

    ids, labels = collate(data[:4])
    cfg = DistillLoss("fkl", temperature=2.0, chunk=7)
    online = distill_loss_fn(teacher, cfg)(student, ids, labels)[0]
    offline = cached_loss_fn(loaded, cfg)(student, ids, labels)[0]
    torch.testing.assert_close(offline, online, atol=2e-3, rtol=2e-3)  # fp16 log-probs in the cache
    # top-k < V: the rest of the mass is spread evenly, so the reverse KL stays finite
    small = TopKCache.build(teacher, data, 8, 1.0, progress=False)
    rkl = cached_loss_fn(small, DistillLoss("rkl"))(student, ids, labels)[0]
    assert torch.isfinite(rkl) and rkl > 0
    # distill() with a cache path builds it once, then reads it without running the teacher
    cfg2 = DistillConfig(steps=1, topk=16, batch_size=2)
    distill(copy.deepcopy(student), teacher, data, cfg2, cache=str(tmp_path / "k.safetensors"), progress=False)

    class NoTeacher(torch.nn.Module):
        config = teacher.config

        def forward(self, *a, **k):
            raise AssertionError("the cached run must not call the teacher")
    distill(copy.deepcopy(student), NoTeacher(), data, cfg2, cache=str(tmp_path / "k.safetensors"), progress=False)


def test_check_pair_rejects_other_vocabulary():
    from leanlm.train.teacher import check_pair

    a, b = to_leanlm(tiny_hf(seed=0)), to_leanlm(tiny_hf(seed=0, vocab_size=130))
    with pytest.raises(LeanLMError, match="vocabulary"):
        check_pair(a, None, b, None)


def _recipe_run(name, seed=0):
    from leanlm.compress.recipe import load_recipe

    model = to_leanlm(tiny_hf(seed=seed))
    original = copy.deepcopy(model)
    samples = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))
    return model, original, samples, load_recipe


def test_quantized_recipe_plus_distill_trains_scales_keeps_codes():
    from leanlm.compress.quant import QuantLinear
    from leanlm.compress.recipe import apply_recipe, load_recipe

    model, original, samples, _ = _recipe_run("")
    base = copy.deepcopy(model)
    apply_recipe(base, load_recipe("w3a16-rtn-g32"), samples, progress=False)
    r = load_recipe("w3a16-rtn-g32+distill")
    assert [s.method for s in r.steps] == ["rtn", "distill"]
    r.steps[-1].fields.update(steps=25, lr=2e-3, scales_lr=2e-4, batch_size=4, seq_len=32, progress=False)
    apply_recipe(model, r, samples, progress=False)
    qa = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    qb = {n: m for n, m in base.named_modules() if isinstance(m, QuantLinear)}
    assert qa and qa.keys() == qb.keys()
    for n in qa:
        assert torch.equal(qa[n].codes(), qb[n].codes())  # codes frozen
        assert qa[n].scales.dtype == torch.float16 and not isinstance(qa[n].scales, torch.nn.Parameter)
    assert any(not torch.equal(qa[n].scales, qb[n].scales) for n in qa)
    data = [{"input_ids": r.tolist()} for r in samples]
    assert mean_kl(model, original, data) < 0.8 * mean_kl(base, original, data)
    # the fast packed path agrees with the reference path after training
    ids = samples[:1, :1]
    QuantLinear.fast = False
    ref = model(ids)
    QuantLinear.fast = True
    torch.testing.assert_close(model(ids), ref, atol=5e-2, rtol=5e-2)


def test_pruned_recipe_plus_distill_keeps_zeros():
    from leanlm.compress.recipe import apply_recipe, load_recipe
    from leanlm.model.layout import all_block_linears

    model, original, samples, _ = _recipe_run("")
    r = load_recipe("sparse50-wanda+distill")
    r.steps[-1].fields.update(steps=10, lr=1e-3, batch_size=4, seq_len=32, progress=False)
    pruned = copy.deepcopy(model)
    apply_recipe(pruned, load_recipe("sparse50-wanda"), samples, progress=False)
    apply_recipe(model, r, samples, progress=False)
    for n in all_block_linears(model):
        w, w0 = model.get_submodule(n).weight, pruned.get_submodule(n).weight
        assert torch.equal(w == 0, w0 == 0), n  # the same zeros, no new ones lost
        assert not torch.equal(w, w0)
    assert all(p.requires_grad == q.requires_grad for p, q in zip(model.parameters(), pruned.parameters()))


def test_unknown_distill_field_is_a_recipe_error(tmp_path):
    from leanlm.compress.recipe import load_recipe, resolve

    f = tmp_path / "r.yaml"
    f.write_text("- method: rtn\n  bits: 4\n  group_size: 32\n- method: distill\n  loss: kl\n")
    with pytest.raises(LeanLMError, match="r.yaml:5"):
        resolve(load_recipe(str(f)), to_leanlm(tiny_hf(seed=0)))


@pytest.mark.parametrize("sym,g", [(False, 32), (True, 16), (False, 0), (False, 24)])
def test_fake_quantize_is_the_rtn_grid_with_identity_gradient(sym, g):
    from leanlm.compress.qat import fake_quantize
    from leanlm.compress.quant.grid import dequantize, rtn_quantize

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    wq = fake_quantize(w, 3, g, sym)
    codes, s, o = rtn_quantize(w.detach(), 3, g, sym)
    torch.testing.assert_close(wq.detach(), dequantize(codes, s, o, g if g else 64), atol=1e-6, rtol=0)
    (wq * torch.arange(64.0)).sum().backward()
    torch.testing.assert_close(w.grad, torch.arange(64.0).expand(8, 64))


def test_qat_recipe_by_name_converts_to_packed_and_beats_rtn():
    from leanlm.compress.qat import FakeQuantLinear
    from leanlm.compress.quant import QuantLinear
    from leanlm.compress.recipe import apply_recipe, load_recipe

    model, original, samples, _ = _recipe_run("")
    rtn = copy.deepcopy(model)
    apply_recipe(rtn, load_recipe("w3a16-rtn-g32"), samples, progress=False)
    r = load_recipe("w3a16-qat-g32")
    assert [(s.method, s.fields) for s in r.steps] == [("qat", {"bits": 3, "group_size": 32})]
    r.steps[0].fields.update(steps=25, lr=2e-3, batch_size=4, seq_len=32, progress=False)
    seen = {}

    def spy(step, loss):  # just before conversion: the fake-quantized model's logits
        if step == 25:
            with torch.no_grad():
                seen["logits"] = model(samples[:2])
            seen["fakes"] = sum(isinstance(m, FakeQuantLinear) for m in model.modules())
    import leanlm.compress.qat as qat
    orig = qat.distill_step
    qat.distill_step = lambda *a, **k: orig(*a, **{**k, "callback": spy})
    try:
        apply_recipe(model, r, samples, progress=False)
    finally:
        qat.distill_step = orig
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(q) == seen["fakes"] == sum(isinstance(m, QuantLinear) for m in rtn.modules()) and q[0].bits == 3
    QuantLinear.fast = False
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(samples[:2]), seen["logits"], atol=1e-4, rtol=1e-4)
    finally:
        QuantLinear.fast = True
    data = [{"input_ids": r.tolist()} for r in samples]
    assert mean_kl(model, original, data) < 0.8 * mean_kl(rtn, original, data)


def test_student_samples_match_sampling_without_cache():
    from leanlm.train.distill import student_samples

    model = to_leanlm(tiny_hf(seed=0))
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    got, labels = student_samples(model, ids, 4, 6)
    torch.manual_seed(7)
    seq = ids[:, :4]
    with torch.no_grad():
        for _ in range(6):
            nxt = torch.multinomial(torch.softmax(model(seq)[:, -1].float(), -1), 1)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(got, seq)
    assert (labels[:, :4] == -100).all() and torch.equal(labels[:, 4:], seq[:, 4:])


def _trl_completion_mask(completion: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """TRL 1.16 GKDTrainer.generate_on_policy_outputs' mask, written out: every position up to and including
    each row's first end-of-sequence token (the whole row where there is none)."""
    is_eos = torch.isin(completion, torch.tensor(eos))
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full((completion.shape[0],), completion.shape[1]))
    return torch.arange(completion.shape[1])[None] <= first[:, None]


def test_student_samples_stop_scoring_after_end_of_sequence():
    from leanlm.train.distill import student_samples

    model = to_leanlm(tiny_hf(seed=0))
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    free, _ = student_samples(model, ids, 4, 12)
    eos = [int(free[0, 6]), int(free[2, 9])]  # row 0 ends at its 3rd sampled token, row 2 at its 6th or before
    torch.manual_seed(7)
    got, labels = student_samples(model, ids, 4, 12, eos_ids=eos, pad_id=99)
    keep = _trl_completion_mask(free[:, 4:], eos)
    assert keep[0].sum() == 3 and not keep.all()
    W = got.shape[1] - 4  # sampling stops once every row has ended
    assert W == (int(keep.sum(1).max()) if keep.sum(1).max() < 12 else 12)
    gen, lab = got[:, 4:], labels[:, 4:]
    assert torch.equal(gen[keep[:, :W]], free[:, 4:4 + W][keep[:, :W]])  # same draws up to the end
    assert (gen[~keep[:, :W]] == 99).all() and (lab[~keep[:, :W]] == -100).all()
    assert torch.equal(lab[keep[:, :W]], gen[keep[:, :W]]) and (labels[:, :4] == -100).all()
    torch.manual_seed(7)  # a token list covering the whole vocabulary ends every row at its first token
    got, labels = student_samples(model, ids, 4, 12, eos_ids=range(128))
    assert got.shape == (3, 5) and torch.equal(labels[:, 4], got[:, 4])


def test_on_policy_loss_ignores_positions_after_end_of_sequence():
    """The on-policy loss is the mean over the scored sampled tokens: equal to the loss of each row cut after
    its end-of-sequence token, computed row by row, and blind to what follows that token."""
    from leanlm.train.distill import on_policy_loss_fn, student_samples
    from leanlm.train.losses import distill_loss_fn

    teacher, student = to_leanlm(tiny_hf(seed=0)), to_leanlm(tiny_hf(seed=1))
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    cfg = DistillConfig(loss="jsd", on_policy=1.0, on_policy_prompt=4, on_policy_tokens=12)
    base = distill_loss_fn(teacher, cfg.loss_config())

    def draw(*eos):  # the wrapper draws its lambda coin first, then samples
        torch.manual_seed(3)
        torch.rand(())
        return student_samples(student, ids, 4, 12, eos, 5)
    eos = [int(draw()[0][1, 7])]
    torch.manual_seed(3)
    loss, n = on_policy_loss_fn(base, cfg, eos, pad_id=5)(student, ids, None)
    got, labels = draw(*eos)
    keep = labels[:, 1:] != -100
    assert n == int(keep.sum()) < 3 * 12
    total = 0.0
    for b in range(3):
        m = 4 + int((labels[b, 4:] != -100).sum())
        row_loss, row_n = base(student, got[b:b + 1, :m], labels[b:b + 1, :m])
        total += float(row_loss.detach()) * row_n
    torch.testing.assert_close(float(loss), total / n, rtol=1e-5, atol=1e-7)
    noisy = got.masked_fill(torch.cat([torch.zeros_like(keep[:, :1]), ~keep], 1) & (torch.arange(got.shape[1]) >= 4),
                            17)
    torch.testing.assert_close(float(base(student, noisy, labels)[0]), float(loss), rtol=1e-5, atol=1e-7)
