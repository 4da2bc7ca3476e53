"""Training stream and validation set over a CC4M build, and the collate that makes the contract's batch dict.

Train stream (IterableDataset, infinite unless `epochs` is given):
  shard list, shuffled per epoch with a seed shared by all ranks -> split over (rank, worker) "slots" -> each slot
  shuffles its own shards again per (epoch, slot) and reads `shards_in_flight` of them at once, taking each next
  sample from a random open shard -> raw tar samples (webdataset.tarfile_samples) -> drop the validation samples ->
  shuffle buffer -> skip already-consumed samples on resume -> decode + augment + text inputs (+ partner, stage 2)
  -> DataLoader collate.
Mixing: shards hold consecutive source rows, so a batch drawn from one shard through a small buffer is a few hundred
neighbouring rows. Interleaving k shards and a buffer of B samples makes a batch span k shards, and B should hold
several shards' worth of that (default 4 shards in flight, 4,096 raw samples in the buffer: ~150 MB of JPEG bytes
per worker at CC12M sizes). `benchmarks/bench_loader.py` measures the mixing before and after.
Partners (stage 2): `partner_source="buffer"` pairs each sample with a sample that shares an entity class from the
shuffle buffer itself (no extra read); only when none is there does it fall back to the locator (one random read
of a partner from the build's partner list). Counters `partner_from_buffer` / `partner_from_locator` give the
fallback rate. `partner_source="locator"` always uses the locator (the released code's design).
Splitting: with at least as many shards as slots, slot k reads shards k, k+S, ... (what webdataset's split_by_node then
split_by_worker do); with fewer shards (small builds) every slot reads all shards and keeps every S-th sample, so
no rank ever starves (an empty rank would dead-lock DDP). Either way the slots are disjoint and cover the data.
Determinism: augmentation randomness is seeded per (seed, epoch, sample_id) inside a forked RNG, so the stream is a
pure function of the config and resuming at step N (skipping N batches' raw samples, no decoding) reproduces it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ovseg_core.batch import ENTITY_TARGETS_KEY, TEXT_KEYS, TEXT_PAIRS
from ovseg_core.data.cc4m import BuildReader, is_val_sample, shard_samples
from ovseg_core.data.device_decode import crop_draw, jpeg_tensor
from ovseg_core.data.text import TextPlan, encode_mec_batch, plan_mec_text, shared_prompt
from ovseg_core.data.transforms import ALL_RNGS, apply_to_jpeg, global_rngs

LIST_KEYS = ("jpeg", "partner_jpeg")  # variable-length JPEG bytes (device decode): collated as lists

def sample_seed(seed: int, epoch: int, sample_id: int, repeat: int = 0) -> int:
    """Seed of one sample's augmentation draw; `repeat` > 0 distinguishes the extra copies of repeat-factor sampling."""
    key = f"{seed}/{epoch}/{sample_id}" + (f"/{repeat}" if repeat else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def class_repeat_factors(entities_by_sample: dict[int, Sequence[str]], threshold: float) -> dict[int, float]:
    """LVIS-style repeat-factor sampling (Gupta et al., CVPR'19): r(class) = max(1, sqrt(threshold / f(class))), with
    f the fraction of the given samples whose caption names the class; a sample repeats max r over its classes.

    Curated captions are very skewed (the sample build: "people" in 43% of the images, most classes in < 5), so
    without it a short run only ever sees the few frequent classes. Uses the training samples' own entity lists
    (curation output), nothing from any evaluation set. Samples with no class get 1.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"repeat threshold must be in (0, 1], got {threshold}")
    n = len(entities_by_sample)
    counts: dict[str, int] = {}
    for classes in entities_by_sample.values():
        for c in set(classes):
            counts[c] = counts.get(c, 0) + 1
    per_class = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return {sid: max([per_class[c] for c in classes], default=1.0) for sid, classes in entities_by_sample.items()}


def repeat_count(factor: float, seed: int, epoch: int, sample_id: int) -> int:
    """Stochastic rounding of a repeat factor, deterministic per (seed, epoch, sample) (so resume reproduces it)."""
    whole = math.floor(factor)
    frac = factor - whole
    if frac <= 0:
        return whole
    u = (sample_seed(seed, epoch, sample_id, repeat=-1) % 1_000_000) / 1_000_000
    return whole + int(u < frac)


def trim_text_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut every (ids, mask) pair of a batch to its longest real text (padding columns only; a pure speed-up).

    The pipeline pads each text to max_len; answers are ~10 tokens, so encoding 32 columns of padding wastes most of
    the text encoder's time on CPU. The masks make the result identical up to float rounding.
    """
    out = dict(batch)
    for ids_key, mask_key in TEXT_PAIRS:
        if ids_key in out and mask_key in out:
            mask = out[mask_key]
            keep = int(mask.sum(dim=1).max()) if mask.numel() else 0
            keep = max(keep, 1)
            out[ids_key], out[mask_key] = out[ids_key][:, :keep], mask[:, :keep]
    return out


@contextlib.contextmanager
def seeded_rng(seed: int, rngs: Sequence[str] = ALL_RNGS) -> Iterator[None]:
    """Run a block with the global RNGs named in `rngs` ("python", "numpy", "torch") seeded, restoring the caller's
    states after (no global side effect). Name only those the block draws from (`transforms.global_rngs`):
    saving and restoring numpy's state costs ~1 ms, more than decoding a small JPEG."""
    py_state = random.getstate() if "python" in rngs else None
    np_state = np.random.get_state() if "numpy" in rngs else None
    with torch.random.fork_rng(devices=[]):
        if py_state is not None:
            random.seed(seed)
        if np_state is not None:
            np.random.seed(seed % (2**32))
        # the CPU generator only (what the transforms draw from): torch.manual_seed also queues a lazy CUDA seeding
        # that formats a stack trace on every call in a process without CUDA, ~2 ms per sample
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            if py_state is not None:
                random.setstate(py_state)
            if np_state is not None:
                np.random.set_state(np_state)


@dataclass
class SampleProcessor:
    """Turns one sample (jpeg bytes + its json fields) into tensors; stage 2 adds the partner fetched by id.

    batch_text: leave the text untokenized in the sample ("text": a TextPlan, the answer already drawn) and
    tokenize the whole batch in the collate (`collate_fn()`): one tokenizer call per text kind and batch instead
    of three or four per sample, which cost more than the image decode. The tensors are identical.
    device_decode: ship the JPEG bytes and the drawn crop rows instead of decoded images ("jpeg"/"crop", stage 2
    also "partner_jpeg"/"partner_crop"); `ovseg_core.data.device_decode.decode_on_device` decodes the batch on
    the training device. Crop/light augmentations only.
    """

    reader: BuildReader
    tokenizer: Any
    max_len: int
    image_transform: Callable
    stage: int = 1
    partner_transform: Callable | None = None
    val_percent: float = 0.0
    entity_classes: tuple[str, ...] = ()  # non-empty: add "entity_targets", a multi-hot over these classes
    batch_text: bool = False
    device_decode: bool = False
    counters: dict[str, int] = field(default_factory=lambda: {"no_partner": 0, "self_partner_dropped": 0,
                                                              "partner_from_buffer": 0, "partner_from_locator": 0})

    def entity_targets(self, entities: Sequence[str] | None) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.entity_classes)}
        targets = torch.zeros(len(self.entity_classes))
        for name in entities or ():
            if name not in index:
                raise ValueError(f"entity {name!r} is not a class of the model's entity vocabulary "
                                 f"({len(self.entity_classes)} classes): build and model use different vocabularies")
            targets[index[name]] = 1.0
        return targets

    def partner_candidates(self, sample_id: int, info: dict[str, Any]) -> list[tuple[int, str]]:
        if "partners" in info and info["partners"] is not None:
            raw = [(int(p["partner_id"]), str(p["shared_class"])) for p in info["partners"]]
        else:
            raw = self.reader.partners.get(sample_id, [])
        out = []
        for pid, cls in raw:
            if pid == sample_id:  # the contract forbids it; never train a sample against itself
                self.counters["self_partner_dropped"] += 1
                continue
            if is_val_sample(pid, self.val_percent):  # keep held-out images out of training entirely
                continue
            out.append((pid, cls))
        return out

    def __call__(self, jpeg: bytes, info: dict[str, Any], seed: int,
                 partner: tuple[int, str, bytes] | None = None) -> dict[str, Any]:
        """One sample -> tensors. `partner` = (partner_id, shared_class, partner jpeg bytes) found by the stream in
        its shuffle buffer; without it, stage 2 fetches a partner from the build's partner list via the locator."""
        sample_id = int(info["sample_id"])
        rng = random.Random(seed)
        plan = plan_mec_text(info["caption"], info.get("entity_words") or [], rng=rng, entities=info.get("entities"))
        out: dict[str, Any] = {"sample_id": sample_id}
        self._add_image(out, "", self.image_transform, jpeg, seed)
        if self.entity_classes:
            out[ENTITY_TARGETS_KEY] = self.entity_targets(info.get("entities"))
        shared_class = self._add_partner(out, sample_id, info, seed, rng, partner) if self.stage == 2 else None
        if self.stage == 2:
            plan = dataclasses.replace(plan, shared=shared_prompt(shared_class))
        if self.batch_text:
            out["text"] = plan
        else:
            out.update(_text_tensors([plan], self.tokenizer, self.max_len, unbatch=True))
        return out

    def _add_partner(self, out: dict[str, Any], sample_id: int, info: dict[str, Any], seed: int,
                     rng: random.Random, partner: tuple[int, str, bytes] | None) -> str | None:
        """Stage 2: the partner image (from the buffer, else via the locator) into `out`; returns the shared class."""
        candidates = [] if partner is not None else self.partner_candidates(sample_id, info)
        if partner is None and not candidates:
            self.counters["no_partner"] += 1
            if self.device_decode:  # a placeholder decode; decode_on_device zeroes it (partner_valid False)
                out["partner_jpeg"], out["partner_crop"] = out["jpeg"], out["crop"]
            else:
                out["partner_image"] = torch.zeros_like(out["image"])
            out["partner_valid"] = False
            out["partner_id"] = -1
            return None
        if partner is not None:
            partner_id, shared_class, partner_jpeg = partner
            self.counters["partner_from_buffer"] += 1
        else:
            partner_id, shared_class = rng.choice(candidates)
            partner_jpeg = self.reader.read_jpeg(partner_id)
            self.counters["partner_from_locator"] += 1
        self._add_image(out, "partner_", self.partner_transform or self.image_transform, partner_jpeg, seed ^ 0x5EED)
        out["partner_valid"] = True
        out["partner_id"] = partner_id
        return shared_class

    def _add_image(self, out: dict[str, Any], prefix: str, transform: Callable, jpeg: bytes, seed: int) -> None:
        """out[prefix + "image"] decoded and augmented, or (device_decode) the bytes and the crop row drawn with
        the same seed, for the device to decode."""
        with seeded_rng(seed, global_rngs(transform)):
            if self.device_decode:
                out[prefix + "crop"] = crop_draw(transform, jpeg)
                out[prefix + "jpeg"] = jpeg_tensor(jpeg)
            else:
                out[prefix + "image"] = apply_to_jpeg(transform, jpeg)

    def collate_fn(self) -> Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]:
        """The DataLoader collate for this processor's samples (batched tokenization when `batch_text`)."""
        return TextCollate(self.tokenizer, self.max_len) if self.batch_text else collate


