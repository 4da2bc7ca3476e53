"""DuckDB views over one build, text statistics, and the `cc4m stats` / `cc4m sql` command functions.

Every file of the build layout becomes a view (only the files that exist): captions, selected, rejects, downloads,
duplicates, kept, meta, entity_index, partners, cooccurrence, locator; plus two derived views:
    samples   written samples (meta + caption url), or, before reshard, every caption with its selection, download
              and dedup outcome (selected, download_status, kept)
    entities  (sample_id, class): one row per sample and class of the written samples (meta, else kept.parquet)
Views read the parquet files in place (absolute paths), so `views.sql` can be pasted into any duckdb session.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import duckdb

from curation.io import write_bytes_atomic
from manifests.layout import BuildLayout

READY_QUERIES: dict[str, str] = {
    "entity_frequency": "SELECT class, count(*) AS samples FROM entities GROUP BY class ORDER BY samples DESC, class",
    "top_cooccurring_pairs": "SELECT class_a, class_b, count FROM cooccurrence ORDER BY count DESC, class_a, class_b "
    "LIMIT 20",
    "download_outcomes": "SELECT status, count(*) AS samples FROM downloads GROUP BY status ORDER BY samples DESC",
    "download_errors": "SELECT coalesce(error_message, '(none)') AS error, count(*) AS samples FROM downloads "
    "WHERE status <> 'success' GROUP BY error ORDER BY samples DESC LIMIT 20",
    "captions_per_class": "SELECT class, count(*) AS captions FROM (SELECT unnest(entities) AS class FROM captions) "
    "GROUP BY class ORDER BY captions DESC, class",
    "duplicates_by_kind": "SELECT kind, count(*) AS samples, avg(distance) AS mean_distance, max(distance) AS "
    "max_distance FROM duplicates GROUP BY kind ORDER BY kind",
    "rejects_by_reason": "SELECT reason, count(*) AS rows FROM rejects GROUP BY reason ORDER BY rows DESC",
    "partners_per_sample": "SELECT n_partners, count(*) AS samples FROM (SELECT e.sample_id, count(p.partner_id) AS "
    "n_partners FROM (SELECT DISTINCT sample_id FROM entities) e LEFT JOIN partners p USING (sample_id) "
    "GROUP BY e.sample_id) GROUP BY n_partners ORDER BY n_partners",
    "samples_per_shard": "SELECT shard, count(*) AS samples FROM meta GROUP BY shard ORDER BY shard",
    "classes_per_sample": "SELECT len(entities) AS n_classes, count(*) AS samples FROM kept GROUP BY n_classes "
    "ORDER BY n_classes",
}


def _quote(path: Path) -> str:
    return "'" + str(Path(path).resolve()).replace("'", "''") + "'"


def _parts(layout: BuildLayout, directory: Path) -> str | None:
    if not layout.parts(directory):
        return None
    return f"read_parquet({_quote(directory)[:-1]}/part-*.parquet', union_by_name = true)"


def _file(path: Path) -> str | None:
    return f"read_parquet({_quote(path)})" if path.exists() else None


def view_statements(build_dir: str | Path) -> list[str]:
    """CREATE VIEW statements for the files present in the build, in dependency order."""
    layout = BuildLayout(Path(build_dir))
    sources = {
        "ingest": _parts(layout, layout.ingest_dir),
        "rejects": _parts(layout, layout.rejects_dir),
        "captions": _parts(layout, layout.captions_dir),
        "selected": _parts(layout, layout.selected_dir),
        "downloads": _file(layout.downloads),
        "duplicates": _file(layout.duplicates),
        "kept": _file(layout.kept),
        "meta": _parts(layout, layout.meta_dir),
        "entity_index": _file(layout.entity_index),
        "partners": _file(layout.partners),
        "cooccurrence": _file(layout.cooccurrence),
        "locator": _file(layout.locator),
    }
    present = {name for name, source in sources.items() if source}
    statements = [
        f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM {source};" for name, source in sources.items() if source
    ]
    if "meta" in present:
        url = ", c.url" if "captions" in present else ""
        join = " LEFT JOIN captions c USING (sample_id)" if "captions" in present else ""
        statements.append(f"CREATE OR REPLACE VIEW samples AS SELECT m.*{url} FROM meta m{join};")
    elif "captions" in present:
        cols, joins = [], []
        for name, column, expr in [
            ("selected", "selected", "s.sample_id IS NOT NULL"),
            ("downloads", "download_status", "d.status"),
            ("kept", "kept", "k.sample_id IS NOT NULL"),
        ]:
            if name in present:
                alias = expr[0]
                cols.append(f"{expr} AS {column}")
                pick = "sample_id, status" if name == "downloads" else "sample_id"
                joins.append(f" LEFT JOIN (SELECT {pick} FROM {name}) {alias} USING (sample_id)")
        extra = "".join(", " + c for c in cols)
        statements.append(f"CREATE OR REPLACE VIEW samples AS SELECT c.*{extra} FROM captions c{''.join(joins)};")
    written = "meta" if "meta" in present else "kept" if "kept" in present else None
    if written:
        statements.append(
            f"CREATE OR REPLACE VIEW entities AS SELECT sample_id, unnest(entities) AS class FROM {written};"
        )
    return statements


def connect(build_dir: str | Path, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the build's views (see the module docstring)."""
    build = Path(build_dir)
    if not build.is_dir():
        raise FileNotFoundError(f"no build folder at {build}")
    con = duckdb.connect(database)
    for statement in view_statements(build):
        con.execute(statement)
    return con


