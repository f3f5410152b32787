"""replit_tools/corpus.py: the definitions moved to column 0 that the demo's second training stage reads, and the
packages' sources it can train on."""

import ast
import json
import subprocess
import zipfile

import pytest

from replit_tools import corpus
from replit_tools.corpus import definition_documents, definitions

SOURCE = '''import os


class Stack:
    """A stack."""

    def __init__(self):
        self.items = []

    @property
    def top(self):
        text = """
a string whose lines
  are not indented like the code
"""
        return self.items[-1], text


def outer(a):
    def inner(b):
        return b

    return inner(a)
'''


def test_definitions_are_moved_to_column_0_and_parse(tmp_path):
    path = tmp_path / "module.py"
    path.write_text(SOURCE)
    found = definitions(path)
    assert all(text.startswith(("def ", "class ", "@")) for text in found)
    assert all(ast.parse(text) for text in found)
    assert "def __init__(self):\n    self.items = []\n" in found
    assert "def inner(b):\n    return b\n" in found
    top = next(text for text in found if text.startswith("@property"))
    assert "a string whose lines\n  are not indented like the code\n" in top  # strings are left as they are
    assert top.endswith("    return self.items[-1], text\n")
    assert any(text.startswith("class Stack:") for text in found)
    assert not any(text.startswith("class") for text in definitions(path, classes=False))


def test_definition_documents_leave_out_duplicates_and_the_excluded_files(tmp_path):
    first, second, held_out = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "held_out.py"
    first.write_text("def f():\n    return 1\n\n\ndef g():\n    return 2\n")
    second.write_text("class C:\n    def f():\n        return 1\n")
    held_out.write_text("def g():\n    return 2\n")
    documents = definition_documents([first, second], exclude_files=[held_out])
    assert documents == ["def f():\n    return 1\n", "class C:\n    def f():\n        return 1\n"]


def test_definitions_without_docstrings(tmp_path):
    path = tmp_path / "module.py"
    path.write_text(
        'def f(a):\n    """Doc\n    string."""\n    return a\n\n\n'
        'def only_doc():\n    """Nothing else."""\n\n\n'
        'def g():\n    return 1\n'
    )
    # A docstring on lines of its own, followed by code, is taken out; a docstring that is the whole body stays.
    assert definitions(path, docstrings=False) == [
        "def f(a):\n    return a\n",
        'def only_doc():\n    """Nothing else."""\n',
        "def g():\n    return 1\n",
    ]


def make_wheel(folder, name, version, license_line, files):
    """A wheel as pip downloads one: the package's files and a METADATA with its licence."""
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
        archive.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n{license_line}\n")
    return wheel


def test_a_wheels_python_sources_are_unpacked_and_nothing_else(tmp_path):
    big = "x = 1\n" * (corpus.MAX_FILE_BYTES // 6 + 1)
    files = {"pkg/__init__.py": "A = 1\n", "pkg/sub/mod.py": "def f():\n    return 2\n", "pkg/data.txt": "text",
             "pkg/huge.py": big}  # fmt: skip
    wheel = make_wheel(tmp_path, "pkg", "1.0", "License-Expression: MIT", files)
    unpacked = corpus.unpack_wheel_sources(wheel, tmp_path / "out")
    assert [path.relative_to(tmp_path / "out").as_posix() for path in unpacked] == ["pkg/__init__.py", "pkg/sub/mod.py"]
    assert unpacked[1].read_text() == files["pkg/sub/mod.py"]


@pytest.mark.parametrize("license_line", ["License-Expression: GPL-3.0-only",
                                          "Classifier: License :: OSI Approved :: GNU General Public License (GPL)",
                                          ""])  # fmt: skip
def test_a_wheel_without_a_permissive_licence_is_refused(tmp_path, license_line):
    wheel = make_wheel(tmp_path, "pkg", "1.0", license_line, {"pkg/__init__.py": "A = 1\n"})
    with pytest.raises(ValueError, match="pkg-1.0-py3-none-any.whl: licence"):
        corpus.unpack_wheel_sources(wheel, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_no_wheel_is_named(tmp_path):
    with zipfile.ZipFile(tmp_path / "pkg-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr("pkg/__init__.py", "A = 1\n")
    with pytest.raises(ValueError, match="pkg-1.0-py3-none-any.whl: not a wheel"):
        corpus.unpack_wheel_sources(tmp_path / "pkg-1.0-py3-none-any.whl", tmp_path / "out")
    (tmp_path / "broken.whl").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="broken.whl: not a wheel"):
        corpus.unpack_wheel_sources(tmp_path / "broken.whl", tmp_path / "out")


def test_package_sources_downloads_each_pinned_wheel_once(tmp_path, monkeypatch):
    calls = []

    def pip_download(command, check):
        calls.append(command)
        make_wheel(tmp_path, "more_things", "2.1", "Classifier: License :: OSI Approved :: BSD License",
                   {"more_things/a.py": "B = 2\n"})  # fmt: skip

    monkeypatch.setattr(subprocess, "run", pip_download)
    packages = [dict(name="more-things", version="2.1", license="BSD-3-Clause")]
    first = corpus.package_sources(tmp_path, packages)
    again = corpus.package_sources(tmp_path, packages)
    assert first == again == [tmp_path / "more-things==2.1" / "more_things" / "a.py"]
    assert len(calls) == 1 and calls[0][-1] == "more-things==2.1" and "--no-deps" in calls[0]


def test_the_pinned_packages_are_permissive_and_pinned():
    packages = json.loads(corpus.PACKAGE_LIST.read_text())
    assert packages and all(set(p) == {"name", "version", "license"} for p in packages)
    assert all(any(name in p["license"] for name in corpus.PERMISSIVE_LICENSES) for p in packages)
