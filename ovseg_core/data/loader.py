"""Training stream and validation set over a CC4M build, and the collate that makes the contract's batch dict.

Train stream (IterableDataset, infinite unless `epochs` is given):
  shard list, shuffled per epoch with a seed shared by all ranks -> split over (rank, worker) "slots" -> raw tar
  samples (webdataset.tarfile_samples) -> drop the validation samples -> skip already-consumed samples on resume ->
  shuffle buffer -> decode + augment + text inputs (+ partner by sample id, stage 2) -> DataLoader collate.
Splitting: with at least as many shards as slots, slot k reads shards k, k+S, ... (what webdataset's split_by_node then
split_by_worker do); with fewer shards (small builds) every slot reads all shards and keeps every S-th sample, so
no rank ever starves (an empty rank would dead-lock DDP). Either way the slots are disjoint and cover the data.
Determinism: augmentation randomness is seeded per (seed, epoch, sample_id) inside a forked RNG, so the stream is a
pure function of the config and resuming at step N (skipping N batches' raw samples, no decoding) reproduces it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ovseg_core.data.cc4m import BuildReader, decode_image, is_val_sample
from ovseg_core.data.text import build_mec_inputs, build_shared_inputs

TEXT_KEYS = ("input_ids", "attention_mask", "question_ids", "question_mask", "answer_ids", "answer_mask")
PARTNER_KEYS = ("partner_image", "partner_valid", "shared_ids", "shared_mask")
TEXT_PAIRS = (("input_ids", "attention_mask"), ("question_ids", "question_mask"), ("answer_ids", "answer_mask"),
              ("shared_ids", "shared_mask"))


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
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with python/numpy/torch RNGs seeded, restoring the caller's states after (no global side effect)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@dataclass
class SampleProcessor:
    """Turns one sample (jpeg bytes + its json fields) into tensors; stage 2 adds the partner fetched by id."""

    reader: BuildReader
    tokenizer: Any
    max_len: int
    image_transform: Callable
    stage: int = 1
    partner_transform: Callable | None = None
    val_percent: float = 0.0
    entity_classes: tuple[str, ...] = ()  # non-empty: add "entity_targets", a multi-hot over these classes
    counters: dict[str, int] = field(default_factory=lambda: {"no_partner": 0, "self_partner_dropped": 0})

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

    def __call__(self, jpeg: bytes, info: dict[str, Any], seed: int) -> dict[str, Any]:
        sample_id = int(info["sample_id"])
        rng = random.Random(seed)
        text = build_mec_inputs(
            info["caption"], info.get("entity_words") or [], self.tokenizer, self.max_len, rng=rng,
            entities=info.get("entities"),
        )
        with seeded_rng(seed):
            image = self.image_transform(decode_image(jpeg))
        out = {"image": image, "sample_id": sample_id, **{k: text[k] for k in TEXT_KEYS}, "has_entity": text["has_entity"]}
        if self.entity_classes:
            out["entity_targets"] = self.entity_targets(info.get("entities"))
        if self.stage == 2:
            candidates = self.partner_candidates(sample_id, info)
            if candidates:
                partner_id, shared_class = rng.choice(candidates)
                with seeded_rng(seed ^ 0x5EED):
                    transform = self.partner_transform or self.image_transform
                    out["partner_image"] = transform(self.reader.read_image(partner_id))
                out["partner_valid"] = True
                out["partner_id"] = partner_id
            else:
                self.counters["no_partner"] += 1
                shared_class = None
                out["partner_image"] = torch.zeros_like(image)
                out["partner_valid"] = False
                out["partner_id"] = -1
            out["shared_ids"], out["shared_mask"] = build_shared_inputs(shared_class, self.tokenizer, self.max_len)
        return out


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack samples into the contract's batch dict (plus sample_id / partner_id for bookkeeping)."""
    batch: dict[str, torch.Tensor] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        else:
            batch[key] = torch.tensor(values, dtype=torch.long)
    return batch


def _shuffle_buffer(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


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
        shuffle_buffer: int = 256,
        epochs: int | None = None,
        batch_size: int = 1,
        skip_batches: int = 0,
        repeat_factors: dict[int, float] | None = None,
    ) -> None:
        self.reader, self.processor = reader, processor
        self.repeat_factors = repeat_factors
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.val_percent, self.shuffle_buffer, self.epochs = val_percent, shuffle_buffer, epochs
        self.batch_size, self.skip_batches = batch_size, skip_batches
        self.counters = {"read": 0, "val_excluded": 0, "skipped_for_resume": 0, "malformed": 0, "repeated": 0}

    def _raw_samples(self, epoch: int, slot: int, num_slots: int) -> Iterator[dict[str, Any]]:
        shards = list(self.reader.shard_paths)
        random.Random(f"{self.seed}/shards/{epoch}").shuffle(shards)  # same order on every rank and worker
        if len(shards) >= num_slots:
            mine, keep_every = shards[slot::num_slots], None
        else:
            mine, keep_every = shards, num_slots
        stream = wds.tarfile_samples([{"url": str(p)} for p in mine])
        for i, raw in enumerate(stream):
            if keep_every is not None and i % keep_every != slot:
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
            rng = random.Random(f"{self.seed}/buffer/{epoch}/{slot}")
            for raw in _shuffle_buffer(self._raw_samples(epoch, slot, num_slots), self.shuffle_buffer, rng):
                if to_skip > 0:
                    to_skip -= 1
                    self.counters["skipped_for_resume"] += 1
                    continue
                meta = json.loads(raw["json"])
                if "caption" not in meta:
                    meta["caption"] = raw["txt"].decode("utf-8") if "txt" in raw else ""
                sid = int(meta.get("sample_id", int(raw["__key__"])))
                meta["sample_id"] = sid
                yield self.processor(raw["jpg"], meta, sample_seed(self.seed, epoch, sid, raw.get("__repeat__", 0)))
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
        stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, drop_last=True,
        pin_memory=pin_memory, persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )


def make_val_loader(dataset: CC4MMapDataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
