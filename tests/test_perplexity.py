"""Sliding-window perplexity against transformers' own model run through the loop of the HF guide."""
import math

import pytest
import torch
import transformers

from leanlm.errors import LeanLMError
from leanlm.eval import perplexity, sliding_windows
from leanlm.model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    m = Transformer(ModelConfig.from_hf(hf.config.to_dict()))
    m.load_state_dict(hf.state_dict(), strict=False)
    return hf, m.eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(1))


def hf_guide_perplexity(model, input_ids, max_length, stride):
    """The loop of transformers' guide "Perplexity of fixed-length models", on a transformers model.

    One correction: the guide weights each window's mean loss by (targets - 1), which is right only
    when the window's first token is a target (the first window, or stride == max_length). Here the
    weight is the number of labels the loss really averaged: the targets after the internal shift.
    """
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        window = input_ids[:, begin_loc:end_loc]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=target_ids).loss
        n_loss = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * n_loss
        n_tokens += n_loss
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), nll_sum, n_tokens


@pytest.mark.parametrize("ctx, stride, n", [
    (64, 64, 300),   # stride == ctx: disjoint windows, each window's first token unscored
    (64, 16, 300),   # stride < ctx
    (64, 48, 250),   # last window shorter than ctx
    (100, 1, 130),   # stride 1: every window scores one token
    (256, 128, 90),  # text shorter than ctx: one window
])
def test_matches_transformers_guide(models, ids, ctx, stride, n):
    hf, m = models
    x = ids[:, :n]
    ref_ppl, ref_nll, ref_tokens = hf_guide_perplexity(hf, x, ctx, stride)
    out = perplexity(m, tokens=x[0], ctx=ctx, stride=stride, batch_size=4, progress=False)
    assert out["tokens"] == ref_tokens
    assert out["perplexity"] == pytest.approx(ref_ppl, rel=1e-4)
    assert out["nll"] == pytest.approx(ref_nll, rel=1e-4)
    # each token scored at most once; the first never; with stride < ctx every other token is scored
    expected = n - 1 if stride < ctx else n - len(sliding_windows(n, ctx, stride))
    assert out["tokens"] == expected
    assert out["bytes"] is None and out["bits_per_byte"] is None


def test_batching_and_fast_path_change_nothing(models, ids):
    hf, m = models
    x = ids[0, :257]
    base = perplexity(m, tokens=x, ctx=32, stride=8, batch_size=1, progress=False)
    for bs in (3, 8, 64):
        out = perplexity(m, tokens=x, ctx=32, stride=8, batch_size=bs, progress=True)
        assert out["tokens"] == base["tokens"]
        assert out["nll"] == pytest.approx(base["nll"], rel=1e-6)
    # the plain path (full logits from any module) agrees with the lm_head-on-targets-only path
    plain = perplexity(lambda_module(m), tokens=x, ctx=32, stride=8, batch_size=5, progress=False)
    assert plain["nll"] == pytest.approx(base["nll"], rel=1e-6)
    # and transformers' model itself, passed straight in
    direct = perplexity(hf, tokens=x, ctx=32, stride=8, batch_size=5, progress=False)
    assert direct["nll"] == pytest.approx(base["nll"], rel=1e-5)


def lambda_module(m):
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = m

        def forward(self, ids):
            return self.inner(ids)

    return Plain()


class ByteTok:
    """Token = UTF-8 byte + 1 (0 is BOS), within the tiny model's 128-token vocabulary for ASCII."""
    bos_id = 0

    def __init__(self, add_bos=False):
        self.add_bos = add_bos

    def encode(self, text, add_special=False):
        return ([0] if add_special and self.add_bos else []) + [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 1 for i in ids if i != 0).decode("utf-8")


def test_text_bits_per_byte_and_bos(models):
    hf, m = models
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 3
    tok = ByteTok()
    out = perplexity(m, tok, text, ctx=64, stride=32, progress=False)
    assert out["bytes"] == len(text.encode()) and out["tokens"] == len(text) - 1
    assert out["bits_per_byte"] == pytest.approx(out["nll"] / math.log(2) / out["bytes"], rel=1e-12)
    ids = torch.tensor([tok.encode(text)])
    ref_ppl, _, _ = hf_guide_perplexity(hf, ids, 64, 32)
    assert out["perplexity"] == pytest.approx(ref_ppl, rel=1e-4)
    # tokens given directly: bytes come from decoding them
    same = perplexity(m, tok, tokens=ids[0].tolist(), ctx=64, stride=32, progress=False)
    assert same["bytes"] == out["bytes"] and same["nll"] == pytest.approx(out["nll"], rel=1e-6)
    # BOS follows tokenizer.add_bos by default: then the text's first token is scored too
    with_bos = perplexity(m, ByteTok(add_bos=True), text, ctx=64, stride=32, progress=False)
    assert with_bos["tokens"] == len(text)
    ref_ppl, _, _ = hf_guide_perplexity(hf, torch.tensor([[0] + tok.encode(text)]), 64, 32)
    assert with_bos["perplexity"] == pytest.approx(ref_ppl, rel=1e-4)
    assert perplexity(m, ByteTok(add_bos=True), text, ctx=64, stride=32, add_bos=False,
                      progress=False)["tokens"] == len(text) - 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(ctx=16, stride=17), r"--stride must be between 1 and --ctx=16 \(got 17\)"),
    (dict(ctx=16, stride=0), r"--stride must be between 1 and --ctx=16 \(got 0\)"),
    (dict(ctx=1, stride=1), r"--ctx must be at least 2"),
    (dict(tokens=[5]), r"the text has 1 token\(s\); perplexity needs at least 2"),
    (dict(text=""), r"the text has 0 token\(s\)"),
    (dict(), r"perplexity needs a text or token ids"),
    (dict(text="abc", add_bos=True, tok=object), r"add_bos=True but the tokenizer has no BOS token"),
])
def test_errors(models, kwargs, message):
    _, m = models
    tok = kwargs.pop("tok", ByteTok)()
    if tok.__class__ is object:
        class NoBos:
            def encode(self, text, add_special=False):
                return list(text.encode())
        tok = NoBos()
    with pytest.raises(LeanLMError, match=message):
        perplexity(m, tok, progress=False, **kwargs)


@pytest.mark.slow
def test_default_model_matches_transformers_on_same_gguf():
    """The real default model: leanlm and transformers (loading the same GGUF) give the same perplexity."""
    import leanlm
    from leanlm.data import packaged_text

    model, tok = leanlm.load()
    text = packaged_text("eval")[:3000]
    ids = tok.encode(text, add_special=False)
    ours = perplexity(model, tok, text, ctx=256, stride=128, progress=False)
    assert ours["tokens"] == len(ids) - 1
    assert 5 < ours["perplexity"] < 60 and 0.5 < ours["bits_per_byte"] < 2
    src = model.source
    folder, name = src.rsplit("/", 1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ref_ppl, _, ref_tokens = hf_guide_perplexity(hf, torch.tensor([ids]), 256, 128)
    assert ref_tokens == ours["tokens"]
    assert ours["perplexity"] == pytest.approx(ref_ppl, rel=1e-3)
