"""The demo's data: the running Python's standard library (freely licensed, present on every machine), split by
file into train and held-out parts, for the demo's training (demo.py) and its evaluation (evaluation.py)."""

import sysconfig
import zlib
from pathlib import Path

HELD_OUT_PERCENT = 5


def stdlib_sources() -> tuple[list[Path], list[Path]]:
    """The .py files of the running Python's standard library, split by a hash of their path into train and
    held-out (the split does not depend on the order files are found in)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.stat().st_size < 500_000)
    train, held_out = [], []
    for path in files:
        bucket = zlib.crc32(str(path.relative_to(stdlib)).encode()) % 100
        (held_out if bucket < HELD_OUT_PERCENT else train).append(path)
    return train, held_out


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")