_TEXT_OUTPUT = TEXT_KEYS + ("has_entity", "shared_ids", "shared_mask")


def _text_tensors(plans: Sequence[TextPlan], tokenizer: Any, max_len: int, unbatch: bool = False) -> dict[str, Any]:
    """The batch's text keys from its plans (`unbatch`: the single sample's tensors, has_entity a bool)."""
    batch = {k: v for k, v in encode_mec_batch(plans, tokenizer, max_len).items() if k in _TEXT_OUTPUT}
    if not unbatch:
        return batch
    out: dict[str, Any] = {k: v[0] for k, v in batch.items()}
    out["has_entity"] = bool(out["has_entity"])
    return out


@dataclass(frozen=True)
class TextCollate:
    """Collate of samples carrying a TextPlan under "text": tokenizes the batch's texts together, then `collate`."""

    tokenizer: Any
    max_len: int

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        plans = [s["text"] for s in samples]
        batch = collate([{k: v for k, v in s.items() if k != "text"} for s in samples])
        batch.update(_text_tensors(plans, self.tokenizer, self.max_len))
        return batch


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples into the contract's batch dict (plus sample_id / partner_id for bookkeeping)."""
    batch: dict[str, torch.Tensor] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key in LIST_KEYS:  # variable-length JPEG bytes: decode_jpeg takes the list
            batch[key] = values
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        else:
            batch[key] = torch.tensor(values, dtype=torch.long)
    return batch


