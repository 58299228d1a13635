"""LoRA / DoRA / (IA)3 on MoE experts and routers, and on Phi-3's fused linears, against HF peft.

transformers 5 holds Phi-3's q/k/v and gate/up fused (qkv_proj, gate_up_proj) and MoE experts as two
3-D parameters per block (peft 0.21 adapts those with target_parameters); leanlm holds ordinary
linears. Adapters move across both ways with the same logits (leanlm.peft.hf_map)."""
import copy
import json
import re

import peft
import pytest
import torch
import torch.nn.functional as F

from conftest import save_tiny_tokenizer, tiny_hf, tiny_moe, to_leanlm
from leanlm.errors import LeanLMError
from leanlm.model.layout import layout_of, target_linears
from leanlm.peft import IA3Linear, LoraLinear, apply, load_adapter, merge, save_adapter, unmerge

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
KINDS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def randomize(model, seed=7):
    """Adapters start as the identity (peft's B is zero too): give every adapter tensor a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in ("lora_", "ia3_l")):
                p.add_(torch.randn(p.shape, generator=g) * (0.3 if "ia3" in n or "magnitude" in n else 0.1))


def logits(m):
    with torch.no_grad():
        out = m(input_ids=IDS) if isinstance(m, peft.PeftModel) else m(IDS)
    return getattr(out, "logits", out)


def adapted(m):
    return {n for n, mod in m.named_modules() if isinstance(mod, (LoraLinear, IA3Linear))}


@pytest.fixture(scope="module", params=KINDS)
def moe(request):
    hf = tiny_moe(request.param)
    return hf, to_leanlm(hf)


# ---------------------------------------------------------------- target words

def load_peft_adapter(pm, hf, base, folder):
    """Randomize peft's adapter, save it, load it into a copy of leanlm's base: its logits must equal peft's
    (and differ from the bare model's, so the adapter is not a no-op)."""
    randomize(pm)
    pm.eval()
    pm.save_pretrained(str(folder))
    m = load_adapter(copy.deepcopy(base), folder).eval()
    ref = logits(pm)
    assert (ref - logits(hf)).abs().max() > 1e-2
    torch.testing.assert_close(logits(m), ref, atol=1e-4, rtol=1e-4)
    return m

def test_target_words_name_experts_router_and_shared_expert():
    m = to_leanlm(tiny_moe("qwen2_moe"))  # layers 0 and 2 MoE (4 experts + shared expert), layer 1 dense
    lay, cfg = layout_of(m), m.config
    experts = target_linears(m, "experts")
    assert len(experts) == 2 * 4 * 3 and all(f".{lay.experts}." in n for n in experts)
    assert target_linears(m, "experts.down") == [n for n in experts if n.endswith(lay.down)]
    router = target_linears(m, "router")
    assert len(router) == 4 and set(router) == {f"model.layers.{i}.{n}" for i in (0, 2)
                                                for n in lay.groups(cfg, i)["router"]}
    shared = target_linears(m, "shared_expert.down")
    assert len(shared) == 2 and all(f".{lay.shared_expert}." in n for n in shared)
    mlp = target_linears(m, "mlp")  # every MLP linear: experts, shared experts, the dense layer's MLP
    assert set(experts) | set(target_linears(m, "shared_expert")) < set(mlp) and not set(router) & set(mlp)
    assert target_linears(m, "q_proj") is None  # not a word: a module name, peft's suffix rule
    a = apply(copy.deepcopy(m), "lora", r=2, target_modules=["experts.down", "router", lay.leaf("q")])
    assert adapted(a) == set(target_linears(m, "experts.down")) | set(router) | set(target_linears(m, "attn_in")[::3])
    with pytest.raises(LeanLMError, match="names no linear"):
        apply(to_leanlm(tiny_hf("llama")), "lora", target_modules=["experts"])


# ---------------------------------------------------------------- leanlm on MoE: every method
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_moe_adapters_change_train_merge_and_round_trip(moe, method, tmp_path):
    hf, base = moe
    targets = ["experts", "router"]
    m = apply(copy.deepcopy(base), method, target_modules=targets, **({} if method == "ia3" else {"r": 2}))
    assert adapted(m) == set(target_linears(m, "experts")) | set(target_linears(m, "router"))
    if method == "ia3":  # the experts' down projections scale their input (peft's feed-forward rule)
        lay = layout_of(m)
        assert all(m.get_submodule(n).is_feedforward == n.endswith(lay.down) for n in adapted(m))

    # training lowers the loss (the adapters start as the identity)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(11))
    params = [p for p in m.parameters() if p.requires_grad]
    assert params and all(any(k in n for k in ("lora_", "ia3_l")) for n, p in m.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(params, lr=3e-2)
    m.train()
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0], losses

    m.eval()
    randomize(m)
    ref = logits(m)
    assert (ref - logits(base)).abs().max() > 1e-2  # the adapters change the output
    merge(m)
    torch.testing.assert_close(logits(m), ref, atol=1e-4, rtol=1e-4)  # merged == unmerged
    unmerge(m)
    torch.testing.assert_close(logits(m), ref, atol=1e-5, rtol=1e-5)

    if method == "lora":
        save_adapter(m, tmp_path / "ad")
    else:  # peft cannot hold DoRA / (IA)3 on transformers' fused expert parameters: saved in leanlm's names
        with pytest.warns(UserWarning, match="peft"):
            save_adapter(m, tmp_path / "ad")
    back = load_adapter(copy.deepcopy(base), tmp_path / "ad").eval()
    assert adapted(back) == adapted(m)
    torch.testing.assert_close(logits(back), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- MoE against peft
def test_moe_peft_adapter_loads_in_leanlm(moe, tmp_path):
    """peft on transformers' fused experts (target_parameters: one A per expert shared by gate and up) and
    on the router's bare weight, plus attention -> leanlm's per-expert linears, same logits."""
    hf, base = moe
    lay = layout_of(base)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=[lay.leaf("q"), lay.leaf("o")],
        target_parameters=[f"{lay.mlp}.{lay.experts}.gate_up_proj", f"{lay.mlp}.{lay.experts}.down_proj",
                           f"{lay.mlp}.{lay.router}.weight"], rank_pattern={"down_proj": 3}))
    m = load_peft_adapter(pm, hf, base, tmp_path / "ad")
    experts = set(target_linears(m, "experts"))
    routers = {n for n in target_linears(m, "router") if n.endswith(f"{lay.mlp}.{lay.router}")}
    assert experts | routers <= adapted(m)
    assert {m.get_submodule(n).r for n in experts if n.endswith(lay.down)} == {3}


