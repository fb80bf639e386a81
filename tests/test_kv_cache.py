"""The host LM cache: grows by powers of two, keeps its content, hands the graph its buffer without a copy."""

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
