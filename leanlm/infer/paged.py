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
"""
from __future__ import annotations

from collections import OrderedDict, deque

import torch

from leanlm.model.config import ModelConfig


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


class PagedKVCache:
    """Block-pooled K/V for many sequences, implementing the model's cache protocol."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16,
                 dtype=torch.float32, device="cpu"):
        self.cfg, self.block_size, self.num_blocks = cfg, block_size, num_blocks
        n = num_blocks * block_size
        self.k, self.v = [], []
        for i in range(cfg.num_layers):
            nkv = cfg.heads(i)[1]
            self.k.append(torch.zeros(n, nkv, cfg.head_dim, dtype=dtype, device=device))
            self.v.append(torch.zeros(n, nkv, cfg.head_dim, dtype=dtype, device=device))
        self.device = device
        self.alloc = BlockAllocator(num_blocks)
        self.tables: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}  # tokens whose K/V are written
        self._step = None

    # ---- block tables -------------------------------------------------------------------------
    def add_sequence(self, seq_id, shared_blocks: list[int] = (), num_cached: int = 0) -> None:
        """Start a sequence; `shared_blocks` (already referenced) hold its first num_cached tokens."""
        self.tables[seq_id] = list(shared_blocks)
        self.lengths[seq_id] = num_cached

    def blocks_needed(self, seq_id, num_tokens: int) -> int:
        have = len(self.tables[seq_id])
        need = -(-num_tokens // self.block_size)
        return max(0, need - have)

    def ensure(self, seq_id, num_tokens: int) -> None:
        """Allocate blocks so that seq_id can hold num_tokens tokens (all or nothing)."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > self.alloc.num_available():
            raise OutOfBlocks()
        self.tables[seq_id].extend(self.alloc.allocate() for _ in range(need))

    def free_sequence(self, seq_id) -> None:
        # Release the tail first so that, among equally old blocks, prefix blocks are evicted last.
        for b in reversed(self.tables.pop(seq_id, [])):
            self.alloc.release(b)
        self.lengths.pop(seq_id, None)

    def write_kv(self, seq_id, start: int, end: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Write fixed K/V for positions [start, end) of a sequence (prefix tuning's virtual tokens):
        keys[layer] / values[layer] are [n, kv_heads, head_dim] for positions 0..n-1."""
        if self.lengths[seq_id] != start:
            raise ValueError(f"sequence {seq_id!r} holds {self.lengths[seq_id]} tokens, not {start}")
        slots = self._slots(seq_id, start, end).to(self.device)
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.k[layer][slots] = k[start:end].to(self.k[layer].dtype)
            self.v[layer][slots] = v[start:end].to(self.v[layer].dtype)
        self.lengths[seq_id] = end

    def reset(self) -> None:
        """Every block free, no sequence (the prefix cache is dropped too)."""
        self.alloc = BlockAllocator(self.num_blocks)
        self.tables.clear()
        self.lengths.clear()
        self._step = None

    def cancel_step(self) -> None:
        """Forget a prepared step whose forward raised (nothing advanced)."""
        self._step = None

    def _slots(self, seq_id, start: int, end: int) -> torch.Tensor:
        table = torch.tensor(self.tables[seq_id], dtype=torch.long)
        pos = torch.arange(start, end)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    # ---- one forward step ---------------------------------------------------------------------
    def prepare(self, batch: list[tuple[object, int]], layout: str = "packed") -> tuple[int, int]:
        """Describe the next forward: batch = [(seq_id, num_new)]; returns the input shape (B, T)."""
        ctx = [self.lengths[s] for s, _ in batch]
        news = [n for _, n in batch]
        for (s, n), c in zip(batch, ctx):
            if len(self.tables[s]) * self.block_size < c + n:
                raise ValueError(f"sequence {s!r} has blocks for fewer than {c + n} tokens; call ensure() first")
        if layout == "packed":
            write = torch.cat([self._slots(s, c, c + n) for (s, n), c in zip(batch, ctx)])
            read = torch.cat([self._slots(s, 0, c + n) for (s, n), c in zip(batch, ctx)])
            q_pos = torch.cat([torch.arange(c, c + n) for n, c in zip(news, ctx)])
            q_seq = torch.cat([torch.full((n,), i) for i, n in enumerate(news)])
            k_pos = torch.cat([torch.arange(c + n) for n, c in zip(news, ctx)])
            k_seq = torch.cat([torch.full((c + n,), i) for i, (n, c) in enumerate(zip(news, ctx))])
            self._step = dict(layout=layout, batch=batch, T=len(q_pos), write=write, read=read,
                              positions=q_pos.unsqueeze(0), q_pos=q_pos[:, None], k_pos=k_pos[None],
                              same=(q_seq[:, None] == k_seq[None]))
            self._to_device()
            return 1, len(q_pos)
        if layout != "rows":
            raise ValueError(f"unknown layout {layout!r}")
        B, T = len(batch), max(news)
        L = max(c + n for n, c in zip(news, ctx))
        read = torch.zeros(B, L, dtype=torch.long)
        k_valid = torch.zeros(B, L, dtype=torch.bool)
        q_valid = torch.zeros(B, T, dtype=torch.bool)
        writes = []
        for i, ((s, n), c) in enumerate(zip(batch, ctx)):
            read[i, : c + n] = self._slots(s, 0, c + n)
            k_valid[i, : c + n] = True
            q_valid[i, :n] = True
            writes.append(read[i, c: c + n])
        start = torch.tensor(ctx)[:, None]
        q_pos = start + torch.arange(T)[None]  # padded queries get harmless positions
        self._step = dict(layout=layout, batch=batch, T=T, write=torch.cat(writes), read=read,
                          positions=q_pos, q_valid=q_valid, k_valid=k_valid, q_pos=q_pos[:, :, None],
                          k_pos=torch.arange(L)[None, None], uniform=(T == 1 and all(
                              c + n == L for n, c in zip(news, ctx))))
        self._to_device()
        return B, T

    def _to_device(self) -> None:
        if str(self.device) != "cpu":
            self._step = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in self._step.items()}

    def begin(self, T: int, positions, window: int | None):
        st = self._step
        if st is None or T != st["T"]:
            raise ValueError("PagedKVCache.begin: call prepare() with this step's batch first")
        return st["positions"], self.window_mask(window)

    def window_mask(self, window: int | None):
        """This step's mask for a window (begin's, or another layer type's: Gemma's local and global layers)."""
        st = self._step
        q_pos, k_pos = st["q_pos"], st["k_pos"]
        if st["layout"] == "packed":
            m = st["same"] & (k_pos <= q_pos)
            if window is not None:
                m = m & (q_pos - k_pos < window)
            return m[None, None]
        if st["uniform"] and (window is None or k_pos.shape[-1] <= window):
            return None  # every row decodes one token over its whole history
        m = st["k_valid"][:, None, :] & (k_pos <= q_pos)
        if window is not None:
            m = m & (q_pos - k_pos < window)
        # padded queries attend to key 0 only, so no row of the softmax is empty (no NaN)
        m = m | (~st["q_valid"][:, :, None] & (k_pos == 0))
        return m[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        st = self._step
        pk, pv = self.k[layer], self.v[layer]
        if st["layout"] == "packed":  # k [1, nkv, N, D]
            pk[st["write"]] = k[0].transpose(0, 1)
            pv[st["write"]] = v[0].transpose(0, 1)
            # index_select is ~2x faster than advanced indexing for this gather on CPU
            r = st["read"]
            return pk.index_select(0, r).transpose(0, 1)[None], pv.index_select(0, r).transpose(0, 1)[None]
        qv = st["q_valid"].reshape(-1)  # k [B, nkv, T, D]
        B, H, T, D = k.shape
        pk[st["write"]] = k.transpose(1, 2).reshape(B * T, H, D)[qv]
        pv[st["write"]] = v.transpose(1, 2).reshape(B * T, H, D)[qv]
        flat = st["read"].view(-1)
        shape = (*st["read"].shape, H, D)
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