@pytest.mark.parametrize("case", ["words", "partial-rslora"])
def test_moe_leanlm_adapter_loads_in_peft(moe, case, tmp_path):
    hf, base = moe
    lay = layout_of(base)
    if case == "words":
        opts = dict(r=2, alpha=4, target_modules=["attention", "experts", "router"])
    else:  # two experts' down projections of one block, one at another rank: zero experts, mixed scalings
        e0, e2 = (f"model.layers.0.{lay.mlp}.{lay.experts}.{e}.{lay.down}" for e in (0, 2))
        opts = dict(r=2, alpha=5, use_rslora=True, target_modules=[e0, e2, lay.leaf("v")],
                    rank_pattern={re.escape(e2): 4}, dropout=0.1)
    m = apply(copy.deepcopy(base), "lora", **opts)
    randomize(m)
    m.eval()
    ref = logits(m)
    save_adapter(m, tmp_path / "ad")
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["target_parameters"] and all(re.search(r"\.(gate_up_proj|down_proj|weight)$", t)
                                             for t in conf["target_parameters"])
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ad")).eval()
    assert (ref - logits(hf)).abs().max() > 1e-2
    torch.testing.assert_close(logits(pm), ref, atol=1e-4, rtol=1e-4)
    back = load_adapter(copy.deepcopy(base), tmp_path / "ad").eval()  # and back into leanlm
    torch.testing.assert_close(logits(back), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- Phi-3's fused qkv_proj / gate_up_proj
@pytest.fixture(scope="module")
def phi3():
    hf = tiny_hf("phi3")
    return hf, to_leanlm(hf)


PHI3_PEFT = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj", "o_proj", "down_proj"]),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, use_rslora=True,
                                    target_modules=["qkv_proj", "gate_up_proj"], rank_pattern={"gate_up_proj": 2}),
    "ia3": lambda: peft.IA3Config(target_modules=["qkv_proj", "gate_up_proj", "down_proj"],
                                  feedforward_modules=["gate_up_proj"]),
}


