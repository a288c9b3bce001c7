"""``fastkd cache``: inspect, verify or view a soft-label cache."""

from __future__ import annotations

import json
from pathlib import Path

from fastkd.cli.common import _stage
from fastkd.errors import FastkdError


def add_parser(sub) -> None:
    stage = _stage(sub, "cache", "inspect, verify or view a soft-label cache")
    p = stage.add_parser("info", help="cases, shapes, dtype, bytes on disk, compression, provenance, completeness")
    p.add_argument("store", type=Path)
    p.add_argument("--cases", action="store_true", help="also list every case")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cache_info)
    p = stage.add_parser("verify", help="read every chunk: checksums, finite, sums to one, shapes; exit 1 naming bad cases")
    p.add_argument("store", type=Path)
    p.add_argument("--preprocessed", type=Path, default=None,
                   help="folder of the preprocessed <case>.b2nd (default: the one recorded in the cache)")
    p.set_defaults(func=_cache_verify)
    p = stage.add_parser("show", help="PNG of one slice: image, label, soft labels per class")
    p.add_argument("store", type=Path)
    p.add_argument("case")
    p.add_argument("-o", "--output", type=Path, default=None, help="PNG to write (default <case>_softlabels.png)")
    p.add_argument("--axis", type=int, choices=[0, 1, 2], default=2, help="slice perpendicular to this axis (2)")
    p.add_argument("--slice", type=int, default=None, help="slice index (default: most foreground)")
    p.add_argument("--preprocessed", type=Path, default=None, help="folder of the preprocessed <case>.b2nd")
    p.set_defaults(func=_cache_show)


def _cache_info(args) -> None:
    from fastkd.cache import format_info, info

    report = info(args.store)
    print(json.dumps(report, indent=2) if args.json else format_info(report, list_cases=args.cases))


def _cache_verify(args) -> None:
    from fastkd.cache import verify

    problems = verify(args.store, args.preprocessed)
    if problems:
        raise FastkdError(f"{args.store}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    print(f"{args.store}: every chunk of every case read back: checksums, values, sums and shapes OK")


def _cache_show(args) -> None:
    from fastkd.cache import show

    out = args.output or Path(f"{args.case}_softlabels.png")
    show(args.store, args.case, out, args.preprocessed, axis=args.axis, index=args.slice)
    print(f"wrote {out}")
