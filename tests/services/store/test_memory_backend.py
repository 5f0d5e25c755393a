from services.store.backends.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_evicts_least_recently_used_by_bytes_and_counts_evictions():
    store = MemoryStore(max_bytes=3 * 101)  # three 100-byte values with 1-byte keys
    store.put_many([("a", b"1" * 100), ("b", b"2" * 100), ("c", b"3" * 100)], None)
    assert store.get_many(["a"]) == [b"1" * 100]  # "a" is now the most recent
    store.put_many([("d", b"4" * 100)], None)
    assert store.get_many(["a", "b", "c", "d"]) == [b"1" * 100, None, b"3" * 100, b"4" * 100]
    stats = store.stats()
    assert (stats.keys, stats.bytes, stats.evictions) == (3, 303, 1)
    assert stats.capacity_bytes == 303


def test_one_large_value_evicts_as_many_as_needed():
    store = MemoryStore(max_bytes=1000)
    store.put_many([(f"k{i}", b"x" * 98) for i in range(10)], None)  # 10 x 100 bytes
    store.put_many([("big", b"y" * 497)], None)
    assert store.stats().evictions == 5
    assert store.stats().bytes <= 1000


def test_a_value_larger_than_the_bound_is_not_stored_and_evicts_nothing():
    store = MemoryStore(max_bytes=100)
    store.put_many([("a", b"x" * 50)], None)
    assert store.put_many([("huge", b"x" * 200)], None) == 0
    assert store.get_many(["a", "huge"]) == [b"x" * 50, None]


def test_overwrite_replaces_bytes_instead_of_adding():
    store = MemoryStore(max_bytes=1000)
    store.put_many([("a", b"x" * 100)], None)
    store.put_many([("a", b"y" * 10)], None)
    assert store.stats().bytes == 11


def test_lookup_counts_the_leading_present_keys_only():
    store = MemoryStore(max_bytes=1000)
    store.put_many([("a", b"1"), ("b", b"2"), ("d", b"4")], None)
    assert store.lookup(["a", "b", "c", "d"]) == 2
    assert store.lookup(["c", "a"]) == 0
    assert store.lookup([]) == 0


def test_ttl_expires_keys():
    clock = Clock()
    store = MemoryStore(max_bytes=1000, clock=clock)
    store.put_many([("short", b"1")], ttl_s=5)
    store.put_many([("forever", b"2")], None)
    clock.now = 4.9
    assert store.lookup(["short"]) == 1
    clock.now = 5.0
    assert store.get_many(["short", "forever"]) == [None, b"2"]
    assert store.stats().keys == 1


def test_views_are_copied_so_the_message_is_not_pinned():
    message = bytearray(b"abcdef")
    store = MemoryStore(max_bytes=1000)
    store.put_many([("k", memoryview(message)[1:4])], None)
    message[1:4] = b"XYZ"
    assert store.get_many(["k"]) == [b"bcd"]


def test_delete_counts_existing_keys():
    store = MemoryStore(max_bytes=1000)
    store.put_many([("a", b"1"), ("b", b"2")], None)
    assert store.delete(["a", "zz"]) == 1
    assert store.get_many(["a", "b"]) == [None, b"2"]
    assert store.stats().bytes == 2