@pytest.mark.parametrize("case", list(PHI3_PEFT))
def test_phi3_peft_adapter_loads_in_leanlm_and_saves_back_unchanged(phi3, case, tmp_path):
    """A fused adapter splits exactly (shared A, B / magnitude / scale split by rows) and fuses back to
    the same tensors: equal A's are recognised, so the rank stays r."""
    from safetensors.torch import load_file

    hf, base = phi3
    pm = peft.get_peft_model(copy.deepcopy(hf), PHI3_PEFT[case]())
    m = load_peft_adapter(pm, hf, base, tmp_path / "p")
    lay = layout_of(m)
    assert {lay.q, lay.k, lay.v} <= {n.split(".", 3)[3] for n in adapted(m)}  # split onto leanlm's linears
    save_adapter(m, tmp_path / "l")
    ours, theirs = load_file(str(tmp_path / "l" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "p" / "adapter_model.safetensors"))
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0)
    got = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "l")).eval()
    torch.testing.assert_close(logits(got), logits(pm), atol=1e-4, rtol=1e-4)


PHI3_LEANLM = {
    "lora-all-linear": ("lora", dict(r=4, alpha=8)),  # every linear: rank concatenation on qkv and gate_up
    "dora-some-parts": ("dora", dict(r=3, alpha=8, target_modules=["q_proj", "up_proj", "o_proj"])),
    "rslora-ranks": ("lora", dict(r=2, alpha=3, use_rslora=True, target_modules=["k_proj", "v_proj", "gate_proj"],
                                  rank_pattern={"v_proj": 5})),
    "ia3": ("ia3", dict()),  # k, v (output scale) and down (input scale)
}


@pytest.mark.parametrize("case", list(PHI3_LEANLM))
def test_phi3_leanlm_adapter_loads_in_peft(phi3, case, tmp_path):
    hf, base = phi3
    method, opts = PHI3_LEANLM[case]
    m = apply(copy.deepcopy(base), method, **opts)
    randomize(m)
    m.eval()
    ref = logits(m)
    save_adapter(m, tmp_path / "ad")
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert not any(re.search(r"\.(q|k|v|gate|up)_proj$", t) for t in conf["target_modules"])
    if case == "lora-all-linear":  # A stacked, B block-diagonal: ranks 3r and 2r
        assert sorted(set(conf["rank_pattern"].values())) == [8, 12]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ad")).eval()
    assert (ref - logits(hf)).abs().max() > 1e-2
    torch.testing.assert_close(logits(pm), ref, atol=1e-4, rtol=1e-4)
    back = load_adapter(copy.deepcopy(base), tmp_path / "ad").eval()
    torch.testing.assert_close(logits(back), ref, atol=1e-4, rtol=1e-4)


def test_phi3_partial_feedforward_ia3_is_refused_for_peft(phi3, tmp_path):
    """(IA)3 scaling only the gate projection's input cannot be one scale on gate_up_proj's input."""
    hf, base = phi3
    m = apply(copy.deepcopy(base), "ia3", target_modules=["gate_proj"], feedforward_modules=["gate_proj"])
    randomize(m)
    with pytest.warns(UserWarning, match="gate_up_proj.*one scale"):
        save_adapter(m, tmp_path / "ad")
    back = load_adapter(copy.deepcopy(base), tmp_path / "ad").eval()
    torch.testing.assert_close(logits(back), logits(m.eval()), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the command
def test_finetune_cli_on_moe_experts(tmp_path, capsys):
    import leanlm
    from leanlm.cli import main

    base = to_leanlm(tiny_moe("qwen3_moe"))
    leanlm.save(base, None, tmp_path / "m")
    save_tiny_tokenizer(tmp_path / "m")
    (tmp_path / "d.txt").write_text(" ".join(str(i % 50 + 3) for i in range(600)))
    rc = main(["finetune", str(tmp_path / "m"), "--method", "lora", "--targets", "experts,router",
               "--data", str(tmp_path / "d.txt"), "--max-len", "32", "--max-steps", "6", "--batch-size", "4",
               "--lr", "1e-2", "--warmup", "0", "--threads", "1", "--json", "-o", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["eval_loss_after"] < res["eval_loss_before"]
    conf = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert conf["target_modules"] == [] and len(conf["target_parameters"]) == 3 * base.config.num_layers
    m = load_adapter(leanlm.load(str(tmp_path / "m"))[0], tmp_path / "out" / "adapter")
    assert adapted(m) == set(target_linears(base, "experts")) | set(target_linears(base, "router"))
