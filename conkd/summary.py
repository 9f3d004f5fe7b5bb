"""Print the final accuracies of finished runs: ``python -m conkd.summary RUN_DIR [RUN_DIR ...]``.

Reads the ``metrics.json`` each run writes to its output folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pct(value: float | None) -> str:
    """A percentage, or ``-`` for a run that was not tested (a pruned sweep trial)."""
    return "-" if value is None else f"{value:.2f}"


def summarize(run_dirs: list[str]) -> str:
    rows = [("run", "stage", "best val top1", "test top1", "test top5")]
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            rows.append((d, "missing", "-", "-", "-"))
            continue
        m = json.loads(path.read_text())
        val = next((v for k, v in m.items() if k.startswith("best/val/top1")), float("nan"))
        rows.append(
            (
                m.get("run_name") or d,
                m.get("stage", "?"),
                f"{val:.2f}",
                _pct(m.get("test/top1")),
                _pct(m.get("test/top5")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    print(summarize(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
