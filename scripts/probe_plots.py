"""Redraw each docs/probe/<name>.png from the <name>.json beside it (what `spannorm probe --json` wrote), in the
house style of today's code: the plot is a function of the runs in the JSON alone.

    python scripts/probe_plots.py [docs/probe]
"""

import json
import sys
from pathlib import Path

from spannorm.probe_command import plot_probe

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/probe")
for path in sorted(folder.glob("*.json")):
    plot_probe(json.loads(path.read_text())["runs"], path.with_suffix(".png"))
    print(path.with_suffix(".png"))
