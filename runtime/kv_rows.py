"""The rows of one shared LM cache: who owns which row, how many slots the cache holds, and the attention
mask of the batched decode call over it.

The cache is [layers, 2, rows, kv_heads, slots, head_dim] (the `backend.kv_cache` object). Every job owns
`rows_per_job` rows of it (VibeVoice: a positive and a negative CFG row); each row has its own next write
slot and says through its own mask row which slots it attends to, so rows admitted at different times share
one decode call. The decode call's `attention_mask` is `feed` [rows, slots + 1]: the mask of the cached slots
plus a last column of ones for the new input.

Buckets: rows and slots come in powers of two (`rows_for`, `bucket_slots`), so decode shapes repeat (a
TensorRT profile / CUDA graph per bucket). Freed rows are reused by the next admissions; `compact` moves the
live rows down to the bucket of the running jobs and cuts the slots when at most a quarter are in use or no
running job can reach the current bucket.

`PrefixCache` holds LM caches of prompt prefixes shared by many requests (a stored voice's), pinned or LRU.
"""

from __future__ import annotations

import collections

import numpy as np

from .kv_cache import bucket_slots

MIN_ROWS = 2


class PrefixCache:
    """LM caches of prompt prefixes: key -> new_kv [layers, 2, 1, kv_heads, positions, head_dim].

    Pinned entries (a stored voice's prefix, computed once when the voice is added) are never evicted; the
    other entries are LRU, evicted while the whole cache is over `max_bytes`."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = int(max_bytes)
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._pinned: set = set()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return item

    def put(self, key, kv, pin: bool = False) -> None:
        self._items[key] = kv
        self._items.move_to_end(key)
        if pin:
            self._pinned.add(key)
        while sum(_nbytes(v) for v in self._items.values()) > self.max_bytes:
            victim = next((k for k in self._items if k not in self._pinned and k != key), None)
            if victim is None:
                break
            del self._items[victim]

    def pin(self, key) -> None:
        """Keep `key` (when present) for good: it is no longer evicted."""
        if key in self._items:
            self._pinned.add(key)

    def unpin(self, key) -> None:
        self._pinned.discard(key)

    def discard(self, key) -> None:
        """Drop `key` (pinned or not) and its memory."""
        self._items.pop(key, None)
        self._pinned.discard(key)

    def pinned_keys(self) -> set:
        """The keys held for good now."""
        return {k for k in self._items if k in self._pinned}

    def nbytes(self, key) -> int:
        """Bytes of the cache held under `key` (0 when absent)."""
        item = self._items.get(key)
        return 0 if item is None else _nbytes(item)

    @property
    def pinned(self) -> int:
        return sum(1 for k in self._items if k in self._pinned)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self._pinned.clear()


def _nbytes(kv) -> int:
    return int(getattr(kv, "nbytes", 0) or (kv.numel() * kv.element_size()))


class KVRows:
    """One shared LM cache, its row owners and the attention feed of its decode call (module docstring)."""

    def __init__(self, backend, layers: int, kv_heads: int, head_dim: int, max_slots: int, rows_per_job: int = 2):
        self.backend = backend
        self.layers, self.kv_heads, self.head_dim = int(layers), int(kv_heads), int(head_dim)
        self.max_slots = int(max_slots)
        self.rows_per_job = int(rows_per_job)
        self.cache = None                        # backend.kv_cache object, None while no job holds rows
        self.feed: np.ndarray | None = None      # [rows, slots + 1] attention mask of the decode call
        self.mask: np.ndarray | None = None      # feed[:, :slots], a view: the mask of the cached slots
        self.owner: list = []                    # row -> the job holding it, or None
        self._rows_of: dict = {}                 # job -> its rows, in order

    # --- what the rows hold ---------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, slots) of the cache buffer now ((0, 0) while empty)."""
        if self.cache is None:
            return 0, 0
        return len(self.owner), int(self.cache.data.shape[4])

    def rows(self, job) -> tuple[int, ...]:
        return self._rows_of[job]

    def rows_for(self, jobs: int) -> int:
        """The rows bucket of `jobs` jobs: the next power of two of rows_per_job x jobs (at least MIN_ROWS)."""
        return max(MIN_ROWS, 1 << (self.rows_per_job * max(jobs, 1) - 1).bit_length())

    def free_rows(self) -> int:
        return sum(owner is None for owner in self.owner)

    def empty_past(self) -> np.ndarray:
        """A past_kv of no positions, for a call that starts a row from nothing."""
        return np.zeros((self.layers, 2, 1, self.kv_heads, 0, self.head_dim), dtype=np.float32)

    # --- taking and giving back rows ------------------------------------------------------------------

    def take(self, job, running: int, slots: int) -> tuple[int, ...]:
        """Rows for `job` (beside `running` jobs), in a cache of at least `slots` slots; their masks empty."""
        if self.free_rows() < self.rows_per_job or self.cache is None:
            rows = self.rows_for(running + 1)
            self._resize(rows, max(slots, self.shape[1]))
            self.owner += [None] * (rows - len(self.owner))
        elif slots > self.shape[1]:
            self.past(slots)
        taken = tuple([r for r, owner in enumerate(self.owner) if owner is None][: self.rows_per_job])
        for r in taken:
            self.owner[r] = job
            self.mask[r] = 0
        self._rows_of[job] = taken
        return taken

    def free(self, job) -> None:
        for r in self._rows_of.pop(job, ()):
            if 0 <= r < len(self.owner) and self.owner[r] is job:
                self.owner[r] = None
                self.mask[r] = 0

    def holds(self, job) -> bool:
        return job in self._rows_of

    def compact(self, need_slots: int, reach_slots: int) -> None:
        """Move to a smaller bucket: rows to the bucket of the live rows whenever it is smaller; slots when at
        most a quarter are in use (`need_slots`: the highest slot any live row writes next, plus one) or when no
        running job can reach the current bucket (`reach_slots`: the most slots any of them can need)."""
        if self.cache is None:
            return
        rows, slots = self.shape
        used = [r for r, owner in enumerate(self.owner) if owner is not None]
        if not used:
            self.cache, self.feed, self.mask, self.owner, self._rows_of = None, None, None, [], {}
            return
        reach = bucket_slots(max(reach_slots, need_slots), self.max_slots)
        want_rows = min(rows, max(MIN_ROWS, 1 << (len(used) - 1).bit_length()))
        want_slots = (bucket_slots(need_slots, self.max_slots) if 4 * need_slots <= slots or reach < slots
                      else slots)
        if want_rows >= rows and want_slots >= slots:
            return
        moves = list(zip(used, range(len(used)))) if want_rows < rows else [(r, r) for r in used]
        where = dict(moves)
        owners = [None] * want_rows
        for src, dst in moves:
            owners[dst] = self.owner[src]
        self._rows_of = {job: tuple(where[r] for r in taken) for job, taken in self._rows_of.items()}
        self._resize(want_rows, want_slots, moves)
        self.owner = owners

    # --- the cache buffer -----------------------------------------------------------------------------

    def past(self, top: int):
        """The cache buffer as past_kv, with room to write slot `top`; keeps feed/mask in step with it."""
        before = int(self.cache.data.shape[4])
        past = self.cache.past(top)
        have = int(past.shape[4])
        if have != before:
            feed = np.zeros((self.feed.shape[0], have + 1), dtype=np.int64)
            feed[:, :before] = self.feed[:, :before]
            feed[:, have] = 1
            self.feed, self.mask = feed, feed[:, :have]
        return past

    def decode(self, graph: str, rows: np.ndarray, slots: np.ndarray, positions: np.ndarray, embeds: list,
               hidden_size: int, **feeds) -> dict:
        """ONE call of `graph` (seq 1) over the whole cache: row rows[i] takes embeds[i] at positions[i] and
        writes its new key/value into slots[i] (then attends it); the rows not listed get a zero input that
        nothing reads. `feeds`: the graph's other inputs. Returns the graph's outputs."""
        past = self.past(int(slots.max()))
        count = len(self.owner)
        inputs = np.zeros((count, 1, hidden_size), dtype=np.float32)
        position_ids = np.zeros((count, 1), dtype=np.int64)
        inputs[rows, 0] = embeds
        position_ids[rows, 0] = positions
        out = self.backend.run(graph, {"inputs_embeds": inputs, "attention_mask": self.feed,
                                       "position_ids": position_ids, "past_kv": past, **feeds})
        self.write_rows(out["new_kv"], rows, slots)
        self.mask[rows, slots] = 1
        return out

    def run_rows(self, graph: str, rows, slots, embeds: list, hidden_size: int, **feeds) -> dict:
        """ONE call of `graph` over the listed rows alone (their cached slots copied, each masked to its own):
        row rows[i] takes embeds[i] ([n, H]) at positions slots[i]..slots[i]+n-1 and writes their keys/values
        there. The call's seq is the largest n; a row of fewer gets zero inputs after its own, which nothing it
        returns reads (causal attention). `feeds`: the graph's other inputs, in the order of `rows`; so are
        the outputs. The result depends on these rows only, never on the rest of the cache: a job's own call
        is the same batched or alone."""
        embeds = [np.asarray(e, dtype=np.float32).reshape(-1, hidden_size) for e in embeds]
        counts = [len(e) for e in embeds]
        seq, top = max(counts), int(max(slots))
        self.past(max(int(s) + n - 1 for s, n in zip(slots, counts)))   # room for every write
        inputs = np.zeros((len(rows), seq, hidden_size), dtype=np.float32)
        position_ids = np.zeros((len(rows), seq), dtype=np.int64)
        for i, (slot, embed) in enumerate(zip(slots, embeds)):
            inputs[i, :len(embed)] = embed
            # (the zero inputs after a row's own repeat its last position: any position in the RoPE table would do)
            position_ids[i] = slot + np.minimum(np.arange(seq), len(embed) - 1)
        mask = np.concatenate([self.mask[list(rows), :top], np.ones((len(rows), seq), dtype=np.int64)], axis=1)
        out = self.backend.run(graph, {"inputs_embeds": inputs, "attention_mask": mask, "position_ids": position_ids,
                                       "past_kv": self.row_past(rows, top), **feeds})
        for i, (row, slot, n) in enumerate(zip(rows, slots, counts)):
            self.write(int(row), int(slot), out["new_kv"][:, :, i:i + 1, :, :n])
            self.mask[row, slot:slot + n] = 1
        return out

    def write(self, row: int, slot: int, new_kv) -> None:
        """new_kv [layers, 2, 1, kv_heads, seq, head_dim] into `row`, slots slot..slot+seq-1."""
        self.cache.write(slice(row, row + 1), slot, new_kv)

    def write_rows(self, new_kv, rows: np.ndarray, slots: np.ndarray) -> None:
        """new_kv [layers, 2, R, kv_heads, 1, head_dim] of a decode call: row r's key/value into its own slot."""
        self.cache.write_rows(new_kv, rows, slots)

    def row_past(self, rows, length: int):
        """The first `length` slots of `rows` [layers, 2, len(rows), kv_heads, length, head_dim], contiguous, for
        a call of those rows alone (host or device, as the cache is)."""
        rows = [int(r) for r in rows]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            part = self.cache.data[:, :, rows[0]:rows[0] + len(rows), :, :length]
        else:
            part = self.cache.data[:, :, rows, :, :length]   # (one index list among slices: the axis stays put)
        return part.contiguous() if hasattr(part, "contiguous") else np.ascontiguousarray(part)

    def _resize(self, rows: int, slots: int, moves: list[tuple[int, int]] | None = None) -> None:
        """A cache of `rows` rows and at least `slots` slots holding the live rows (moved by `moves`)."""
        old, old_feed = self.cache, self.feed
        new = self.backend.kv_cache((self.layers, 2, rows, self.kv_heads, self.max_slots, self.head_dim))
        new.reserve(slots)
        have = int(new.data.shape[4])
        feed = np.zeros((rows, have + 1), dtype=np.int64)
        feed[:, have] = 1
        if old is not None:
            keep = min(have, int(old.data.shape[4]))
            pairs = moves if moves is not None else [(r, r) for r in range(min(rows, len(self.owner)))]
            for src, dst in pairs:
                new.write(slice(dst, dst + 1), 0, old.data[:, :, src:src + 1, :, :keep])
                feed[dst, :keep] = old_feed[src, :keep]
        self.cache, self.feed = new, feed
        self.mask = feed[:, :have]
