"""One build on disk: the contract between curation (which writes it) and training (which reads it). Both import
this module (`manifests` is the package every side may import); no other module spells a build path.

    <build>/
      config.json                 frozen BuildConfig as used
      manifest.json               manifests/schema.py: inputs, versions, content config, counts, shards + sha256
      run.json                    this run's time, paths and run-time settings (kept out of the manifest's identity)
      ingest/part-NNNNN.parquet   sample_id, url, caption                       (rows that could be read)
      rejects/part-NNNNN.parquet  sample_id, line, raw, reason                  (rows that could not)
      captions/part-NNNNN.parquet sample_id, url, caption, entities, entity_words{word,class,start,end}
      selected/part-NNNNN.parquet sample_id, url, caption, entities, entity_words  (>= 1 class)
      staging/                    img2dataset's own output folder (nothing else writes there)
      downloads.parquet           one row per selected sample: sample_id, status, error_message, ...
      duplicates.parquet          sample_id, duplicate_of, kind (exact|near), distance
      kept.parquet                sample_id, entities: the final decision of what is written (sorted by sample_id)
      dedup_hashes.parquet        sample_id, the original download's sha256, stored-JPEG sha256 + pHash: a cache,
                                  so a grown build hashes only its new images
      index/entity_index.parquet  class, sample_ids (list<int64>)
      index/partners.parquet      sample_id, rank, partner_id, shared_class
      index/cooccurrence.parquet  class_a, class_b, count
      index/locator.parquet       sample_id, shard, position, offset, size  (byte range of the .jpg in the tar)
      shards/cc4m-NNNNNN.tar      <sample_id>.jpg/.txt/.json, in sample_id order
      meta/part-NNNNN.parquet     one row per written sample (sample_id, shard, position, entities, ...)
      report/                     index.html, report.md, PNG plots

Sample ids are 0-based row numbers of the source; written samples are laid out in ascending sample_id order,
`shard_for_rank` fixing which shard and position each one gets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SHARD_PATTERN = "cc4m-{:06d}.tar"
SHARD_GLOB = "cc4m-*.tar"
PART_PATTERN = "part-{:05d}.parquet"
PART_GLOB = "part-*.parquet"
KEY_DIGITS = 12  # a sample's member names in a shard: <sample_id zero-padded to 12 digits>.jpg/.txt/.json


def part_name(index: int) -> str:
    return PART_PATTERN.format(index)


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def sample_key(sample_id: int) -> str:
    """The key of a written sample's members in its shard (`<key>.jpg`, `.txt`, `.json`)."""
    return f"{int(sample_id):0{KEY_DIGITS}d}"


def shard_for_rank(rank: int, samples_per_shard: int) -> tuple[int, int]:
    """(shard index, position in shard) of the `rank`-th written sample in sample_id order."""
    if samples_per_shard <= 0:
        raise ValueError("samples_per_shard must be positive")
    return divmod(rank, samples_per_shard)


@dataclass(frozen=True)
class BuildLayout:
    """Paths of one build folder; the only place that spells them (curation writes them, ovseg_core reads them)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.json")
    manifest = property(lambda self: self.root / "manifest.json")
    run_record = property(lambda self: self.root / "run.json")  # when, where, with which run-time settings
    ingest_dir = property(lambda self: self.root / "ingest")
    rejects_dir = property(lambda self: self.root / "rejects")
    captions_dir = property(lambda self: self.root / "captions")
    selected_dir = property(lambda self: self.root / "selected")
    staging_dir = property(lambda self: self.root / "staging")
    staging_tmp_dir = property(lambda self: self.root / "staging" / "_tmp")  # img2dataset's own scratch folder
    downloads = property(lambda self: self.root / "downloads.parquet")
    duplicates = property(lambda self: self.root / "duplicates.parquet")
    kept = property(lambda self: self.root / "kept.parquet")
    dedup_hashes = property(lambda self: self.root / "dedup_hashes.parquet")
    index_dir = property(lambda self: self.root / "index")
    entity_index = property(lambda self: self.root / "index" / "entity_index.parquet")
    partners = property(lambda self: self.root / "index" / "partners.parquet")
    cooccurrence = property(lambda self: self.root / "index" / "cooccurrence.parquet")
    locator = property(lambda self: self.root / "index" / "locator.parquet")
    shards_dir = property(lambda self: self.root / "shards")
    meta_dir = property(lambda self: self.root / "meta")
    report_dir = property(lambda self: self.root / "report")

    def parts(self, directory: Path) -> list[Path]:
        """Finished parquet parts of a stage folder, in order (temporary files are hidden dot-files)."""
        return sorted(Path(directory).glob(PART_GLOB))

    def shards(self) -> list[Path]:
        return sorted(self.shards_dir.glob(SHARD_GLOB))
