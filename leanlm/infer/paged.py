"""Paged KV cache (vLLM's PagedAttention layout, in plain torch).

One preallocated pool per layer holds fixed-size blocks of `block_size` token slots; each sequence
owns a block table (list of block ids), so memory is allocated per block instead of per
max-length row and blocks can be shared between sequences with the same prefix (prefix caching).

A forward step over several sequences at once is described by `prepare(batch)`, a list of
(seq_id, num_new_tokens) pairs. Two layouts:
  * "rows": input [B, Tmax], one row per sequence, right-padded (cheapest when every row decodes
    one token: attention reads max(L) keys per row);
  * "packed": input [1, sum T], all new tokens of all sequences in one row with a block-diagonal
    causal mask (no padding in the linear layers: chunked prefill mixed with decodes).
Then the model's forward calls begin/update/end like on any cache (DEVELOPERS.md, Style 2).

Attention: `attention="blocks"` (the default) has each layer's attention call `attend`, which reads
every sequence's keys and values through its block table, a few sequences of similar length at a time
(leanlm/infer/paged_attention.py): cost per sequence is its own context, with no padding to the
longest row and no mask over the whole batch. `attention="dense"` is the older path: `update` gathers
every sequence's K/V into one padded tensor and the step's mask covers the whole batch.

Sliding windows: layers are grouped by window, and each group keeps its own pool, allocator and block
table per sequence. Global layers keep every block; local layers (Gemma's sliding layers, every layer of
a Mistral-style window) keep only the blocks a query can still see (the window plus the block it starts
in, plus the step's new tokens): older blocks go back to the pool before the sequence's next step. The
tables keep one entry per block of the sequence, -1 where a block was dropped behind the window.
"""
from __future__ import annotations

from collections import OrderedDict, deque

import torch

from leanlm.infer.paged_attention import attend_units, plan_units, units_to
from leanlm.model.config import ModelConfig

ATTENTION = ("blocks", "dense")


class OutOfBlocks(Exception):
    """No free or evictable block left (the scheduler preempts a sequence and retries)."""


