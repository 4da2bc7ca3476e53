"""`cc4m sample`: render the embedded sample (and optionally serve it) from the command line.

    cc4m sample --out DIR [--rows N] [--image-size 64] [--seed 0] [--serve [--port-file F] [--slow-seconds 6]]

Prints the SampleInfo as JSON. With --serve, then serves DIR as the sample proxy until SIGTERM/SIGINT; point the
download stage at it with DownloadConfig(http_proxy=<printed proxy_url>).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from curation.sample.make import SAMPLE_IMAGE_SIZE, make_sample
from curation.sample.server import serve_until_signalled


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="sample folder to create (reused when already complete)")
    p.add_argument("--rows", type=int, default=None, help="only the first N bundled rows (default: all 4000)")
    p.add_argument("--image-size", type=int, default=SAMPLE_IMAGE_SIZE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve", action="store_true", help="then serve the sample as an HTTP proxy until stopped")
    p.add_argument("--port", type=int, default=0, help="with --serve: port (0 = a free one)")
    p.add_argument("--port-file", default=None, help="with --serve: write the port here once listening")
    p.add_argument("--slow-seconds", type=float, default=6.0, help="with --serve: delay of /fail/slow/ URLs")


def cli_sample(args: argparse.Namespace) -> int:
    info = make_sample(args.out, n_rows=args.rows, image_size=args.image_size, seed=args.seed)
    print(json.dumps({k: str(v) if not isinstance(v, int) else v for k, v in asdict(info).items()}, indent=2))
    if not args.serve:
        return 0
    serve_until_signalled(info.root, args.port, args.slow_seconds, args.port_file)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cc4m sample", description=__doc__.splitlines()[0])
    add_sample_arguments(parser)
    return cli_sample(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
