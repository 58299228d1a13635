"""The training loop: every method learns, exact resume after a crash, checkpointing, accumulation."""
import json

import pytest
import torch

from leanlm.errors import LeanLMError
from leanlm.model import ModelConfig, Transformer
from leanlm.peft import apply, load_adapter, save_adapter
from leanlm.train import TrainConfig, latest_checkpoint, lr_at, train
from leanlm.train.loop import causal_lm_loss, collate


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_word_embeddings=True)
    m = Transformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    return m


def dataset(n=16, T=12):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (T,), generator=g).tolist()
        ids[T // 2:] = [(x * 7 + 3) % 64 for x in ids[:T - T // 2]]  # second half is a function of the first
        labels = [-100] * (T // 2) + ids[T // 2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


METHOD_OPTS = {
    "lora": ({"r": 4, "alpha": 8}, dict(lr=1e-2)),
    "dora": ({"r": 4, "alpha": 8}, dict(lr=1e-2)),
    "lora-fa": ({"r": 4, "alpha": 8}, dict(lr=1e-2)),
    "ia3": ({"target_modules": ["k_proj", "v_proj", "up_proj", "down_proj"]}, dict(lr=0.2)),
    "prompt": ({"num_virtual_tokens": 4}, dict(lr=0.3)),
    "prefix": ({"num_virtual_tokens": 4}, dict(lr=0.3)),
    "mezo": (None, dict(lr=2e-3, optimizer="mezo", mezo_eps=1e-3)),
}


@pytest.mark.parametrize("method", list(METHOD_OPTS))
def test_each_method_learns_and_round_trips(method, tmp_path):
    opts, tc = METHOD_OPTS[method]
    model = tiny()
    if opts is not None:
        model = apply(model, method, **opts)
    data = dataset()
    ids, labels = collate(data)
    with torch.no_grad():
        before = float(causal_lm_loss(model, ids, labels)[0])
    steps = 150 if method == "mezo" else 30
    res = train(model, data, TrainConfig(max_steps=steps, batch_size=8, progress=False, **tc))
    with torch.no_grad():
        after = float(causal_lm_loss(model, ids, labels)[0])
    assert after < before - {"mezo": 0.02, "ia3": 0.1, "prompt": 0.05, "prefix": 0.1}.get(method, 0.3), (before, after)
    assert len(res.losses) == steps and res.tokens > 0
    if opts is not None:  # the adapter saves and loads back into a fresh model with the same loss
        save_adapter(model, tmp_path / "ad")
        fresh = load_adapter(tiny(), tmp_path / "ad")
        with torch.no_grad():
            assert abs(float(causal_lm_loss(fresh, ids, labels)[0]) - after) < 1e-5


@pytest.mark.parametrize("optimizer", ["adamw", "lion", "mezo"])
def test_resume_after_crash_continues_exactly(optimizer, tmp_path):
    data = dataset()

    def run(out, crash_at=None, resume=False):
        m = apply(tiny(), "lora", r=4, alpha=8, dropout=0.1)  # dropout: the RNG must be restored too
        cfg = TrainConfig(max_steps=7, batch_size=4, grad_accum=2, lr=5e-3, warmup_steps=2, optimizer=optimizer,
                          save_every=3, out_dir=str(out), progress=False, seed=5)

        def cb(step, loss):
            if step == crash_at:
                raise KeyboardInterrupt

        return train(m, data, cfg, resume=resume, callback=cb)

    full = run(tmp_path / "a").losses
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=5)
    assert latest_checkpoint(tmp_path / "b").name == "step-0000003"
    resumed = run(tmp_path / "b", resume=True)
    assert resumed.losses == full[3:]  # bit-for-bit the same as the uninterrupted run
    assert full[3] != full[4]
    log = [json.loads(ln) for ln in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 8))
    assert [r["loss"] for r in log] == [round(x, 6) for x in full]