class BlockAllocator:
    """Free list + reference counts + content-hash table with LRU eviction of unreferenced blocks.

    A block is in exactly one of: referenced (ref > 0), `free` (no content worth keeping), or
    `evictable` (ref == 0 but its content hash is registered, kept for prefix hits until needed).
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.ref = [0] * num_blocks
        self.key_of: list[object | None] = [None] * num_blocks
        self.table: dict[object, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # oldest first

    def num_available(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int:
        if self.free:
            b = self.free.popleft()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)  # least recently used
            del self.table[self.key_of[b]]
            self.key_of[b] = None
        else:
            raise OutOfBlocks()
        self.ref[b] = 1
        return b

    def release(self, b: int) -> None:
        assert self.ref[b] > 0, f"block {b} released twice"
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.key_of[b] is not None:
                self.evictable[b] = None  # most recently used end
            else:
                self.free.append(b)

    def holds(self, key) -> bool:
        return key in self.table

    def lookup(self, key) -> int | None:
        """Take a reference on the block holding `key`, or None."""
        b = self.table.get(key)
        if b is None:
            return None
        if self.ref[b] == 0:
            del self.evictable[b]
        self.ref[b] += 1
        return b

    def register(self, b: int, key) -> None:
        """Record that block b (full, computed) holds `key`; first writer wins on duplicates."""
        if key not in self.table and self.key_of[b] is None:
            self.table[key] = b
            self.key_of[b] = key

    def check_whole(self) -> None:
        """Raise AssertionError unless no block is referenced and every block is free or evictable."""
        assert all(r == 0 for r in self.ref), "blocks still referenced"
        assert len(self.free) + len(self.evictable) == self.num_blocks, "blocks leaked"
        assert len(set(self.free)) == len(self.free), "block on the free list twice"
        assert not (set(self.free) & set(self.evictable)), "block both free and evictable"
        assert len(self.table) == sum(k is not None for k in self.key_of)


class LayerGroup:
    """The layers sharing one block table per sequence: the global ones (window None: every block kept)
    or the local ones (a sliding window: blocks behind it are released)."""

    def __init__(self, window: int | None, layers: list[int], num_blocks: int, block_size: int):
        self.window, self.layers, self.block_size = window, layers, block_size
        self.alloc = BlockAllocator(num_blocks)
        self.tables: dict[object, list[int]] = {}  # -1: a block dropped behind the window

    def first_block(self, pos: int) -> int:
        """The first block that a query at `pos` (or any later one) attends to."""
        if self.window is None:
            return 0
        return max(0, pos - self.window + 1) // self.block_size

    def max_blocks(self, num_tokens: int, chunk: int) -> int:
        """The most blocks a sequence of num_tokens holds at once when it runs chunk tokens per step."""
        full = -(-num_tokens // self.block_size)
        if self.window is None:
            return full
        return min(full, -(-(self.window - 1 + chunk) // self.block_size) + 1)

    def held(self, seq_id) -> list[int]:
        return [b for b in self.tables[seq_id] if b >= 0]


class PagedKVCache:
    """Block-pooled K/V for many sequences, implementing the model's cache protocol.

    `local_blocks`: the pool size of the local (sliding-window) layers (None: num_blocks).
    `trim_windows=False` keeps every block of the local layers too (their window only masks).
    `attention`: "blocks" (each sequence against its own blocks) or "dense" (one padded gather per layer)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16,
                 dtype=torch.float32, device="cpu", local_blocks: int | None = None, trim_windows: bool = True,
                 attention: str = "blocks"):
        if attention not in ATTENTION:
            raise ValueError(f"paged attention {attention!r}: expected one of {', '.join(ATTENTION)}")
        self.cfg, self.block_size = cfg, block_size
        self.blockwise = attention == "blocks"  # the attention layers call attend() instead of update()
        windows = [cfg.window(i) if trim_windows else None for i in range(cfg.num_layers)]
        self.groups: list[LayerGroup] = []
        for w in dict.fromkeys(windows):
            n = num_blocks if w is None or local_blocks is None else local_blocks
            self.groups.append(LayerGroup(w, [i for i, x in enumerate(windows) if x == w], n, block_size))
        self.group_of_layer = [next(g for g in self.groups if i in g.layers) for i in range(cfg.num_layers)]
        # the group whose step description serves the mask of a layer window
        self.group_of_window = {cfg.window(i): self.group_of_layer[i] for i in range(cfg.num_layers)}
        # the group that bounds a sequence's length: the global layers when there are any
        self.primary = next((g for g in self.groups if g.window is None), self.groups[0])
        self.k, self.v = [], []
        for i in range(cfg.num_layers):
            nkv, n = cfg.heads(i)[1], self.group_of_layer[i].alloc.num_blocks * block_size
            self.k.append(torch.zeros(n, nkv, cfg.head_dim, dtype=dtype, device=device))
            self.v.append(torch.zeros(n, nkv, cfg.head_dim, dtype=dtype, device=device))
        self.device = device
        self.lengths: dict[object, int] = {}  # tokens whose K/V are written
        self._step = None

    @property
    def alloc(self) -> BlockAllocator:
        return self.primary.alloc

    @property
    def tables(self) -> dict[object, list[int]]:
        return self.primary.tables

    @property
    def num_blocks(self) -> int:
        return self.primary.alloc.num_blocks

    def check_whole(self) -> None:
        """Every group's blocks free or evictable, no sequence left."""
        for g in self.groups:
            g.alloc.check_whole()
            assert not g.tables, "sequences left"

    def kv_bytes(self, seq_id) -> int:
        """Bytes of K/V that a sequence holds (its referenced blocks, every layer)."""
        out = 0
        for g in self.groups:
            per_block = sum(self.k[i][0].nbytes + self.v[i][0].nbytes for i in g.layers) * self.block_size
            out += len(g.held(seq_id)) * per_block
        return out

    # ---- block tables -------------------------------------------------------------------------
    def add_sequence(self, seq_id, keys: list = ()) -> int:
        """Start a sequence. `keys`: the content keys of its first full blocks (prefix caching); it starts
        on the longest prefix of them that every group still holds (local layers need only the blocks their
        window sees from there). Returns the number of tokens cached."""
        n = len(keys)
        ok = [True] * (n + 1)
        for g in self.groups:
            run = 0  # cached blocks in a row ending at block j - 1
            for j in range(1, n + 1):
                run = run + 1 if g.alloc.holds(keys[j - 1]) else 0
                ok[j] = ok[j] and run >= j - g.first_block(j * self.block_size)
        h = max(j for j in range(n + 1) if ok[j])
        for g in self.groups:
            lo = g.first_block(h * self.block_size)
            g.tables[seq_id] = [-1] * lo + [g.alloc.lookup(k) for k in keys[lo:h]]
        self.lengths[seq_id] = h * self.block_size
        return h * self.block_size

    def register(self, seq_id, i: int, key) -> None:
        """Record that block i of a sequence (full, computed) holds `key`, in every group still holding it."""
        for g in self.groups:
            b = g.tables[seq_id][i]
            if b >= 0:
                g.alloc.register(b, key)

    def blocks_for(self, num_tokens: int, chunk: int) -> list[int]:
        """Per group, the most blocks a sequence of num_tokens holds when run chunk tokens per step."""
        return [g.max_blocks(num_tokens, chunk) for g in self.groups]

    def ensure(self, seq_id, num_tokens: int) -> None:
        """Drop the blocks that the sequence's next tokens cannot see (local layers), then allocate blocks
        so that seq_id can hold num_tokens tokens (all or nothing)."""
        start = self.lengths[seq_id]
        for g in self.groups:
            table = g.tables[seq_id]
            for i in range(min(g.first_block(start), len(table))):
                if table[i] >= 0:
                    g.alloc.release(table[i])
                    table[i] = -1
        need = [max(0, -(-num_tokens // self.block_size) - len(g.tables[seq_id])) for g in self.groups]
        if any(n > g.alloc.num_available() for g, n in zip(self.groups, need)):
            raise OutOfBlocks()
        for g, n in zip(self.groups, need):
            g.tables[seq_id].extend(g.alloc.allocate() for _ in range(n))

    def truncate(self, seq_id, num_tokens: int) -> None:
        """Keep only a sequence's first num_tokens tokens (speculative decoding's rejected drafts): its length
        is cut and the blocks past the new end go back to the pool. Those blocks were never registered (only
        full blocks of kept tokens are), so nothing of the prefix cache is lost."""
        if num_tokens > self.lengths[seq_id]:
            raise ValueError(f"sequence {seq_id!r} holds {self.lengths[seq_id]} tokens, cannot keep {num_tokens}")
        keep = -(-num_tokens // self.block_size)
        for g in self.groups:
            table = g.tables[seq_id]
            while len(table) > keep:
                b = table.pop()
                if b >= 0:
                    g.alloc.release(b)
        self.lengths[seq_id] = num_tokens

    def free_sequence(self, seq_id) -> None:
        # Release the tail first so that, among equally old blocks, prefix blocks are evicted last.
        for g in self.groups:
            for b in reversed(g.tables.pop(seq_id, [])):
                if b >= 0:
                    g.alloc.release(b)
        self.lengths.pop(seq_id, None)

    def write_kv(self, seq_id, start: int, end: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Write fixed K/V for positions [start, end) of a sequence (prefix tuning's virtual tokens):
        keys[layer] / values[layer] are [n, kv_heads, head_dim] for positions 0..n-1."""
        if self.lengths[seq_id] != start:
            raise ValueError(f"sequence {seq_id!r} holds {self.lengths[seq_id]} tokens, not {start}")
        slots = {id(g): self._slots(g, seq_id, start, end).to(self.device) for g in self.groups}
        for layer, (k, v) in enumerate(zip(keys, values)):
            s = slots[id(self.group_of_layer[layer])]
            self.k[layer][s] = k[start:end].to(self.k[layer].dtype)
            self.v[layer][s] = v[start:end].to(self.v[layer].dtype)
        self.lengths[seq_id] = end

    def reset(self) -> None:
        """Every block free, no sequence (the prefix cache is dropped too)."""
        for g in self.groups:
            g.alloc = BlockAllocator(g.alloc.num_blocks)
            g.tables.clear()
        self.lengths.clear()
        self._step = None

    def cancel_step(self) -> None:
        """Forget a prepared step whose forward raised (nothing advanced)."""
        self._step = None

    def _slots(self, g: LayerGroup, seq_id, start: int, end: int) -> torch.Tensor:
        table = torch.tensor(g.tables[seq_id], dtype=torch.long)
        pos = torch.arange(start, end)
        blocks = table[pos // self.block_size]
        assert bool((blocks >= 0).all()), "a slot behind the window was asked for"
        return blocks * self.block_size + pos % self.block_size

    # ---- one forward step ---------------------------------------------------------------------
    def prepare(self, batch: list[tuple[object, int]], layout: str = "packed") -> tuple[int, int]:
        """Describe the next forward: batch = [(seq_id, num_new)]; returns the input shape (B, T)."""
        ctx = [self.lengths[s] for s, _ in batch]
        news = [n for _, n in batch]
        for (s, n), c in zip(batch, ctx):
            if len(self.primary.tables[s]) * self.block_size < c + n:
                raise ValueError(f"sequence {s!r} has blocks for fewer than {c + n} tokens; call ensure() first")
        if layout not in ("packed", "rows"):
            raise ValueError(f"unknown layout {layout!r}")
        if layout == "packed":
            q_pos = torch.cat([torch.arange(c, c + n) for n, c in zip(news, ctx)])
            q_seq = torch.cat([torch.full((n,), i) for i, n in enumerate(news)])
            self._step = dict(layout=layout, batch=batch, T=len(q_pos), positions=q_pos.unsqueeze(0),
                              q_pos=q_pos[:, None], q_seq=q_seq[:, None])
        else:
            T = max(news)
            q_valid = torch.zeros(len(batch), T, dtype=torch.bool)
            for i, n in enumerate(news):
                q_valid[i, :n] = True
            q_pos = torch.tensor(ctx)[:, None] + torch.arange(T)[None]  # padded queries get harmless positions
            self._step = dict(layout=layout, batch=batch, T=T, positions=q_pos, q_valid=q_valid,
                              q_pos=q_pos[:, :, None])
        if self.blockwise:
            self._step["groups"] = {id(g): self._describe_blocks(g, batch, ctx, layout) for g in self.groups}
            self._step["units"] = {}
        else:
            self._step["groups"] = {id(g): self._describe(g, batch, ctx, layout) for g in self.groups}
        self._to_device()
        return (1, len(self._step["positions"][0])) if layout == "packed" else (len(batch), self._step["T"])

    def _describe(self, g: LayerGroup, batch, ctx: list[int], layout: str) -> dict:
        """One group's part of a step: the slots written, the slots read (from the first block its window
        sees) and the positions of the keys read."""
        firsts = [g.first_block(c) * self.block_size for c in ctx]
        write = torch.cat([self._slots(g, s, c, c + n) for (s, n), c in zip(batch, ctx)])
        if layout == "packed":
            spans = [(f, c + n) for (_, n), c, f in zip(batch, ctx, firsts)]
            read = torch.cat([self._slots(g, s, a, b) for (s, _), (a, b) in zip(batch, spans)])
            k_pos = torch.cat([torch.arange(a, b) for a, b in spans])
            k_seq = torch.cat([torch.full((b - a,), i) for i, (a, b) in enumerate(spans)])
            return dict(write=write, read=read, k_pos=k_pos[None], k_seq=k_seq[None])
        B, L = len(batch), max(c + n - f for (_, n), c, f in zip(batch, ctx, firsts))
        read = torch.zeros(B, L, dtype=torch.long)
        k_pos = torch.zeros(B, L, dtype=torch.long)
        k_valid = torch.zeros(B, L, dtype=torch.bool)
        for i, ((s, n), c, f) in enumerate(zip(batch, ctx, firsts)):
            read[i, : c + n - f] = self._slots(g, s, f, c + n)
            k_pos[i, : c + n - f] = torch.arange(f, c + n)
            k_valid[i, : c + n - f] = True
        uniform = self._step["T"] == 1 and all(f == 0 and c + n == L for (_, n), c, f in zip(batch, ctx, firsts))
        return dict(write=write, read=read, k_pos=k_pos[:, None], k_valid=k_valid, uniform=uniform)

    def _describe_blocks(self, g: LayerGroup, batch, ctx: list[int], layout: str) -> dict:
        """The blockwise path's part of a step: the slots written, and per sequence what plan_units takes."""
        write = torch.cat([self._slots(g, s, c, c + n) for (s, n), c in zip(batch, ctx)])
        entries, off = [], 0
        T = self._step["T"]
        for i, ((s, n), c) in enumerate(zip(batch, ctx)):
            q = list(range(off, off + n)) if layout == "packed" else list(range(i * T, i * T + n))
            entries.append((q, c, n, g.tables[s]))
            off += n
        return dict(write=write, entries=entries)

    def _units(self, g: LayerGroup, window: int | None) -> list[dict]:
        """The step's attention units for the layers of group g under a window (planned once per step)."""
        st = self._step
        key = (id(g), window)
        units = st["units"].get(key)
        if units is None:
            units = plan_units(st["groups"][id(g)]["entries"], self.block_size, window)
            if str(self.device) != "cpu":
                units = units_to(units, self.device)
            st["units"][key] = units
        return units

    def _to_device(self) -> None:
        if str(self.device) != "cpu":
            def move(d):
                return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}
            self._step = {**move(self._step), "groups": {k: move(v) for k, v in self._step["groups"].items()}}

    def begin(self, T: int, positions, window: int | None):
        st = self._step
        if st is None or T != st["T"]:
            raise ValueError("PagedKVCache.begin: call prepare() with this step's batch first")
        return st["positions"], self.window_mask(window)

    def attend(self, layer: int, q, k, v, scale: float | None = None, softcap: float | None = None):
        """Write this step's K/V of a layer and return its attention output [B, H, T, D] for queries q
        [B, H, T, D], each sequence against its own blocks (the blockwise path's update + attention)."""
        g = self.group_of_layer[layer]
        self._write(layer, k, v)
        units = self._units(g, self.cfg.window(layer))
        return attend_units(units, q, self.k[layer], self.v[layer], self.block_size, scale, softcap)

    def window_mask(self, window: int | None):
        """This step's mask for the layers of a window (begin's, or another layer type's: Gemma's local and
        global layers), over the keys their group reads."""
        st = self._step
        if self.blockwise:
            return None  # attend() masks each unit itself
        gd = st["groups"][id(self.group_of_window[window])]
        q_pos, k_pos = st["q_pos"], gd["k_pos"]
        if st["layout"] == "packed":
            m = (st["q_seq"] == gd["k_seq"]) & (k_pos <= q_pos)
            if window is not None:
                m = m & (q_pos - k_pos < window)
            return m[None, None]
        if gd["uniform"] and (window is None or k_pos.shape[-1] <= window):
            return None  # every row decodes one token over its whole history
        m = gd["k_valid"][:, None, :] & (k_pos <= q_pos)
        if window is not None:
            m = m & (q_pos - k_pos < window)
        # padded queries attend to the first key read only, so no row of the softmax is empty (no NaN)
        first = torch.arange(k_pos.shape[-1], device=k_pos.device) == 0
        m = m | (~st["q_valid"][:, :, None] & first)
        return m[:, None]

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's new K/V of a layer in its slots."""
        st = self._step
        w = st["groups"][id(self.group_of_layer[layer])]["write"]
        if st["layout"] == "packed":  # k [1, nkv, N, D]
            self.k[layer][w] = k[0].transpose(0, 1)
            self.v[layer][w] = v[0].transpose(0, 1)
            return
        B, H, T, D = k.shape  # k [B, nkv, T, D]
        if T == 1:
            self.k[layer][w] = k.reshape(B, H, D)
            self.v[layer][w] = v.reshape(B, H, D)
            return
        qv = st["q_valid"].reshape(-1)
        self.k[layer][w] = k.transpose(1, 2).reshape(B * T, H, D)[qv]
        self.v[layer][w] = v.transpose(1, 2).reshape(B * T, H, D)[qv]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        st = self._step
        if self.blockwise:
            raise ValueError("PagedKVCache(attention='blocks') is read through attend(), not update()")
        gd = st["groups"][id(self.group_of_layer[layer])]
        pk, pv = self.k[layer], self.v[layer]
        self._write(layer, k, v)
        if st["layout"] == "packed":
            # index_select is ~2x faster than advanced indexing for this gather on CPU
            r = gd["read"]
            return pk.index_select(0, r).transpose(0, 1)[None], pv.index_select(0, r).transpose(0, 1)[None]
        H, D = k.shape[1], k.shape[3]
        flat = gd["read"].view(-1)
        shape = (*gd["read"].shape, H, D)
        return (pk.index_select(0, flat).view(shape).transpose(1, 2),
                pv.index_select(0, flat).view(shape).transpose(1, 2))

    def end(self):
        for s, n in self._step["batch"]:
            self.lengths[s] += n
        self._step = None

    def query_index(self) -> torch.Tensor:
        """Flat index (into the [B*T] outputs of the step just prepared) of each sequence's last new token."""
        st = self._step
        news = [n for _, n in st["batch"]]
        if st["layout"] == "packed":
            return torch.tensor(news).cumsum(0) - 1
        return torch.arange(len(news)) * st["T"] + torch.tensor(news) - 1
