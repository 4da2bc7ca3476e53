"""Streaming: shard order per epoch and slot, stage-2 partners from the shuffle buffer (locator fallback), and shards
read from a local HTTP server (Range requests for partners) or an fsspec object-store path."""
from __future__ import annotations

import itertools

import fsspec
import pytest
import torch

from ovseg_core.data.cc4m import BuildReader
from ovseg_core.data.loader import CC4MTrainStream, PartnerBuffer, SampleProcessor
from ovseg_core.data.shard_server import ShardServer
from ovseg_core.data.transforms import build_train_transform

SIZE, MAX_LEN = 32, 24


def make_stream(reader, tok, stage=1, **kwargs):
    proc = SampleProcessor(reader, tok, MAX_LEN, build_train_transform(SIZE, "none"), stage=stage,
                           partner_transform=build_train_transform(SIZE, "none"))
    return CC4MTrainStream(reader, proc, **{"seed": 3, "epochs": 1, **kwargs}), proc


def test_slots_get_disjoint_covering_shards_in_their_own_order_per_epoch(fixture_build, minilm_tokenizer):
    reader = BuildReader(fixture_build)
    stream, _ = make_stream(reader, minilm_tokenizer, world_size=3)
    orders = []
    for epoch in range(6):
        slots = [stream.slot_shards(epoch, slot, 3)[0] for slot in range(3)]
        assert sorted(itertools.chain(*slots)) == sorted(reader.shard_urls)  # disjoint and covering
        orders.append(tuple(tuple(s) for s in slots))
    assert len(set(orders)) > 1  # the assignment to ranks changes between epochs
    one_slot = [tuple(stream.slot_shards(epoch, 0, 1)[0]) for epoch in range(6)]
    assert len(set(one_slot)) > 1  # and so does each slot's reading order


def test_few_shards_split_by_sample_key_disjointly(fixture_build, minilm_tokenizer):
    reader = BuildReader(fixture_build)  # 3 shards, 4 slots: every slot reads every shard, keeps its keys
    seen = []
    for rank in range(4):
        stream, _ = make_stream(reader, minilm_tokenizer, rank=rank, world_size=4, shuffle_buffer=4)
        seen.append([s["sample_id"] for s in stream])
    flat = list(itertools.chain(*seen))
    assert sorted(flat) == sorted(reader.sample_ids()) and all(seen)


def test_buffer_partners_share_a_class_and_fall_back_to_the_locator(fixture_build, minilm_tokenizer):
    reader = BuildReader(fixture_build)
    entities = {int(r["sample_id"]): set(r["entities"]) for r in reader.meta_rows(reader.sample_ids())}
    stream, proc = make_stream(reader, minilm_tokenizer, stage=2, shuffle_buffer=6)
    samples = list(stream)
    assert len(samples) == reader.num_samples()
    c = proc.counters
    assert c["partner_from_buffer"] > 0 and c["partner_from_locator"] > 0  # small buffer: some fallbacks
    assert c["partner_from_buffer"] + c["partner_from_locator"] + c["no_partner"] == len(samples)
    transform = build_train_transform(SIZE, "none")
    for s in samples:
        if not s["partner_valid"]:
            continue
        assert s["partner_id"] != s["sample_id"]
        assert entities[s["sample_id"]] & entities[s["partner_id"]]  # they share a class
        # the partner image is the partner's own picture (augment "none": deterministic)
        assert torch.equal(s["partner_image"], transform(reader.read_image(s["partner_id"])))


@pytest.mark.parametrize(("source", "buffer", "from_buffer"), [("locator", 64, False), ("buffer", 1, False),
                                                                ("buffer", 64, True)])
def test_partner_source_and_buffer_size_decide_where_partners_come_from(fixture_build, minilm_tokenizer, source,
                                                                        buffer, from_buffer):
    reader = BuildReader(fixture_build)
    stream, proc = make_stream(reader, minilm_tokenizer, stage=2, shuffle_buffer=buffer, partner_source=source)
    n = sum(1 for _ in stream)
    assert (proc.counters["partner_from_buffer"] > 0) is from_buffer
    if from_buffer:  # the whole build fits in the buffer: only the last few, as it drains, need the locator
        assert proc.counters["partner_from_buffer"] > n // 2 > proc.counters["partner_from_locator"]


def test_partner_buffer_never_returns_emitted_or_self_samples():
    import random

    buf = PartnerBuffer(3, random.Random(0))
    buf.add(1, ("dog",), "a")
    buf.add(2, ("dog", "cat"), "b")
    buf.add(3, ("cat",), "c")
    item = buf.pop()
    rng = random.Random(1)
    for _ in range(20):
        found = buf.partner(item[0], item[1], rng)
        assert found is None or (found[0] != item[0] and found[0] in buf.alive and found[1] in item[1])
    while buf.items:
        buf.pop()
    assert buf.partner(1, ("dog", "cat"), rng) is None


def _ids(reader, tok):
    stream, _ = make_stream(reader, tok, shuffle_buffer=5)
    return [s["sample_id"] for s in stream]


def test_http_shards_stream_like_local_ones_and_serve_ranged_partner_reads(fixture_build, minilm_tokenizer):
    local = BuildReader(fixture_build)
    with ShardServer(fixture_build / "shards") as server:
        remote = BuildReader(fixture_build, shard_base_url=server.url)
        assert all(u.startswith("http://127.0.0.1:") for u in remote.shard_urls)
        assert _ids(remote, minilm_tokenizer) == _ids(local, minilm_tokenizer)
        for sid in local.sample_ids()[:5]:
            assert remote.read_jpeg(sid) == local.read_jpeg(sid)  # Range request == seek + read
        stream, proc = make_stream(remote, minilm_tokenizer, stage=2, shuffle_buffer=2)
        assert sum(1 for _ in stream) == local.num_samples() and proc.counters["partner_from_locator"] > 0
    with pytest.raises(OSError):  # server stopped: reads fail loudly instead of yielding nothing
        remote.read_jpeg(local.sample_ids()[0])


def test_fsspec_object_store_paths(fixture_build, minilm_tokenizer):
    fs = fsspec.filesystem("memory")
    for path in (fixture_build / "shards").glob("*.tar"):
        fs.pipe(f"/cc4m-test/shards/{path.name}", path.read_bytes())
    try:
        local = BuildReader(fixture_build)
        remote = BuildReader(fixture_build, shard_base_url="memory://cc4m-test/shards")
        assert _ids(remote, minilm_tokenizer) == _ids(local, minilm_tokenizer)
        sid = local.sample_ids()[-1]
        assert remote.read_jpeg(sid) == local.read_jpeg(sid)
    finally:
        fs.rm("/cc4m-test", recursive=True)
