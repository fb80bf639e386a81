"""The LM cache (vv_runtime.kv_cache): grows by powers of two, keeps its content, hands the graph its buffer
without a copy; host and torch storage behave the same."""

import numpy as np
import pytest

from vv_runtime.backend import HostKVCache, bucket_slots
from vv_runtime.errors import RuntimeInputError


def test_bucket_slots():
    assert bucket_slots(1, 1000) == 64
    assert bucket_slots(65, 1000) == 128
    assert bucket_slots(128, 1000) == 128
    assert bucket_slots(900, 1000) == 1000  # capped at the capacity
    with pytest.raises(RuntimeInputError):
        bucket_slots(1001, 1000)


def test_cache_grows_keeps_content_and_is_not_copied_between_growths():
    cache = HostKVCache((2, 2, 3, 1, 300, 4))
    rng = np.random.default_rng(0)
    written = {}
    for slot in range(0, 200, 7):
        kv = rng.standard_normal((2, 2, 3, 1, 1, 4)).astype(np.float32)
        cache.write(slice(0, 3), slot, kv)
        written[slot] = kv
    buffer = cache.past(199)
    assert buffer.shape[4] == 256 and buffer.flags.c_contiguous
    assert cache.past(150) is buffer  # same bucket: the very same array, no copy
    for slot, kv in written.items():
        np.testing.assert_array_equal(buffer[:, :, :, :, slot:slot + 1], kv)
    untouched = [s for s in range(256) if s not in written]
    assert not buffer[:, :, :, :, untouched].any()
    assert cache.past(299).shape[4] == 300


def _per_row(cache, new_kv, rows, slots):
    for r, s in zip(rows, slots):
        cache.write(slice(r, r + 1), s, new_kv[:, :, r:r + 1])


def test_write_rows_scatters_each_row_into_its_own_slot():
    """One decode step's rows written at once land where one write per row puts them, growing the cache
    when a slot lies beyond its bucket; rows not named stay untouched."""
    rng = np.random.default_rng(1)
    shape = (2, 2, 6, 1, 300, 3)
    batched, one_by_one = HostKVCache(shape), HostKVCache(shape)
    rows, slots = [4, 0, 2, 5], [7, 3, 100, 63]                 # slot 100: beyond the first (64-slot) bucket
    new_kv = rng.standard_normal((2, 2, 6, 1, 1, 3)).astype(np.float32)
    batched.write_rows(new_kv, np.array(rows), np.array(slots))
    _per_row(one_by_one, new_kv, rows, slots)
    assert batched.data.shape[4] == 128
    np.testing.assert_array_equal(batched.data, one_by_one.data)
    assert not batched.data[:, :, [1, 3]].any()
    batched.write_rows(new_kv, np.array([], dtype=np.int64), np.array([], dtype=np.int64))  # nothing to write
    np.testing.assert_array_equal(batched.data, one_by_one.data)


def test_torch_cache_matches_the_host_cache():
    """The same writes, zeroing, batched row writes and growth give the same content on a torch tensor
    (CPU here) as in host memory, and `past` is the buffer itself between growths."""
    torch = pytest.importorskip("torch")
    from vv_runtime.kv_cache import KVCache, TorchKVCache

    rng = np.random.default_rng(2)
    shape = (2, 2, 4, 2, 200, 3)
    host, dev = HostKVCache(shape), TorchKVCache(shape, "cpu")
    assert isinstance(host, KVCache) and isinstance(dev, KVCache)
    prompt = rng.standard_normal((2, 2, 2, 2, 30, 3)).astype(np.float32)
    neg = rng.standard_normal((2, 2, 1, 2, 1, 3)).astype(np.float32)
    step = rng.standard_normal((2, 2, 4, 2, 1, 3)).astype(np.float32)
    for cache, as_input in ((host, lambda a: a), (dev, torch.from_numpy)):
        cache.write(slice(0, 2), 0, as_input(prompt))
        cache.zero(1, 0, 5)
        cache.write(slice(2, 4), 3, as_input(neg))           # one row broadcast to both
        cache.write_rows(as_input(step), np.array([0, 1, 3]), np.array([30, 64, 4]))
    assert dev.data.dtype == torch.float32 and tuple(dev.data.shape) == host.data.shape == (2, 2, 4, 2, 128, 3)
    np.testing.assert_array_equal(dev.numpy(), host.numpy())
    past = dev.past(100)
    assert past is dev.data and past.is_contiguous()
    assert tuple(dev.past(128).shape)[4] == 200 and dev.slots == host.past(128).shape[4] == 200  # capped
    np.testing.assert_array_equal(dev.numpy(), host.numpy())
