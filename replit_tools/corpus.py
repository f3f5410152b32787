"""The demo's data: the running Python's standard library (freely licensed, present on every machine), split by
file into train and held-out parts, for the demo's training (demo.py) and its evaluation (evaluation.py); and the
training files' functions, methods and classes moved to column 0 as documents of their own (demo.py's second
stage)."""

import ast
import io
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
