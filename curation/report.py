"""Build report: report/index.html + report/report.md with SVG plots (entity histogram, class co-occurrence heatmap,
download outcomes) and count tables (manifest.json's stage counts when present, else counted from the files).

`report_markdown(build_dir)` returns the Markdown alone, for the flow to publish as a Prefect artifact.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from curation import svgplot
from curation.io import read_json, sha256_file, write_bytes_atomic
from manifests.layout import BuildLayout
from manifests.vocabulary import load_vocabulary

PLOTS = {
    "entity_histogram.svg": "Written samples per class",
    "cooccurrence_heatmap.svg": "Class co-occurrence (log scale; diagonal = class frequency)",
    "download_outcomes.svg": "Download outcomes",
}
# Plots of reports written before they were SVG: removed when the report is rewritten.
OLD_PLOTS = ("entity_histogram.png", "cooccurrence_heatmap.png", "download_outcomes.png")
HISTOGRAM_BLUE, SUCCESS_GREEN, FAILURE_RED = "#3b75af", "#4c9a2a", "#c0392b"
MANIFEST_COUNT_KEYS = ("stage_results", "stages", "counts")
# Every failed download by class: blocked_scheme/blocked_address (the address guard), too_large/too_many_pixels
# (caps), http_404, timeout, ...; `transient` ones are fetched again by a rebuild with download.retry_transient.
DOWNLOAD_REASONS_SQL = (
    "SELECT coalesce(reason, status) AS reason, CASE WHEN transient THEN 'transient' ELSE 'permanent' END AS kind, "
    "count(*) AS samples, max(attempts) AS max_attempts FROM downloads WHERE status <> 'success' "
    "GROUP BY ALL ORDER BY samples DESC, reason"
)


Table = tuple[str, list[str], list[tuple[Any, ...]]]  # title, columns, rows


def _class_order(observed: list[str]) -> list[str]:
    vocab = list(load_vocabulary().classes)
    return vocab + sorted(set(observed) - set(vocab))


def _collect(build_dir: Path) -> dict[str, Any]:
    """Everything the report shows, read once through the DuckDB views."""
    # DuckDB is imported here, not with the module: a rerun whose report is current never loads it
    from curation.stats import READY_QUERIES, connect, view_names

    con = connect(build_dir)
    try:
        views = view_names(con)

        def q(sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
            cursor = con.execute(sql)
            return [d[0] for d in cursor.description], cursor.fetchall()

        data: dict[str, Any] = {"views": views}
        data["rows"] = [(v, con.execute(f"SELECT count(*) FROM {v}").fetchone()[0]) for v in sorted(views)]
        if "entities" in views:
            data["entity_source"] = "written samples"
            data["frequency"] = dict(q(READY_QUERIES["entity_frequency"])[1])
        elif "captions" in views:
            data["entity_source"] = "captions (no samples written yet)"
            data["frequency"] = dict(q(READY_QUERIES["captions_per_class"])[1])
        if "cooccurrence" in views:
            data["cooccurrence"] = q("SELECT class_a, class_b, count FROM cooccurrence")[1]
            data["top_pairs"] = q(READY_QUERIES["top_cooccurring_pairs"])
        if "downloads" in views:
            data["outcomes"] = q(READY_QUERIES["download_outcomes"])
            data["errors"] = q(READY_QUERIES["download_errors"])
            columns = {row[0] for row in con.execute("DESCRIBE downloads").fetchall()}
            if {"reason", "transient"} <= columns:  # failure classes (curation.fetch); older builds lack them
                data["failure_reasons"] = q(DOWNLOAD_REASONS_SQL)
        if "duplicates" in views:
            data["duplicates"] = q(READY_QUERIES["duplicates_by_kind"])
        if "rejects" in views:
            data["rejects"] = q(READY_QUERIES["rejects_by_reason"])
        if {"partners", "entities"} <= views:
            data["partners"] = q(READY_QUERIES["partners_per_sample"])
        return data
    finally:
        con.close()


def _manifest_counts(layout: BuildLayout) -> list[tuple[Any, ...]] | None:
    if not layout.manifest.exists():
        return None
    manifest = read_json(layout.manifest)
    section = next((manifest[k] for k in MANIFEST_COUNT_KEYS if isinstance(manifest.get(k), dict)), None)
    if section is None:
        return None
    rows: list[tuple[Any, ...]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                walk(f"{prefix}.{key}" if prefix else str(key), value[key])
        elif isinstance(value, list):
            rows.append((prefix, f"{len(value)} items"))
        else:
            rows.append((prefix, value))

    walk("", section)
    return rows


def _tables(layout: BuildLayout, data: dict[str, Any]) -> list[Table]:
    tables: list[Table] = []
    manifest_rows = _manifest_counts(layout)
    if manifest_rows is not None:
        tables.append(("Stage counts (manifest.json)", ["count", "value"], manifest_rows))
    tables.append(("Rows per file (counted from the build)", ["view", "rows"], data["rows"]))
    for key, title in [
        ("outcomes", "Download outcomes"),
        ("failure_reasons", "Download failures by reason"),
        ("errors", "Download errors"),
        ("duplicates", "Duplicates"),
        ("rejects", "Rejected source rows"),
        ("partners", "Partners per sample"),
        ("top_pairs", "Top co-occurring class pairs"),
    ]:
        if key in data:
            columns, rows = data[key]
            tables.append((title, columns, rows))
    if "frequency" in data:
        tables.append(
            (
                f"Class frequencies ({data['entity_source']})",
                ["class", "samples"],
                sorted(data["frequency"].items(), key=lambda kv: (-kv[1], kv[0])),
            )
        )
    return tables


# ------------------------------------------------------------------------------------------------------------ plots
def _plots(data: dict[str, Any]) -> dict[str, bytes]:
    svgs: dict[str, bytes] = {}
    freq: dict[str, int] = data.get("frequency", {})
    classes = _class_order(list(freq))
    if freq or "entities" in data["views"]:
        svgs["entity_histogram.svg"] = svgplot.bar_chart(
            classes, [freq.get(c, 0) for c in classes],
            f"Samples per class ({data.get('entity_source', 'written samples')})", "samples", HISTOGRAM_BLUE)
    if "cooccurrence" in data:
        pos = {c: i for i, c in enumerate(classes)}
        matrix = np.zeros((len(classes), len(classes)))
        for a, b, count in data["cooccurrence"]:
            if a in pos and b in pos:
                matrix[pos[a], pos[b]] = matrix[pos[b], pos[a]] = count
        for c, count in freq.items():
            matrix[pos[c], pos[c]] = count
        svgs["cooccurrence_heatmap.svg"] = svgplot.heatmap(
            classes, np.log10(1 + matrix), "Class co-occurrence", "log10(1 + samples with both classes)")
    if "outcomes" in data:
        _, rows = data["outcomes"]
        labels = [str(r[0]) for r in rows]
        svgs["download_outcomes.svg"] = svgplot.hbar_chart(
            labels, [r[1] for r in rows], [SUCCESS_GREEN if label == "success" else FAILURE_RED for label in labels],
            "Download outcomes", "selected samples")
    return svgs


# --------------------------------------------------------------------------------------------------------- renderers
def _md_cell(v: Any) -> str:
    text = f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(build_dir: Path, tables: list[Table], plots: list[str]) -> str:
    out = ["# cc4m build report", "", f"Build: `{build_dir.resolve()}`", ""]
    for name in plots:
        out += [f"![{PLOTS[name]}]({name})", ""]
    for title, columns, rows in tables:
        out += [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)


def _html(build_dir: Path, tables: list[Table], plots: list[str]) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cc4m build report</title>",
        (
            "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:0 0 "
            "1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}th{background:#eee}img{max-width:100%}"
            "</style></head><body>"
        ),
        f"<h1>cc4m build report</h1><p>Build: <code>{esc(str(build_dir.resolve()))}</code></p>",
    ]
    for name in plots:
        parts.append(f"<h2>{esc(PLOTS[name])}</h2><img src='{esc(name)}' alt='{esc(PLOTS[name])}'>")
    for title, columns, rows in tables:
        parts.append(f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(_md_cell(v))}</td>" for v in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def report_markdown(build_dir: str | Path) -> str:
    """The report as Markdown (image links are relative to report/), without writing anything."""
    build = Path(build_dir)
    layout = BuildLayout(build)
    data = _collect(build)
    plots = [name for name in PLOTS if (layout.report_dir / name).exists()]
    return _markdown(build, _tables(layout, data), plots)


REPORT_RECORD = "report.json"


def _report_current(layout: BuildLayout) -> bool:
    """The report was made from the manifest that is there now (so a rerun or a copied build rewrites nothing)."""
    record = layout.report_dir / REPORT_RECORD
    if not (record.exists() and layout.manifest.exists() and (layout.report_dir / "index.html").exists()
            and (layout.report_dir / "report.md").exists()):
        return False
    return json.loads(record.read_text()).get("manifest_sha256") == sha256_file(layout.manifest)


def write_report(build_dir: str | Path) -> Path:
    """Write report/index.html, report/report.md and the SVG plots; return the HTML path. Redone whenever the
    build's manifest.json is not the one the report was made from (report/report.json records its sha256)."""
    build = Path(build_dir)
    layout = BuildLayout(build)
    if _report_current(layout):
        return layout.report_dir / "index.html"
    data = _collect(build)
    svgs = _plots(data)
    for name, svg in svgs.items():
        write_bytes_atomic(layout.report_dir / name, svg)
    for stale in (set(PLOTS) - set(svgs)) | set(OLD_PLOTS):  # a plot whose data is gone must not survive
        (layout.report_dir / stale).unlink(missing_ok=True)
    plots = [name for name in PLOTS if name in svgs]
    tables = _tables(layout, data)
    write_bytes_atomic(layout.report_dir / "report.md", _markdown(build, tables, plots).encode("utf-8"))
    html = write_bytes_atomic(layout.report_dir / "index.html", _html(build, tables, plots).encode("utf-8"))
    if layout.manifest.exists():  # last: the record says the whole report is done
        write_bytes_atomic(layout.report_dir / REPORT_RECORD,
                           json.dumps({"manifest_sha256": sha256_file(layout.manifest)}).encode())
    return html
