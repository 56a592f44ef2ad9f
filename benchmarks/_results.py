"""What every benchmark does last: write its JSON results file, and echo it when asked.

The scripts run as `python benchmarks/NAME.py`, so this folder is on sys.path.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict


def write_result(result: Dict, out, echo_json: bool) -> Path:
    """Write `result` to `out` (creating its folder); with `echo_json` print it as the last line."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {out}")
    if echo_json:
        print(json.dumps(result))
    return out
