"""The LM's key/value cache as the generation loop holds it, on the host or on a device.

The cache is a tensor [L, 2, rows, KV, slots, D] (layers, key/value, batch rows, kv heads, positions,
head dim). Its slot axis grows by power-of-two buckets (`bucket_slots`) up to the capacity
``shape[4]``, so the graphs see a handful of `past_kv` shapes (fixed shapes for TensorRT profiles and
CUDA graphs) and the buffer is reallocated only a few times per generation; between growths every
call gets the very same buffer, never a copy.

    kv = backend.kv_cache(shape)        # a KVCache of the backend's storage
    kv.reserve(slots)                   # at least `slots` slots
    kv.past(n)                          # the whole buffer, at least n + 1 slots (past_kv; the caller masks n..)
    kv.write(rows, start, new_kv)       # new_kv [L, 2, rows, KV, seq, D] into slots start..start+seq-1
    kv.write_rows(new_kv, rows, slots)  # a decode step's new_kv [L, 2, R, KV, 1, D]: row r into slot s
    kv.data                             # the buffer itself

`KVCache` holds the bucket and growth rules; a storage differs only in how it allocates, converts a
written value and scopes its operations: `HostKVCache` (numpy, the ONNX Runtime backend's default) and
`TorchKVCache` (a torch tensor on a device; the TensorRT backend's `DeviceKVCache` adds its stream and
tells the backend when the buffer moves). torch is imported only when a `TorchKVCache` is created.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .errors import RuntimeInputError

MIN_SLOTS = 64  # the smallest bucket: short prompts share one past_kv shape


def bucket_slots(n: int, max_slots: int, minimum: int = MIN_SLOTS) -> int:
    """Cache slots to hold n: the next power of two (at least `minimum`), capped at `max_slots`."""
    if n > max_slots:
        raise RuntimeInputError(f"the LM cache needs {n} slots but holds at most {max_slots}")
    return min(max_slots, max(minimum, 1 << max(n - 1, 0).bit_length()))


class KVCache:
    """The LM cache [L, 2, rows, KV, slots, D], its slots grown by `bucket_slots` up to shape[4].

    Subclasses give the storage: `_zeros(slots)` (a zeroed buffer of that many slots), `_convert(value)`
    (a written value as the buffer's kind of array), `_index(ints)` (an index array for it),
    `_rows_first(values)` (axis 2 moved to the front) and optionally `_scope()` (the context every
    operation on the buffer runs in) and `_hold(buffer)` (take a new buffer).
    """

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(int(d) for d in shape)
        self.data = None
        self._hold(self._zeros(bucket_slots(1, self.shape[4])))

    # --- storage ------------------------------------------------------------------------------

    def _zeros(self, slots: int):
        raise NotImplementedError

    def _convert(self, value):
        raise NotImplementedError

    def _index(self, ints: np.ndarray):
        raise NotImplementedError

    def _rows_first(self, values):
        raise NotImplementedError

    def _scope(self):
        return contextlib.nullcontext()

    def _hold(self, data) -> None:
        self.data = data

    def _with_slots(self, slots: int) -> tuple[int, ...]:
        return self.shape[:4] + (slots,) + self.shape[5:]

    # --- the interface the loop uses ----------------------------------------------------------

    @property
    def slots(self) -> int:
        """Slots the buffer holds now (its current bucket)."""
        return int(self.data.shape[4])

    def reserve(self, n: int) -> None:
        """Grow to the bucket that holds `n` slots (content kept); nothing when it holds them already."""
        if n > self.slots:
            grown = self._zeros(bucket_slots(n, self.shape[4]))
            with self._scope():
                grown[:, :, :, :, : self.slots] = self.data
            self._hold(grown)

    def write(self, rows: slice, start: int, new_kv) -> None:
        """new_kv [L, 2, rows, KV, seq, D] (rows may broadcast from 1) into slots start..start+seq-1."""
        seq = int(new_kv.shape[4])
        self.reserve(start + seq)
        with self._scope():
            self.data[:, :, rows, :, start:start + seq] = self._convert(new_kv)

    def write_rows(self, new_kv, rows, slots) -> None:
        """new_kv [L, 2, R, KV, 1, D] of one decode step: for each i, row rows[i] into slot slots[i], in one
        scatter (each row at its own position)."""
        rows, slots = np.asarray(rows, dtype=np.int64), np.asarray(slots, dtype=np.int64)
        if not rows.size:
            return
        self.reserve(int(slots.max()) + 1)
        with self._scope():
            rows_index, slots_index = self._index(rows), self._index(slots)
            picked = self._convert(new_kv)[:, :, :, :, 0, :][:, :, rows_index]  # [L, 2, n, KV, D]
            # two index arrays apart put their dimension first on the left side: [n, L, 2, KV, D]
            self.data[:, :, rows_index, :, slots_index, :] = self._rows_first(picked)

    def zero(self, row: int, start: int, stop: int) -> None:
        with self._scope():
            self.data[:, :, row, :, start:stop] = 0

    def past(self, n: int):
        """The whole buffer, at least n + 1 slots; slots n and above must be masked by the caller."""
        self.reserve(n + 1)
        return self.data

    def numpy(self) -> np.ndarray:
        """The buffer's content as a host array."""
        raise NotImplementedError


class HostKVCache(KVCache):
    """The cache in host memory (numpy), handed to the graph as `past_kv` without a copy."""

    def __init__(self, shape: tuple[int, ...], dtype=np.float32):
        self.dtype = np.dtype(dtype)
        super().__init__(shape)

    def _zeros(self, slots: int) -> np.ndarray:
        return np.zeros(self._with_slots(slots), dtype=self.dtype)

    def _convert(self, value) -> np.ndarray:
        return np.asarray(value)

    def _index(self, ints: np.ndarray) -> np.ndarray:
        return ints

    def _rows_first(self, values: np.ndarray) -> np.ndarray:
        return np.moveaxis(values, 2, 0)

    def numpy(self) -> np.ndarray:
        return self.data


class TorchKVCache(KVCache):
    """The cache as one torch tensor on `device`, float32 or the engines' cache type (`dtype`, e.g.
    torch.bfloat16: written values are rounded to it); written values (torch tensors or numpy arrays) are
    moved there."""

    def __init__(self, shape: tuple[int, ...], device, dtype=None):
        import torch  # noqa: PLC0415 (only device caches need torch)

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = torch.float32 if dtype is None else dtype
        super().__init__(shape)

    def _zeros(self, slots: int):
        with self._scope():
            return self.torch.zeros(self._with_slots(slots), dtype=self.dtype, device=self.device)

    def _convert(self, value):
        torch = self.torch
        if not isinstance(value, torch.Tensor):
            value = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        return value.to(device=self.device, dtype=self.dtype)

    def _index(self, ints: np.ndarray):
        return self.torch.as_tensor(ints, device=self.device)

    def _rows_first(self, values):
        return values.movedim(2, 0)

    def numpy(self) -> np.ndarray:
        with self._scope():
            return self.data.float().cpu().numpy()
