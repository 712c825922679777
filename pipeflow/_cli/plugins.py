"""``pipeflow plugins``: the stages installed packages publish."""

from __future__ import annotations

import argparse
import json

from .errors import EXIT_OK, one_line


def cmd_plugins(args: argparse.Namespace) -> int:
    from .._plugins import GROUP, discover_stages, summary

    rows: list[dict[str, str]] = []
    for name, ep in discover_stages().items():
        try:
            text = summary(ep.load())
        except (Exception, SystemExit) as exc:  # one broken plugin must not hide the others
            text = f"(cannot load: {type(exc).__name__}: {one_line(str(exc))})"
        dist = ep.dist
        package = f"{dist.name} {dist.version}" if dist is not None else ""
        rows.append({"name": name, "target": ep.value, "package": package, "summary": text})
    if args.format == "json":
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print(f"no stage plugins installed (entry-point group {GROUP!r})")
        return EXIT_OK
    cols = ("name", "target", "package", "summary")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols[:-1]}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols[:-1]) + "  SUMMARY")
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols[:-1]) + "  " + r["summary"])
    return EXIT_OK
