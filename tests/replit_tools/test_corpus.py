"""replit_tools/corpus.py: the definitions moved to column 0 that the demo's second training stage reads."""

import ast

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
