"""The `cc4m` command-line tool: a thin front over the curation/ovseg_core libraries and the flows.

Each subcommand lives next to the code it fronts (`add_<name>_arguments` + `cli_<name>` in that module); this file
only routes. A subcommand's module is imported when that subcommand runs, so `cc4m --help` does not pay for torch,
spaCy or Prefect imports.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str
    add_arguments: str
    run: str
    help: str


COMMANDS: dict[str, Command] = {
    "parse": Command("curation.parse", "add_parse_arguments", "cli_parse",
                     "parse a CC12M-layout TSV/parquet into sample ids, captions and entity classes (spaCy)"),
    "build": Command("curation.build", "add_build_arguments", "cli_build",
                     "run build-cc4m in this process, without a Prefect server"),
    "verify": Command("curation.manifest", "add_verify_arguments", "cli_verify",
                      "re-check a build's shards and files against its manifest"),
    "stats": Command("curation.stats", "add_stats_arguments", "cli_stats",
                     "entity, co-occurrence and download statistics of a build (DuckDB)"),
    "sql": Command("curation.stats", "add_sql_arguments", "cli_sql",
                   "run SQL over a build's views (samples, entities, partners, cooccurrence, downloads)"),
    "sample": Command("curation.sample.cli", "add_sample_arguments", "cli_sample",
                      "render the embedded sample (captions, images, masks, evaluation set) into a folder"),
    "train": Command("ovseg_core.train.cli", "add_train_arguments", "cli_train",
                     "train OVSegmentor on a CC4M build (CPU in-process; torchrun for several GPUs)"),
    "loader": Command("ovseg_core.data.loader_cli", "add_loader_arguments", "cli_loader",
                      "iterate a stage's training input pipeline (no training); print samples/s and CPU-s per sample"),
    "eval": Command("ovseg_core.evaluation.cli", "add_eval_arguments", "cli_eval",
                    "zero-shot segmentation mIoU of a checkpoint on a VOC/Context/COCO-Object/ADE20K/sample folder"),
    "models": Command("manifests.registry", "add_models_arguments", "cli_models",
                      "list registered checkpoints with their lineage and the champion"),
    "demo": Command("flows.local", "add_demo_arguments", "cli_demo",
                    "the whole DAG on the embedded sample through a local Prefect server and deployments"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cc4m", description="CC4M curation and OVSegmentor pretraining.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        if name == selected:
            module = importlib.import_module(command.module)
            getattr(module, command.add_arguments)(sub)
            sub.set_defaults(func=getattr(module, command.run))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(selected if selected in COMMANDS else None).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
