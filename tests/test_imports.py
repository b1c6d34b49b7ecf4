"""The plan path must stay light: no torch, transformers or pandas."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from lora_planner.cli import main
try:
    main(["--model", "70b", "--rank", "8"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
heavy = sorted(m for m in ("torch", "transformers", "pandas", "numpy", "safetensors", "tabulate")
               if m in sys.modules)
print("HEAVY", heavy)
"""


def test_plan_imports_no_heavy_modules():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY []"
    assert "llama-3.1-70b" in out