def view_names(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {row[0] for row in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}


def run_sql(build_dir: str | Path, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one query against the build's views: (column names, rows)."""
    con = connect(build_dir)
    try:
        cursor = con.execute(query)
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()
    finally:
        con.close()


def format_table(columns: list[str], rows: list[tuple[Any, ...]], max_rows: int | None = None) -> str:
    """Plain fixed-width text table."""
    shown = rows if max_rows is None else rows[:max_rows]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "NULL" if v is None else str(v)

    body = [[cell(v) for v in row] for row in shown]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in body]
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more rows")
    return "\n".join(lines)


STATS_SECTIONS: list[tuple[str, str, set[str]]] = [
    ("Entity frequencies (written samples)", READY_QUERIES["entity_frequency"], {"entities"}),
    ("Top co-occurring class pairs", READY_QUERIES["top_cooccurring_pairs"], {"cooccurrence"}),
    ("Download outcomes", READY_QUERIES["download_outcomes"], {"downloads"}),
    ("Download errors", READY_QUERIES["download_errors"], {"downloads"}),
    ("Captions per class (before download)", READY_QUERIES["captions_per_class"], {"captions"}),
    ("Duplicates", READY_QUERIES["duplicates_by_kind"], {"duplicates"}),
    ("Rejected source rows", READY_QUERIES["rejects_by_reason"], {"rejects"}),
    ("Partners per sample", READY_QUERIES["partners_per_sample"], {"partners", "entities"}),
]


def stats_text(build_dir: str | Path) -> str:
    """Human-readable statistics of whatever stages the build has finished."""
    con = connect(build_dir)
    try:
        views = view_names(con)
        out = [f"cc4m build {Path(build_dir).resolve()}", "", "Rows per view"]
        counted = sorted(views)
        rows = [(v, con.execute(f"SELECT count(*) FROM {v}").fetchone()[0]) for v in counted]
        out += [format_table(["view", "rows"], rows), ""]
        for title, query, needs in STATS_SECTIONS:
            if not needs <= views:
                continue
            cursor = con.execute(query)
            columns = [d[0] for d in cursor.description]
            out += [title, format_table(columns, cursor.fetchall(), max_rows=80), ""]
        return "\n".join(out)
    finally:
        con.close()


def write_views_sql(build_dir: str | Path) -> Path:
    """<build>/views.sql: the view definitions, for `duckdb -init <build>/views.sql`."""
    build = Path(build_dir)
    text = "-- cc4m build views: duckdb -init " + str(build.resolve() / "views.sql") + "\n"
    text += "\n".join(view_statements(build)) + "\n"
    return write_bytes_atomic(build / "views.sql", text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------- the CLI
def add_stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("build_dir", type=Path, help="build folder")


def cli_stats(args: argparse.Namespace) -> int:
    try:
        print(stats_text(args.build_dir))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_sql_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("build_dir", type=Path, help="build folder")
    p.add_argument("query", nargs="?", help="SQL over the views; without it, write and print the view definitions")
    p.add_argument("--ready", choices=sorted(READY_QUERIES), help="run one of the ready-made queries")
    p.add_argument("--list-ready", action="store_true", help="print the ready-made queries")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--max-rows", type=int, default=200, help="rows printed in table format")


def cli_sql(args: argparse.Namespace) -> int:
    if args.list_ready:
        for name, query in READY_QUERIES.items():
            print(f"{name}:\n  {query}\n")
        return 0
    query = READY_QUERIES[args.ready] if args.ready else args.query
    try:
        if not query:
            path = write_views_sql(args.build_dir)
            print("\n".join(view_statements(args.build_dir)))
            print(f"\n-- wrote {path}; open an interactive session with:\n--   duckdb -init {path}")
            return 0
        columns, rows = run_sql(args.build_dir, query)
    except (FileNotFoundError, duckdb.Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    elif args.format == "json":
        print(json.dumps([dict(zip(columns, r)) for r in rows], default=str, indent=2))
    else:
        print(format_table(columns, rows, max_rows=args.max_rows))
    return 0