def test_failed_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    data = dataset()
    m = apply(tiny(), "lora", r=4)
    cfg = TrainConfig(max_steps=2, batch_size=4, save_every=1, out_dir=str(tmp_path), progress=False)
    import safetensors.torch as st
    real = st.save
    calls = {"n": 0}

    def flaky(tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] > 3:  # step 1 writes 3 files; step 2's first write dies
            raise OSError("disk full")
        return real(tensors, metadata=metadata)

    monkeypatch.setattr(st, "save", flaky)
    with pytest.raises(OSError):
        train(m, data, cfg)
    monkeypatch.setattr(st, "save", real)
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-0000001"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    res = train(apply(tiny(), "lora", r=4), data, cfg, resume=True)
    assert res.losses and res.steps == 2


def test_grad_checkpointing_and_accumulation_match_plain():
    data = dataset(8)

    def run(**kw):
        m = apply(tiny(), "lora", r=4, alpha=8)
        return train(m, data, TrainConfig(max_steps=4, lr=1e-2, progress=False, **kw)).losses

    plain = run(batch_size=8)
    torch.testing.assert_close(run(batch_size=8, grad_checkpointing=True), plain, atol=1e-6, rtol=1e-6)
    # two micro-batches of 4 = one batch of 8 (equal label counts per example)
    torch.testing.assert_close(run(batch_size=4, grad_accum=2), plain, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_trains():
    m = apply(tiny(), "lora", r=4, alpha=8)
    res = train(m, dataset(), TrainConfig(max_steps=20, batch_size=8, lr=1e-2, bf16=True, progress=False))
    assert res.losses[-1] < res.losses[0] - 0.3


def test_schedule_and_errors():
    assert lr_at(0, 1.0, 4, 100) == 0.25 and lr_at(3, 1.0, 4, 100) == 1.0
    assert abs(lr_at(100, 1.0, 4, 100) - 0.1) < 1e-9 and lr_at(52, 1.0, 4, 100) == pytest.approx(0.55)
    with pytest.raises(LeanLMError, match="no trainable"):
        m = tiny()
        for p in m.parameters():
            p.requires_grad_(False)
        train(m, dataset(), TrainConfig(max_steps=1, progress=False))


def test_trains_after_generation_in_inference_mode():
    """Generation (torch.inference_mode, fused projections, RoPE tables) before training must not break it."""
    from leanlm.infer.generate import generate_tokens
    from leanlm.infer.sampling import GenerationConfig

    m = tiny()
    list(generate_tokens(m, [[1, 2, 3]], GenerationConfig(max_new_tokens=3)))
    tied = m.lm_head.weight is m.model.embed_tokens.weight
    m = apply(m, "lora", r=4, alpha=8)
    res = train(m, dataset(), TrainConfig(max_steps=3, batch_size=8, lr=1e-2, progress=False))
    assert len(res.losses) == 3 and (m.lm_head.weight is m.model.embed_tokens.weight) == tied


def test_mezo_step_matches_the_papers_four_pass_update():
    """MeZO restores and updates in one pass over z; the result equals the paper's algorithm written
    out (perturb +eps, -2eps, +eps, then step along z), with weight decay."""
    from leanlm.train.optim import MeZO

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(3))]
    ref = [p.detach().clone() for p in params]
    x = torch.randn(7)

    def loss_of(ps):
        return float((ps[0] @ x).pow(2).sum() + ps[1].sum())

    lr, eps, wd, seed = 1e-2, 1e-3, 0.1, 1234
    opt = MeZO(params, lr=lr, eps=eps, weight_decay=wd)
    got = opt.step(lambda: loss_of(params), seed)

    def perturb(scale):
        g = torch.Generator().manual_seed(seed)
        for p in ref:
            p.add_(torch.randn(p.shape, generator=g), alpha=scale)

    perturb(eps)
    lp = loss_of(ref)
    perturb(-2 * eps)
    lm = loss_of(ref)
    perturb(eps)
    g = torch.Generator().manual_seed(seed)
    for p in ref:
        z = torch.randn(p.shape, generator=g)
        p.mul_(1 - lr * wd).add_(z, alpha=-lr * (lp - lm) / (2 * eps))
    assert got == (lp + lm) / 2
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-6)