class PartnerBuffer:
    """Shuffle buffer that can also hand out, for the sample it emits, another buffered sample sharing a class.

    Items are (sample_id, classes, payload). Per class a list of buffered ids with lazy deletion (ids that left the
    buffer are dropped when met), so adding, emitting and finding a partner are O(1) amortised. Emission is a uniform
    random pick once the buffer is full (webdataset's shuffle), then random picks while it drains.
    """

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size, self.rng = max(1, size), rng
        self.items: list[tuple[int, tuple[str, ...], Any]] = []
        self.alive: dict[int, Any] = {}  # sample id -> payload, for items in the buffer
        self.by_class: dict[str, list[int]] = {}

    def add(self, sample_id: int, classes: Sequence[str], payload: Any) -> None:
        self.items.append((sample_id, tuple(classes), payload))
        self.alive[sample_id] = payload
        for c in classes:
            self.by_class.setdefault(c, []).append(sample_id)

    def full(self) -> bool:
        return len(self.items) >= self.size

    def pop(self) -> tuple[int, tuple[str, ...], Any]:
        i = self.rng.randrange(len(self.items))
        self.items[i], self.items[-1] = self.items[-1], self.items[i]
        item = self.items.pop()
        self.alive.pop(item[0], None)
        return item

    def partner(self, sample_id: int, classes: Sequence[str], rng: random.Random) -> tuple[int, str, Any] | None:
        """A buffered sample (not `sample_id`) sharing one of `classes`: (partner_id, shared_class, payload)."""
        order = list(classes)
        rng.shuffle(order)
        for c in order:
            ids = self.by_class.get(c)
            while ids:
                j = rng.randrange(len(ids))
                pid = ids[j]
                if pid in self.alive and pid != sample_id:
                    return pid, c, self.alive[pid]
                ids[j] = ids[-1]  # left the buffer (or is the emitted sample itself): drop it, swap-pop
                ids.pop()
        return None


