"""cc4m curation: CC12M captions -> entities -> selected samples -> images -> CC4M shards + co-occurrence index.

Stage map (one module per stage; each stage reads the previous stage's files of one build folder, whose paths are
`manifests.layout`; the order is `manifests.stages`, bound to these functions in `curation.stages`):
    ingest    source -> ingest/ parts + rejects/ (sample_id = source row number; `source`: a TSV/parquet or shards)
    parse     ingest/ part -> captions/ part (spaCy entity rule, `entities`)
    select    captions/ part -> selected/ part (>= 1 of the 73 classes)
    download  selected/ -> staging/ (img2dataset, or extracted from the source's shards) -> downloads.parquet
    verify    downloads.parquet -> success-rate gate
    dedup     exact (sha256) and near (perceptual hash, faiss) duplicates -> duplicates.parquet, kept.parquet
    index     kept.parquet -> entity_index, partners, cooccurrence
    reshard   kept + staging -> shards/ + meta/ + index/locator.parquet
    manifest  manifest.json (manifests/schema.py)
    report    Markdown/HTML with plots (stats: the DuckDB views and statistics it uses)

This package never imports Prefect: `build.run_build` runs the plan in this process, `flows/build.py` as tasks.
"""
