"""cc4m curation: CC12M captions -> entities -> selected samples -> images -> CC4M shards + co-occurrence index.

Stage map (one module per stage; each stage reads the previous stage's files of one build folder, see `layout`):
    ingest    source TSV/parquet -> ingest/ parts + rejects/          (sample_id = source row number)
    parse     ingest/ part -> captions/ part (spaCy entity rule, `entities`)
    select    captions/ part -> selected/ part (>= 1 of the 73 classes)
    download  selected/ -> staging/ (img2dataset) -> downloads.parquet
    verify    downloads.parquet -> success-rate gate
    dedup     exact (sha256) and near (perceptual hash, faiss) duplicates -> duplicates.parquet, kept.parquet
    index     kept.parquet -> entity_index, partners, cooccurrence
    reshard   kept + staging -> shards/ + meta/ + index/locator.parquet
    manifest  manifest.json (manifests/schema.py)
    stats     DuckDB views and statistics; report: Markdown/HTML with plots

This package never imports Prefect; `flows/` orders these stages.
"""
