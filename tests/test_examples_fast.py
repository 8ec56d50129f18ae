"""The CPU examples that run in seconds, end to end as a user runs them (fast: not marked slow)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bottleneck_plain_module_example_lowers_the_held_out_loss():
    example = ROOT / "examples" / "bottleneck_adapter_plain_module.py"
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"before adapter ([\d.]+) -> after ([\d.]+)", result.stdout)
    assert match, f"no 'before adapter ... -> after ...' line in:\n{result.stdout}"
    before, after = map(float, match.groups())
    assert after < before, result.stdout
    assert "base model restored exactly" in result.stdout
