"""Unit: the compact digest a completed series keeps of its instances (stream_apps/digest.py)."""

from __future__ import annotations

from diana.stream_apps.digest import (
    ENTRY_BYTES,
    PART_ENTRIES,
    digest_build,
    digest_count,
    digest_join,
    digest_lookup,
    digest_part,
    digest_replace,
    digest_split,
    uid_hash,
)


def _uids(n: int) -> list[str]:
    return [f"1.2.826.0.1.3680043.10.99.{i}" for i in range(n)]


def test_every_instance_is_found_with_its_sha_prefix_and_size_and_others_are_not():
    uids = _uids(1000)
    digest = digest_build((uid, f"{i:064x}", 1000 + i) for i, uid in enumerate(uids))
    assert digest_count(digest) == 1000
    for i, uid in enumerate(uids):
        assert digest_lookup(digest, uid) == (f"{i:064x}"[:8], 1000 + i)
    assert all(digest_lookup(digest, f"1.2.826.0.1.3680043.10.98.{i}") is None for i in range(1000))
    assert digest_lookup(None, uids[0]) is None
    assert digest_lookup("", uids[0]) is None


def test_a_digest_takes_20_bytes_an_instance_and_27_characters_of_json_text():
    digest = digest_build((uid, "ab" * 32, 526_000) for uid in _uids(3000))
    assert ENTRY_BYTES == 20
    assert len(digest) == 4 * ((3000 * 20 + 2) // 3)  # base64 of 60,000 bytes
    assert len(digest) / 3000 < 27


def test_building_again_merges_and_a_re_sent_uid_is_not_counted_twice():
    first = digest_build((uid, "00" * 32, 10) for uid in _uids(10))
    merged = digest_build([(f"1.2.826.0.1.3680043.10.99.{i}", "11" * 32, 20) for i in range(5, 15)], first)
    assert digest_count(merged) == 15
    assert digest_lookup(merged, "1.2.826.0.1.3680043.10.99.2") == ("00000000", 10)
    assert digest_lookup(merged, "1.2.826.0.1.3680043.10.99.7") == ("11111111", 20)


def test_replace_swaps_the_sha_prefix_and_size_of_one_instance():
    digest = digest_build((uid, "00" * 32, 10) for uid in _uids(4))
    replaced = digest_replace(digest, _uids(4)[1], "ff" * 32, 99)
    assert digest_count(replaced) == 4
    assert digest_lookup(replaced, _uids(4)[1]) == ("ffffffff", 99)
    assert digest_lookup(replaced, _uids(4)[0]) == ("00000000", 10)


def test_the_uid_hash_is_stable_across_processes():
    # The digest is restored from the changelog by another process: the hash must not be salted.
    assert uid_hash("1.2.3") == 0x1F0ADB19A75AEDD1  # BLAKE2b-64 of b"1.2.3"


def test_a_large_digest_is_split_into_parts_of_consecutive_hashes_that_each_find_their_uids():
    assert digest_split("") == ("", []) and digest_split(digest_build([])) == ("", [])
    small = digest_build((uid, "00" * 32, 1) for uid in _uids(PART_ENTRIES))
    assert digest_split(small) == (small, [])  # up to a part's size: one key, as before
    uids = _uids(2 * PART_ENTRIES + 1)
    digest = digest_build((uid, "ab" * 32, i) for i, uid in enumerate(uids))
    index, parts = digest_split(digest)
    assert index["parts"] == len(parts) == 3 and [digest_count(p) for p in parts] == [PART_ENTRIES, PART_ENTRIES, 1]
    assert max(len(p) for p in parts) == 4 * -(-PART_ENTRIES * 20 // 3) == 218_456  # characters of base64
    assert digest_join(parts) == digest
    for i, uid in enumerate(uids):
        assert digest_lookup(parts[digest_part(index, uid)], uid) == ("abababab", i)
