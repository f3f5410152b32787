"""The demo's data: the running Python's standard library (freely licensed, present on every machine), split by
file into train and held-out parts, for the demo's training (demo.py) and its evaluation (evaluation.py); the
sources of permissively licensed packages from the package index (demo_packages.json), for training only; and the
training files' functions, methods and classes moved to column 0 as documents of their own (demo.py's second
stage)."""

import ast
import email
import io
import subprocess
import sys
import sysconfig
import zipfile
import zlib
from pathlib import Path

HELD_OUT_PERCENT = 5
MAX_FILE_BYTES = 500_000
PACKAGE_LIST = Path(__file__).with_name("demo_packages.json")
PERMISSIVE_LICENSES = ("MIT", "BSD", "Apache")


def stdlib_sources() -> tuple[list[Path], list[Path]]:
    """The .py files of the running Python's standard library, split by a hash of their path into train and
    held-out (the split does not depend on the order files are found in)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.stat().st_size < MAX_FILE_BYTES
    )
    train, held_out = [], []
    for path in files:
        bucket = zlib.crc32(str(path.relative_to(stdlib)).encode()) % 100
        (held_out if bucket < HELD_OUT_PERCENT else train).append(path)
    return train, held_out


def wheel_license(wheel: Path) -> str:
    """The licence a wheel's metadata declares: its License-Expression, else License, else its licence classifiers."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            metadata = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
            fields = metadata and email.message_from_bytes(archive.read(metadata))
    except zipfile.BadZipFile as error:
        raise ValueError(f"{wheel.name}: not a wheel ({error})") from None
    if fields is None:
        raise ValueError(f"{wheel.name}: not a wheel (no .dist-info/METADATA)")
    classifiers = [c.rsplit(" :: ", 1)[-1] for c in fields.get_all("Classifier") or [] if c.startswith("License ::")]
    return fields.get("License-Expression") or fields.get("License") or "; ".join(classifiers)


def unpack_wheel_sources(wheel: Path, out: Path) -> list[Path]:
    """The .py files of a wheel (under MAX_FILE_BYTES, as for the standard library), unpacked under `out`. A wheel
    whose licence is not permissive (MIT, BSD, Apache) is refused: the demo's weights are published with this
    repository."""
    license_ = wheel_license(wheel)
    if not any(name in license_ for name in PERMISSIVE_LICENSES):
        raise ValueError(f"{wheel.name}: licence {license_!r} is not one of {', '.join(PERMISSIVE_LICENSES)}")
    with zipfile.ZipFile(wheel) as archive:
        members = [i for i in archive.infolist() if i.filename.endswith(".py") and i.file_size < MAX_FILE_BYTES]
        for member in members:
            archive.extract(member, out)
    return sorted(out / member.filename for member in members)


def package_sources(cache: Path, packages: list[dict]) -> list[Path]:
    """The sources of pinned packages (demo_packages.json's entries: name, version, licence), each wheel downloaded
    once into `cache` with pip and unpacked beside it; every file goes to training (the held-out files stay the
    standard library's, so that evaluations of every build compare)."""
    files = []
    for package in packages:
        pin = f"{package['name']}=={package['version']}"
        pattern = f"{package['name'].lower().replace('-', '_')}-{package['version']}-*.whl"  # wheels' file names
        if not any(cache.glob(pattern)):
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", cache, pin]
            subprocess.run(pip, check=True)
        wheels = sorted(cache.glob(pattern))
        if not wheels:
            raise FileNotFoundError(f"pip downloaded no wheel of {pin} into {cache}")
        files += unpack_wheel_sources(wheels[0], cache / pin)
    return files


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def definitions(path: Path, classes: bool = True, docstrings: bool = True) -> list[str]:
    """Each function and method (and with `classes`, each class) of a file, nested ones too, moved to column 0: its
    text from its first decorator to its last line, with the `def` line's indentation taken off every line that
    starts with it (lines inside a multi-line string that do not are left as they are). Only those that parse once
    moved; a file that does not parse gives none. Without `docstrings`, each function that has a docstring on lines
    of its own, followed by more code, comes without it."""
    source = read_text(path)
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = io.StringIO(source, newline="").readlines()  # as ast numbers lines (not str.splitlines)
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, *((ast.ClassDef,) if classes else ()))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, kinds):
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        text = lines[first - 1 : node.end_lineno]
        body = node.body
        if (
            not docstrings
            and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and len(body) > 1
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
            and body[0].lineno > node.lineno
            and body[1].lineno > body[0].end_lineno
        ):
            text = text[: body[0].lineno - first] + text[body[0].end_lineno - first + 1 :]
        indent = text[0][: len(text[0]) - len(text[0].lstrip(" \t"))]
        moved = "".join(line[len(indent) :] if line.startswith(indent) else line for line in text)
        if not moved.endswith("\n"):
            moved += "\n"
        try:
            ast.parse(moved)
        except (SyntaxError, ValueError):
            continue
        found.append(moved)
    return found


def definition_documents(files: list[Path], exclude_files: list[Path] = (), docstrings: bool = True) -> list[str]:
    """`definitions` of `files` as training documents, in file order, without exact duplicates and without any
    definition that also occurs in `exclude_files` (the held-out files: the same function, copied between files,
    would otherwise be trained on)."""
    seen = {text for path in exclude_files for text in definitions(path, docstrings=docstrings)}
    documents = []
    for path in files:
        for text in definitions(path, docstrings=docstrings):
            if text not in seen:
                seen.add(text)
                documents.append(text)
    return documents
