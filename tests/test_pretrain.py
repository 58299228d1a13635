"""Pre-training: optimizers against reference steps, growth and conversions that keep the function,
corpus packing, the CLI, and FSDP2 on 2 gloo processes against one process."""
from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from leanlm.errors import LeanLMError
from leanlm.model import ModelConfig
from leanlm.train import TrainConfig, train
from leanlm.train.optim import AdamMini, ScheduleFreeAdamW, lr_at, make_optimizer
from leanlm.train.pretrain import grow_depth, grow_width, init_weights, new_model, pack, to_mqa


def tiny_cfg(**over):
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
              tie_word_embeddings=True, attention_bias=True, attention_out_bias=True, mlp_bias=True)
    return ModelConfig(**{**kw, **over})


def randomized(cfg, seed=1):
    m = new_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)  # biases and norm weights too
    return m


# ---------------------------------------------------------------- optimizers
def test_adam_mini_matches_formula():
    torch.manual_seed(0)
    w, b = torch.randn(5, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    ref_w, ref_b = w.detach().clone(), b.detach().clone()
    opt = AdamMini([w, b], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    m = {0: torch.zeros(5, 4), 1: torch.zeros(4)}
    v = {0: torch.zeros(5, 1), 1: torch.zeros(1)}
    for t in range(1, 4):
        gw, gb = torch.randn(5, 4), torch.randn(4)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        for k, (p, g) in enumerate(((ref_w, gw), (ref_b, gb))):
            m[k] = 0.9 * m[k] + 0.1 * g
            block = (g * g).mean(1, keepdim=True) if g.dim() == 2 else (g * g).mean().reshape(1)
            v[k] = 0.99 * v[k] + 0.01 * block  # one second moment per row / per tensor
            p -= 0.1 * (m[k] / (1 - 0.9 ** t)) / ((v[k] / (1 - 0.99 ** t)).sqrt() + 1e-8)
    assert torch.allclose(w.detach(), ref_w, atol=1e-6) and torch.allclose(b.detach(), ref_b, atol=1e-6)
    assert opt.state[w]["exp_avg_sq"].shape == (5, 1)  # the memory saving is real


def test_schedule_free_matches_paper_sequences_and_switches_to_the_average():
    torch.manual_seed(0)
    p = torch.randn(6, requires_grad=True)
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
    opt = ScheduleFreeAdamW([p], lr=lr, betas=(b1, b2), eps=eps)
    x = p.detach().clone()
    z = x.clone()
    v = torch.zeros(6)
    wsum, lr_max = 0.0, 0.0
    for t in range(5):
        y = (1 - b1) * z + b1 * x
        assert torch.allclose(p.detach(), y, atol=1e-6)  # gradients are taken at y
        g = torch.randn(6)
        p.grad = g.clone()
        opt.step()
        v = b2 * v + (1 - b2) * g * g
        lr_max = max(lr_max, lr)
        wsum += lr_max ** 2
        c = lr_max ** 2 / wsum
        z = z - lr * g / ((v / (1 - b2 ** (t + 1))).sqrt() + eps)
        x = (1 - c) * x + c * z
    opt.eval()
    assert torch.allclose(p.detach(), x, atol=1e-5)  # evaluation and saving see the average x
    opt.train()
    assert torch.allclose(p.detach(), (1 - b1) * z + b1 * x, atol=1e-5)


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    torch.manual_seed(0)
    emb, hid, norm = torch.randn(8, 4), torch.randn(6, 4), torch.randn(4)
    ps = [t.clone().requires_grad_(True) for t in (emb, hid, norm)]
    named = [("model.embed_tokens.weight", ps[0]), ("model.layers.0.x.weight", ps[1]), ("model.norm.weight", ps[2])]
    opt = make_optimizer("muon", ps, 0.02, 0.0, named=named, keep_adam=("model.embed_tokens",))
    ref_h = hid.clone().requires_grad_(True)
    ref_r = [emb.clone().requires_grad_(True), norm.clone().requires_grad_(True)]
    muon = torch.optim.Muon([ref_h], lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    adam = torch.optim.AdamW(ref_r, lr=0.02, weight_decay=0.0, betas=(0.9, 0.95))
    for _ in range(3):
        gs = [torch.randn_like(t) for t in (emb, hid, norm)]
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        ref_h.grad, ref_r[0].grad, ref_r[1].grad = gs[1].clone(), gs[0].clone(), gs[2].clone()
        opt.step()
        muon.step()
        adam.step()
    assert torch.equal(ps[1], ref_h) and torch.equal(ps[0], ref_r[0]) and torch.equal(ps[2], ref_r[1])
    assert len(opt.param_groups) == 2 and set(opt.state) == set(ps)


def test_schedules_and_bad_names():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(50, 1.0, 10, 100, schedule="wsd") == 1.0  # stable phase
    assert lr_at(99, 1.0, 10, 100, min_ratio=0.0, schedule="wsd") == pytest.approx(0.05)
    assert lr_at(60, 1.0, 0, 100, schedule="constant") == 1.0
    with pytest.raises(LeanLMError, match="unknown optimizer"):
        make_optimizer("adamax", [torch.zeros(2, requires_grad=True)], 0.1, 0.0)
    with pytest.raises(LeanLMError, match="unknown schedule"):
        lr_at(5, 1.0, 0, 10, schedule="linear")


# ---------------------------------------------------------------- growth, conversions, init
@pytest.mark.parametrize("tied", [True, False])
def test_growth_keeps_the_function(tied):
    m = randomized(tiny_cfg(tie_word_embeddings=tied))
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ref = m(ids)
        wide = grow_width(m)
        assert wide.config.hidden_size == 64 and wide.config.intermediate_size == 96
        assert (wide(ids) - ref).abs().max() < 1e-5
        deep = grow_depth(m, 2)
        assert deep.config.num_layers == 4
        assert (deep(ids) - ref).abs().max() < 1e-5
        cache = deep.new_cache(2, 16)  # the grown model's cache indexes the new layers
        step = torch.cat([deep(ids[:, :7], cache=cache), deep(ids[:, 7:], cache=cache)], 1)
        assert (step - ref).abs().max() < 1e-4


def test_mqa_conversion_mean_pools_kv_heads():
    m = randomized(tiny_cfg())
    k_before = m.model.layers[0].self_attn.k_proj.weight.detach().clone()
    q = to_mqa(m, 1)
    k_after = q.model.layers[0].self_attn.k_proj.weight
    assert q.config.num_kv_heads == 1 and k_after.shape == (8, 32)
    assert torch.allclose(k_after, k_before.view(2, 8, 32).mean(0))
    assert q(torch.randint(0, 64, (1, 5))).shape == (1, 5, 64)
    with pytest.raises(LeanLMError, match="pool evenly"):
        to_mqa(randomized(tiny_cfg(num_heads=6, num_kv_heads=3)), 2)


def test_zero_out_init_makes_every_block_the_identity():
    m = init_weights(new_model(tiny_cfg()), "zero-out")
    x = torch.randn(1, 5, 32)
    cos, sin = m.rope.lookup(torch.arange(5)[None], 4, x.dtype)
    for blk in m.model.layers:
        assert torch.equal(blk(x, cos, sin, "causal", None), x)


def test_pack_holds_out_a_contiguous_validation_tail():
    class Tok:
        eos_ids = [0]

        def encode(self, text, add_special=False):
            return [ord(c) % 50 + 1 for c in text]
    tr, va = pack(["a" * 95, "b" * 100], Tok(), seq_len=16, val_fraction=0.1)
    assert all(len(r["input_ids"]) == 16 for r in tr + va) and len(va) == 1 and len(tr) == 11
    assert va[0]["input_ids"] == [ord("b") % 50 + 1] * 16  # the tail of the stream
    with pytest.raises(LeanLMError, match="too few"):
        pack(["abc"], Tok(), seq_len=16)


# ---------------------------------------------------------------- FSDP2 on 2 processes vs one
def _data(n=8, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in torch.randint(1, 64, (n, T), generator=g)]


def _loss(model, ids, labels):
    import torch.nn.functional as F

    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()), ids[:, 1:].numel()


def _train(optimizer, steps):
    torch.manual_seed(0)
    m = randomized(tiny_cfg())
    for p in m.parameters():
        p.requires_grad_(True)
    from leanlm.train import distributed

    distributed.shard(m)
    cfg = TrainConfig(max_steps=steps, batch_size=4, lr=0.5 if optimizer == "sgd" else 1e-2, optimizer=optimizer,
                      warmup_steps=0, max_grad_norm=None, progress=False, min_lr_ratio=1.0)
    res = train(m, _data(), cfg, loss_fn=_loss)
    return res.losses, {k: v.detach().clone() for k, v in distributed.full_state_dict(m).items()}


def _worker(rank, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        res = {opt: _train(opt, 3 if opt == "adamw" else 1) for opt in ("sgd", "adamw")}
        if rank == 0:
            torch.save({k: (v[0], v[1]) for k, v in res.items()}, out)
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_gloo_processes_follow_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two.pt"
    mp.spawn(_worker, args=(port, str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    for opt, steps in (("sgd", 1), ("adamw", 3)):
        losses, params = _train(opt, steps)
        l2, p2 = two[opt]
        assert l2 == pytest.approx(losses, abs=1e-5)
        for k in params:  # one SGD step at lr 0.5: equal parameters mean equal (averaged, not summed) gradients
            assert (p2[k] - params[k]).abs().max() < 1e-5, (opt, k)


# ---------------------------------------------------------------- CLI
def test_pretrain_cli_trains_saves_and_plots(tmp_path, default_model):
    import leanlm
    from leanlm.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "run"
    rc = main(["pretrain", "--model", "tiny", "--data", str(text), "--seq-len", "32", "--max-steps", "4",
               "--batch-size", "2", "--eval-every", "2", "--optimizer", "muon", "-o", str(out), "--json"])
    assert rc == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "eval_loss" in log[1]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    ck = json.loads((out / "step-0000004" / "state.json").read_text())  # the last step's sharded checkpoint
    assert ck["format"] == "leanlm-sharded-1" and ck["world_size"] == 1 and ck["step"] == 4
    model, _ = leanlm.load(out / "model")
    assert model.config.hidden_size == 128
    with pytest.raises(SystemExit):
        main(["pretrain", "--model", "tiny", "--optimizer", "nope", "-o", str(out)])
    assert main(["pretrain", "--model", "huge", "--data", str(text), "-o", str(out)]) == 2


# ---------------------------------------------------------------- sparse upcycling
def test_upcycled_moe_keeps_the_function_and_loads_in_transformers(tmp_path, default_model):
    import transformers

    import leanlm
    from leanlm.train.pretrain import upcycle_moe

    dense = randomized(tiny_cfg(attention_bias=False, attention_out_bias=False, mlp_bias=False))
    moe = upcycle_moe(dense, num_experts=4, top_k=2)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ref = dense(ids)
        assert (moe(ids) - ref).abs().max() < 1e-5
        assert moe.config.model_type == "mixtral" and len(moe.model.layers[0].mlp.experts) == 4
        leanlm.save(moe, default_model[1], tmp_path / "moe")
        back, _ = leanlm.load(tmp_path / "moe")
        assert (back(ids) - ref).abs().max() < 1e-5
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
        assert (hf(ids).logits - ref).abs().max() < 1e-4  # an independent reading of the saved MoE
    with pytest.raises(LeanLMError, match="already a mixture"):
        upcycle_moe(moe)


def test_load_balancing_loss_is_one_when_balanced_and_grows_when_skewed():
    from leanlm.train.pretrain import load_balancing_loss

    assert float(load_balancing_loss([torch.zeros(10, 4)], 2)) == pytest.approx(1.0)
    skew = torch.tensor([[20.0, 10.0, 0.0, 0.0]]).repeat(10, 1)  # every token: expert 0, then expert 1
    assert float(load_balancing_loss([skew], 2)) == pytest.approx(2.0, abs=1e-3)


def test_chunked_vocab_loss_equals_the_whole_loss_and_its_gradients():
    from leanlm.train.loop import causal_lm_loss

    m = randomized(tiny_cfg())
    ids = torch.randint(0, 64, (3, 20))
    labels = ids.clone()
    labels[0, :5] = -100
    grads = []
    for chunk in (4096, 7):  # 7 positions per chunk: 8 chunks, the last one short
        m.zero_grad()
        loss, n = causal_lm_loss(m, ids, labels, chunk=chunk)
        loss.backward()
        grads.append((float(loss), n, [p.grad.clone() for p in m.parameters()]))
    (l1, n1, g1), (l2, n2, g2) = grads
    assert n1 == n2 == 3 * 19 - 4 and l2 == pytest.approx(l1, rel=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


# ---------------------------------------------------------------- ReZero gates, muP learning rates
def test_rezero_starts_as_identity_blocks_trains_and_saves_a_plain_checkpoint(tmp_path, default_model):
    import leanlm
    from leanlm.model.layout import FINAL_NORM

    cfg = tiny_cfg(num_layers=3)
    m = new_model(cfg, "rezero", seed=3)
    assert m.config.residual_gates and len(m.residual_gates()) == 6
    assert all(float(g.detach()) == 0.0 for g in m.residual_gates())
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():  # every block is the identity: logits = head(norm(embedding))
        direct = m.logits(m.get_submodule(FINAL_NORM)(m.embed(ids)))
        assert torch.equal(m(ids), direct)
    for p in m.parameters():
        p.requires_grad_(True)
    data = _data(16, 12)
    cfg_t = TrainConfig(max_steps=12, batch_size=4, lr=1e-2, warmup_steps=0, progress=False)
    res = train(m, data, cfg_t, loss_fn=_loss)
    assert res.losses[-1] < res.losses[0] - 0.2
    assert all(float(g.detach()) != 0.0 for g in m.residual_gates())  # the gates learned
    with torch.no_grad():
        trained = m(ids)
        with pytest.raises(LeanLMError, match="fold_residual_gates"):
            leanlm.save(m, default_model[1], tmp_path / "unfolded")
        m.fold_residual_gates()
        assert not m.config.residual_gates and m.residual_gates() == []
        assert (m(ids) - trained).abs().max() < 1e-5  # folding keeps the function
        leanlm.save(m, default_model[1], tmp_path / "rz")
        back, _ = leanlm.load(tmp_path / "rz")
        assert (back(ids) - trained).abs().max() < 1e-5
        assert "residual_gates" not in (tmp_path / "rz" / "config.json").read_text()


@pytest.mark.parametrize("post_norms", [False, True])
def test_rezero_gates_fold_into_moe_experts_and_gemma_post_norms(post_norms):
    over = dict(model_type="gemma2", post_norms=True, norm_plus_one=True, hidden_act="gelu_pytorch_tanh",
                attention_bias=False, attention_out_bias=False, mlp_bias=False) if post_norms else dict(
        model_type="mixtral", num_experts=4, num_experts_per_tok=2, attention_bias=False, attention_out_bias=False,
        mlp_bias=False)
    m = randomized(tiny_cfg(residual_gates=True, **over), seed=5)  # randomized: gates away from 0 too
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ref = m(ids)
        m.fold_residual_gates()
        assert (m(ids) - ref).abs().max() < 1e-5


def test_mup_scales_hidden_matrices_only_and_the_sgd_step_follows():
    from leanlm.model.layout import EMBED
    from leanlm.train.pretrain import apply_mup

    m = randomized(tiny_cfg())
    for p in m.parameters():
        p.requires_grad_(True)
    scales = apply_mup(m, base_width=8)  # hidden 32: hidden matrices at lr / 4
    twod = {n for n, p in m.named_parameters() if p.dim() == 2}
    assert set(scales) == twod - {f"{EMBED}.weight"} and set(scales.values()) == {0.25}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    # the reference gradient, by hand on a copy
    import copy

    ref = copy.deepcopy(m)
    ids, labels = collate_rows(_data(4, 12))
    _loss(ref, ids, labels)[0].backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    train(m, _data(4, 12), TrainConfig(max_steps=1, batch_size=4, lr=0.1, optimizer="sgd", warmup_steps=0,
                                       max_grad_norm=None, progress=False), loss_fn=_loss)
    for n, p in m.named_parameters():
        lr = 0.1 * scales.get(n, 1.0)
        assert torch.allclose(p.detach(), before[n] - lr * grads[n], atol=1e-6), n


def collate_rows(rows):
    from leanlm.train.loop import collate

    return collate(rows, 0)


# ---------------------------------------------------------------- sharded checkpoints across world sizes
class _Crash(Exception):
    pass


def _train_ck(out, steps=4, crash_at=None, resume=False, fmt="sharded"):
    """A ReZero model (its [1]-shaped gates shard too) trained with AdamW under a cosine schedule, evaluated
    and checkpointed every 2 steps; crash_at: stop right after that step (after its checkpoint)."""
    torch.manual_seed(0)
    m = randomized(tiny_cfg(residual_gates=True))
    for p in m.parameters():
        p.requires_grad_(True)
    from leanlm.train import distributed

    distributed.shard(m)
    cfg = TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, warmup_steps=1, progress=False, save_every=2,
                      eval_every=2, checkpoint_format=fmt, out_dir=None if out is None else str(out))

    def cb(step, loss):
        if step == crash_at:
            raise _Crash()
    try:
        # an evaluation right before each save: FSDP2 leaves the root's parameters gathered after it
        return train(m, _data(), cfg, eval_data=_data(2, seed=1), loss_fn=_loss, resume=resume, callback=cb).losses
    except _Crash:
        return None


def _resume_worker(rank, port, two_save, one_save, plain_save, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _train_ck(two_save, crash_at=2)  # 2 processes save at step 2
        losses = _train_ck(one_save, resume=True)  # 2 processes resume what 1 process saved
        plain = _train_ck(plain_save, resume=True)  # ... and a one-process checkpoint of the plain format
        if rank == 0:
            out.write_text(json.dumps([losses, plain]))
    finally:
        dist.destroy_process_group()


def test_sharded_checkpoints_resume_at_another_world_size(tmp_path):
    from leanlm.train.checkpoint import latest_checkpoint, load_checkpoint

    whole = _train_ck(None)  # uninterrupted, one process
    one_save, two_save, out = tmp_path / "one", tmp_path / "two", tmp_path / "losses.json"
    assert _train_ck(one_save, crash_at=2) is None
    assert _train_ck(tmp_path / "plain", crash_at=2, fmt="plain") is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_resume_worker, args=(port, two_save, one_save, tmp_path / "plain", out), nprocs=2, join=True)
    ck = latest_checkpoint(two_save)
    manifest = json.loads((ck / "state.json").read_text())
    assert manifest["world_size"] == 2 and len(manifest["files"]) == 2  # each rank wrote its own shards
    assert not list(ck.rglob(".metadata"))  # no pickle in the folder
    two_to_one = _train_ck(two_save, resume=True)
    one_to_two, plain_to_two = json.loads(out.read_text())
    assert two_to_one == pytest.approx(whole[2:], abs=1e-5)
    assert one_to_two == pytest.approx(whole[2:], abs=1e-5)
    assert plain_to_two == pytest.approx(whole[2:], abs=1e-5)
    # a folder that is not leanlm's, or incomplete, is refused before anything is read
    m = randomized(tiny_cfg(residual_gates=True))
    opt = torch.optim.AdamW(m.parameters())
    (ck / "dcp" / manifest["files"][1]).unlink()
    with pytest.raises(LeanLMError, match="incomplete or not leanlm's"):
        load_checkpoint(ck, m, opt)
    (ck / "state.json").write_text(json.dumps({**manifest, "format": "dcp"}))
    with pytest.raises(LeanLMError, match="only checkpoints leanlm wrote"):
        load_checkpoint(ck, m, opt)