class CC4MTrainStream(IterableDataset):
    """Infinite (or `epochs`-long) stream of processed training samples for one rank."""

    def __init__(
        self,
        reader: BuildReader,
        processor: SampleProcessor,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        val_percent: float = 0.0,
        shuffle_buffer: int = 4096,
        shards_in_flight: int = 16,
        partner_source: str = "buffer",
        epochs: int | None = None,
        batch_size: int = 1,
        skip_batches: int = 0,
        repeat_factors: dict[int, float] | None = None,
    ) -> None:
        if partner_source not in ("buffer", "locator"):
            raise ValueError(f"partner_source must be 'buffer' or 'locator', got {partner_source!r}")
        if shards_in_flight < 1:
            raise ValueError(f"shards_in_flight must be >= 1, got {shards_in_flight}")
        self.reader, self.processor = reader, processor
        self.repeat_factors = repeat_factors
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.val_percent, self.shuffle_buffer, self.epochs = val_percent, shuffle_buffer, epochs
        self.shards_in_flight, self.partner_source = shards_in_flight, partner_source
        self.batch_size, self.skip_batches = batch_size, skip_batches
        self.counters = {"read": 0, "val_excluded": 0, "skipped_for_resume": 0, "malformed": 0, "repeated": 0}

    def slot_shards(self, epoch: int, slot: int, num_slots: int) -> tuple[list[str], int | None]:
        """This slot's shards in this epoch's reading order, and (few shards) the sample stride it keeps.

        The global order is shuffled per epoch with a seed shared by all ranks (disjoint slots that cover the data);
        each slot then reshuffles its own list per (epoch, slot), so ranks do not walk the data in step.
        """
        shards = list(self.reader.shard_urls)
        random.Random(f"{self.seed}/shards/{epoch}").shuffle(shards)  # same order on every rank and worker
        if len(shards) >= num_slots:
            mine, keep_every = shards[slot::num_slots], None
        else:
            mine, keep_every = shards, num_slots
        random.Random(f"{self.seed}/shards/{epoch}/{slot}").shuffle(mine)
        return mine, keep_every

    def _interleaved(self, urls: list[str], rng: random.Random) -> Iterator[dict[str, Any]]:
        """Raw samples of `urls`, `shards_in_flight` shards open at once, each next sample from a random one."""
        pending = list(urls)
        open_streams: list[Iterator[dict[str, Any]]] = []
        while pending or open_streams:
            while pending and len(open_streams) < self.shards_in_flight:
                open_streams.append(shard_samples(pending.pop(0)))
            k = rng.randrange(len(open_streams))
            try:
                yield next(open_streams[k])
            except StopIteration:
                open_streams.pop(k)

    def _raw_samples(self, epoch: int, slot: int, num_slots: int) -> Iterator[dict[str, Any]]:
        mine, keep_every = self.slot_shards(epoch, slot, num_slots)
        stream = self._interleaved(mine, random.Random(f"{self.seed}/interleave/{epoch}/{slot}"))
        for i, raw in enumerate(stream):
            if keep_every is not None and int(raw["__key__"]) % keep_every != slot:
                continue
            self.counters["read"] += 1
            if not all(k in raw for k in ("jpg", "json")):
                self.counters["malformed"] += 1
                raise ValueError(f"sample {raw.get('__key__')} in {raw.get('__url__')} lacks a .jpg or .json member")
            sid = int(raw["__key__"])
            if is_val_sample(sid, self.val_percent):
                self.counters["val_excluded"] += 1
                continue
            if self.repeat_factors is None:
                yield raw
                continue
            copies = repeat_count(self.repeat_factors.get(sid, 1.0), self.seed, epoch, sid)
            self.counters["repeated"] += max(0, copies - 1)
            for rep in range(copies):
                yield {**raw, "__repeat__": rep}

    @staticmethod
    def _meta(raw: dict[str, Any]) -> dict[str, Any]:
        meta = json.loads(raw["json"])
        if "caption" not in meta:
            meta["caption"] = raw["txt"].decode("utf-8") if "txt" in raw else ""
        meta["sample_id"] = int(meta.get("sample_id", int(raw["__key__"])))
        return meta

    def _buffered(self, epoch: int, slot: int, num_slots: int) -> Iterator[tuple[dict[str, Any], dict[str, Any],
                                                                                 tuple[int, str, bytes] | None]]:
        """(raw, meta, partner or None) in shuffle-buffer order; partners come from the buffer (stage 2)."""
        buf = PartnerBuffer(self.shuffle_buffer, random.Random(f"{self.seed}/buffer/{epoch}/{slot}"))
        want_partner = self.processor.stage == 2 and self.partner_source == "buffer"

        def emit(item: tuple[int, tuple[str, ...], Any]):
            sid, classes, (raw, meta) = item
            partner = None
            if want_partner:
                rng = random.Random(sample_seed(self.seed, epoch, sid, raw.get("__repeat__", 0)) ^ 0xB0FF)
                found = buf.partner(sid, classes, rng)
                if found is not None and not is_val_sample(found[0], self.processor.val_percent):
                    partner = (found[0], found[1], found[2][0]["jpg"])
            return raw, meta, partner

        for raw in self._raw_samples(epoch, slot, num_slots):
            meta = self._meta(raw)
            buf.add(meta["sample_id"], meta.get("entities") or (), (raw, meta))
            if buf.full():
                yield emit(buf.pop())
        while buf.items:
            yield emit(buf.pop())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        num_slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker_id
        # DataLoader takes batches round-robin from its workers: after skip_batches steps worker w made this many.
        my_batches = max(0, (self.skip_batches - worker_id + num_workers - 1) // num_workers)
        to_skip = my_batches * self.batch_size
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            for raw, meta, partner in self._buffered(epoch, slot, num_slots):
                if to_skip > 0:
                    to_skip -= 1
                    self.counters["skipped_for_resume"] += 1
                    continue
                sid = meta["sample_id"]
                yield self.processor(raw["jpg"], meta, sample_seed(self.seed, epoch, sid, raw.get("__repeat__", 0)),
                                     partner=partner)
            epoch += 1


class CC4MMapDataset(Dataset):
    """Map-style reader of a subset of samples by id (validation): caption/entities from meta, image via locator."""

    def __init__(self, reader: BuildReader, processor: SampleProcessor, sample_ids: Sequence[int], seed: int = 0) -> None:
        self.reader, self.processor, self.seed = reader, processor, seed
        self.rows = reader.meta_rows(sample_ids)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        info = {
            "sample_id": int(row["sample_id"]), "caption": row["caption"], "entities": row.get("entities"),
            "entity_words": row.get("entity_words") or [],
        }
        return self.processor(self.reader.read_jpeg(info["sample_id"]), info, sample_seed(self.seed, 0, info["sample_id"]))


def make_train_loader(
    stream: CC4MTrainStream, batch_size: int, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    return DataLoader(
        stream, batch_size=batch_size, num_workers=num_workers, collate_fn=stream.processor.collate_fn(),
        drop_last=True,
        pin_memory=pin_memory, persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def make_val_loader(dataset: CC4MMapDataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=dataset.processor.collate_fn())
