"""Attention over the block tables (PagedKVCache(attention="blocks")) gives the logits of the dense path
and of the plain forward without a cache: decode rows of different lengths, chunked prefill after cached
context, mixed prefill/decode steps, k+1-token verify chunks, shared prefix blocks, sliding windows
(trimmed and not), Gemma's local/global layers with soft-capping, and GQA."""
import random

import pytest
import torch

from conftest import tiny_hf, to_leanlm
from leanlm.infer.engine import Engine, SamplingParams
from leanlm.infer.paged import PagedKVCache
from leanlm.infer.paged_attention import plan_units

BS = 4
MODELS = {  # GQA everywhere (4 query heads over 2 KV heads)
    "llama": ("llama", dict(max_position_embeddings=512)),
    "mistral": ("mistral", dict(sliding_window=6, max_position_embeddings=512)),
    "gemma2": ("gemma2", dict(max_position_embeddings=512, attn_logit_softcapping=3.0)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    kind, kw = MODELS[request.param]
    return to_leanlm(tiny_hf(kind, **kw))


def tokens(k, lo, hi, seed):
    rng = random.Random(seed)
    return [[rng.randrange(128) for _ in range(rng.randint(lo, hi))] for _ in range(k)]


# Each step: {sequence: new tokens}. Prefill chunks next to decodes (mixed), ragged decodes, 3-token
# verify-like chunks, a long chunk past the window, sequences joining late.
SCHEDULE = [{0: 9, 1: 3}, {0: 1, 1: 1}, {0: 5, 1: 1, 2: 13}, {0: 1, 1: 1, 2: 1}, {0: 3, 1: 3, 2: 3, 3: 2},
            {0: 1, 1: 1, 2: 1, 3: 1}, {3: 17, 0: 1}, {0: 1, 1: 1, 2: 1, 3: 1}, {1: 12, 2: 1},
            {0: 40, 1: 40, 2: 40, 3: 40}]  # the rest of every sequence


def run(model, seqs, attention, trim=True, shared=0):
    """Drive a PagedKVCache through SCHEDULE; returns {seq: {position: logits}}. shared: sequence 1 starts
    on sequence 0's first `shared` tokens (prefix blocks registered by 0, looked up by 1)."""
    cache = PagedKVCache(model.config, num_blocks=96, block_size=BS, trim_windows=trim, attention=attention)
    done, out = {}, {i: {} for i in range(len(seqs))}
    keys = [("block", i) for i in range(shared // BS)]
    steps = ([{0: shared}] if shared else []) + SCHEDULE
    for step in steps:
        batch = []
        for s, n in step.items():
            if s not in done:
                done[s] = cache.add_sequence(s, keys if s == 1 and shared else [])
                assert done[s] == (shared if s == 1 else 0)
            n = min(n, len(seqs[s]) - done[s])
            if n:
                cache.ensure(s, done[s] + n)
                batch.append((s, n))
        layout = "rows" if all(n == 1 for _, n in batch) else "packed"
        B, T = cache.prepare(batch, layout)
        if layout == "packed":
            ids = torch.tensor([t for s, n in batch for t in seqs[s][done[s]:done[s] + n]])[None]
        else:
            ids = torch.tensor([[seqs[s][done[s]]] for s, _ in batch])
        logits = model(ids, cache=cache).reshape(B * T, -1)
        off = 0
        for i, (s, n) in enumerate(batch):
            rows = logits[off:off + n] if layout == "packed" else logits[i * T:i * T + n]
            for j in range(n):
                out[s][done[s] + j] = rows[j]
            off += n
            done[s] += n
        if shared and step is steps[0]:
            for i, k in enumerate(keys):
                cache.register(0, i, k)
    return out


@pytest.mark.parametrize("trim", [True, False])
@pytest.mark.parametrize("shared", [0, 12])
@torch.inference_mode()
def test_blocks_equal_dense_and_plain_forward(model, trim, shared):
    seqs = tokens(4, 30, 34, seed=1)
    if shared:
        seqs[1][:shared] = seqs[0][:shared]
    blocks = run(model, seqs, "blocks", trim, shared)
    dense = run(model, seqs, "dense", trim, shared)
    checked = 0
    for s, p in enumerate(seqs):
        full = model(torch.tensor([p]))[0]
        for pos, row in blocks[s].items():
            torch.testing.assert_close(row, dense[s][pos], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(row, full[pos], atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked == sum(len(p) for p in seqs) - shared


@torch.inference_mode()
def test_rows_layout_with_padded_queries(model):
    """The rows layout with several new tokens per row (right-padded queries) through attend()."""
    seqs = tokens(2, 6, 6, seed=2)
    cache = PagedKVCache(model.config, num_blocks=16, block_size=BS)
    for i, p in enumerate(seqs):
        cache.add_sequence(i)
        cache.ensure(i, len(p))
    cache.prepare([(0, 6), (1, 2)], "rows")
    out = model(torch.tensor([seqs[0], seqs[1][:2] + [0] * 4]), cache=cache)
    torch.testing.assert_close(out[0], model(torch.tensor([seqs[0]]))[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1, :2], model(torch.tensor([seqs[1][:2]]))[0], atol=1e-4, rtol=1e-4)


def test_units_read_each_sequence_own_context():
    """One long sequence among short ones: no unit pads a short row to the long one; every row's blocks
    are its own table's, and the keys read stay within an eighth (or a block) of each row's context."""
    bs, rng = 16, random.Random(3)
    ctx = [2000] + [rng.randint(10, 300) for _ in range(15)]
    tables = [list(range(1000 * i, 1000 * i + -(-(c + 1) // bs))) for i, c in enumerate(ctx)]
    tables[5][:3] = tables[0][:3]  # a shared prefix block
    entries = [([i], c, 1, t) for i, (c, t) in enumerate(zip(ctx, tables))]
    units = plan_units(entries, bs, None)
    seen = []
    for u in units:
        rows = u["q"].tolist()
        seen += rows
        for j, r in enumerate(rows):
            L = ctx[r] + 1
            assert L <= u["L"] <= max(L + bs, L * 8 // 7 + 1)
            if u["blocks"] is not None:
                nb = -(-u["L"] // bs)
                got = u["blocks"].view(u["G"], nb)[j].tolist()
                assert got[:-(-L // bs)] == tables[r]
                assert set(got) <= set(tables[r])
    assert sorted(seen) == list(range(16))
    assert sum(u["G"] * u["L"] for u in units) <= 1.2 * sum(c + 1 for c in ctx)
    assert sum(u["G"] * u["L"] for u in units) < 0.2 * 16 * 2001  # the dense path's padded read


def test_bad_attention_name(model):
    with pytest.raises(ValueError, match="paged attention"):
        PagedKVCache(model.config, num_blocks=4, attention="flex")


def test_engine_dense_and_blocks_give_the_same_tokens(model):
    ps = tokens(6, 3, 40, seed=4)
    got = {a: Engine(model, block_size=BS, num_blocks=200, max_batch_tokens=24, max_num_seqs=6,
                     attention=a).generate(ps, SamplingParams(max_tokens=12)) for a in ("blocks", "dense")}
    assert got["blocks"] == got["dense"]
