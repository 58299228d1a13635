"""Attention that reads the paged pool through the block tables: each sequence against its own blocks.

The dense path (PagedKVCache(attention="dense")) gathers every sequence's keys and values into one
[B, L_max] tensor per layer, padding each decode row to the longest context, and runs a mixed
prefill/decode step as one row with a block-diagonal mask over the whole batch (T_total x L_total
scores). Here a step is cut into units, planned once per step and layer group, run per layer:

  * a unit is a few sequences with the same number of new tokens (1 for a decode, n for a prefill
    chunk or a speculative verify) and lengths within an eighth (or one block) of each other, so the
    padding is bounded and attention costs each sequence about its own context;
  * its keys and values are read with one index_select over whole blocks (block ids from the tables,
    so prefix blocks shared by several sequences are read where they lie), or, when a lone sequence's
    blocks are consecutive in the pool, as a view with no copy at all;
  * a unit holds at most `max_keys` keys, so what it reads stays in cache between the gather and
    SDPA: on CPU this beats one batched gather even when every row has the same length.

Masks are built only where needed: ragged lengths in a unit, a prefill chunk after cached context
(causal with an offset), a sliding window reaching into the first block read.
"""
from __future__ import annotations

import torch

from leanlm.model.transformer import attention

MAX_KEYS = 2048  # keys per unit (rows x padded length): K and V of one layer of the default model in ~3 MB


def plan_units(entries: list[tuple[list[int], int, int, list[int]]], block_size: int, window: int | None,
               max_keys: int = MAX_KEYS) -> list[dict]:
    """entries: per sequence (query flat indices, context before the step, new tokens, block table).
    Returns the units of one layer group under one attention window (see the module docstring)."""
    bs = block_size
    rows = []
    for qidx, c, n, table in entries:
        end = c + n
        first = 0 if window is None else max(0, c - window + 1) // bs  # the first block any query sees
        last = -(-end // bs)
        blocks = table[first:last]
        assert all(b >= 0 for b in blocks), "a block behind the window was asked for"
        rows.append(dict(q=qidx, c=c, n=n, start=first * bs, L=end - first * bs, blocks=blocks))
    units = []
    by_n: dict[int, list[dict]] = {}
    for r in rows:
        by_n.setdefault(r["n"], []).append(r)
    for n, group in by_n.items():
        group.sort(key=lambda r: -r["L"])
        i = 0
        while i < len(group):
            top = group[i]["L"]
            j = i + 1
            while (j < len(group) and (j - i + 1) * top <= max_keys
                   and top - group[j]["L"] <= max(bs, top // 8)):
                j += 1
            units.append(_unit(group[i:j], n, bs, window))
            i = j
    return units


def _unit(rows: list[dict], n: int, bs: int, window: int | None) -> dict:
    G, L = len(rows), rows[0]["L"]
    nb = -(-L // bs)
    flat = [i for r in rows for i in r["q"]]
    q = torch.tensor(flat, dtype=torch.long)
    ordered = flat == list(range(flat[0], flat[0] + len(flat)))
    u = dict(G=G, n=n, L=L, q=q, ordered=ordered, span=None, blocks=None, mask=None)
    tab = rows[0]["blocks"]
    if G == 1 and all(b == tab[0] + i for i, b in enumerate(tab)):
        u["span"] = tab[0] * bs  # consecutive blocks: a view of the pool
    else:
        # pad short rows with their own first block (read, then masked out)
        u["blocks"] = torch.tensor([r["blocks"] + [r["blocks"][0]] * (nb - len(r["blocks"])) for r in rows],
                                   dtype=torch.long).view(-1)
    ragged = any(r["L"] != L for r in rows)
    windowed = window is not None and any(r["c"] + r["n"] - r["start"] > window for r in rows)
    if n == 1 and not ragged and not windowed:
        return u  # each row's one query sees every key read
    if G == 1 and rows[0]["c"] == 0 and rows[0]["start"] == 0 and not windowed:
        u["mask"] = "causal"  # a prompt's first chunk: keys == queries
        return u
    k_pos = torch.tensor([r["start"] for r in rows])[:, None] + torch.arange(L)[None]  # [G, L]
    q_pos = torch.tensor([r["c"] for r in rows])[:, None] + torch.arange(n)[None]  # [G, n]
    k_end = torch.tensor([r["c"] + r["n"] for r in rows])[:, None]
    m = (k_pos < k_end)[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        m = m & (q_pos[:, :, None] - k_pos[:, None, :] < window)
    u["mask"] = m[:, None]  # [G, 1, n, L]
    return u


def units_to(units: list[dict], device) -> list[dict]:
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in u.items()} for u in units]


def attend_units(units: list[dict], q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, block_size: int,
                 scale: float | None, softcap: float | None) -> torch.Tensor:
    """q [B, H, T, D] (the step's queries; B*T flat indices are the units' `q`), pk/pv the layer's pool
    [slots, Hkv, D] -> attention output [B, H, T, D] (queries in no unit, padding, get zeros)."""
    B, H, T, D = q.shape
    Hkv = pk.shape[1]
    u0 = units[0] if len(units) == 1 else None
    if u0 is not None and u0["G"] == B and u0["n"] == T and u0["ordered"]:
        flat = None  # one unit over every query in order (a uniform decode batch, one prompt): no reordering
    else:
        flat = q.transpose(1, 2).reshape(B * T, H, D)
        out = q.new_zeros(B * T, H, D)
    kb, vb = pk.view(-1, block_size, Hkv, D), pv.view(-1, block_size, Hkv, D)
    for u in units:
        G, n, L = u["G"], u["n"], u["L"]
        if u["span"] is not None:
            k = pk.narrow(0, u["span"], L).view(1, L, Hkv, D).transpose(1, 2)
            v = pv.narrow(0, u["span"], L).view(1, L, Hkv, D).transpose(1, 2)
        else:
            k = kb.index_select(0, u["blocks"]).view(G, -1, Hkv, D)[:, :L].transpose(1, 2)
            v = vb.index_select(0, u["blocks"]).view(G, -1, Hkv, D)[:, :L].transpose(1, 2)
        if flat is None:
            return attention(q, k, v, u["mask"], scale, softcap)
        qu = flat.index_select(0, u["q"]).view(G, n, H, D).transpose(1, 2)
        y = attention(qu, k, v, u["mask"], scale, softcap)
        out.index_copy_(0, u["q"], y.transpose(1, 2).reshape(G * n, H, D))
    return out.view(B, T, H, D).transpose(1, 2)

