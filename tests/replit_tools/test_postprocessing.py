"""The card's post-processing on tricky code: stop sequences in strings, comments and leading whitespace, nested
definitions, CRLF, tabs, trailing whitespace, end-of-text; streaming adds up to the same text."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from replit_tools.postprocessing import (
    DEFAULT_STOP_SEQUENCES,
    STOP_EOS,
    STOP_LENGTH,
    STOP_SEQUENCE,
    StopSequenceCriteria,
    StreamingPostprocessor,
    completion_ids,
    finish_completion,
    find_stop,
    truncate,
)

EOS, PAD = 1, 2


class CharTokenizer:
    """One token per character (its code point); 1 is end-of-text and 2 padding, both dropped when decoding."""

    eos_token_id, pad_token_id = EOS, PAD

    def decode(self, ids, skip_special_tokens, clean_up_tokenization_spaces):
        assert skip_special_tokens and not clean_up_tokenization_spaces
        return "".join(chr(i) for i in ids if i not in (EOS, PAD))

    @staticmethod
    def encode(text):
        return [ord(c) for c in text]


def cut(completion, prompt="", stops=DEFAULT_STOP_SEQUENCES):
    return truncate(completion, stops, prompt)[0]


def test_stops_at_the_next_top_level_definition():
    body = "\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)"
    for following in ("\n\ndef main():\n", "\n\nclass Fib:\n", "\n\n@cache\ndef g(): pass", "\n\nasync def h(): ...",
                      '\n\nif __name__ == "__main__":\n', "\n\nprint(fib(10))", "\n\n# Tests\n"):  # fmt: skip
        assert cut(body + following, prompt="def fib(n):") == body, following


def test_nested_definitions_and_indented_code_do_not_stop():
    spaces = "\n    def inner():\n        return 1\n    class Local:\n        pass\n    print(inner())\n    # done"
    tabs = "\n\tdef inner():\n\t\treturn 1\n\t@property\n\tdef x(self): pass\n\tprint(x)"
    assert cut(spaces + "\n\ndef next_one(): pass") == spaces
    assert cut(tabs + "\n") == tabs


def test_a_stop_sequence_in_the_leading_whitespace_does_not_count():
    # The prompt ends with a finished function: the next definition is the completion, up to the one after it.
    completion = "\n\ndef g():\n    return 2\n\n\ndef h():\n    return 3\n"
    assert cut(completion, prompt="def f():\n    return 1\n") == "\n\ndef g():\n    return 2"
    # ... and a user's stop sequence at the very start of the completion does end it (its first character is code).
    assert cut("}\nint main() {}", stops=["}"]) == ""


def test_whitespace_only_completion_is_empty_and_not_a_stop():
    assert truncate(" \n\t\r\n", DEFAULT_STOP_SEQUENCES) == ("", None)


def test_stop_sequences_inside_docstrings_do_not_count():
    docstring = '\n    """Examples:\n\n# Heading\ndef example():\nprint(x)\n    """'
    completion = docstring + "\n    return 1\n\n# Tests\nprint(f())"
    assert cut(completion, prompt="def f():") == completion[: completion.index("\n\n# Tests")]


def test_a_docstring_opened_by_the_prompt_is_known_to_be_open():
    prompt = 'def f():\n    """'
    completion = "Summary.\n\n# Not a stop: still in the docstring\n    '''\n    \"\"\"\n    return 1\n# After"
    assert cut(completion, prompt) == completion[: completion.index("\n# After")]
    # The same text without the prompt opens the docstring itself at the closing quotes: the next "# " is kept.
    assert cut(completion) == completion[: completion.index("\n\n# Not a stop")]


def test_stop_sequences_inside_block_comments_template_literals_and_strings_do_not_count():
    block_comment = "  /* a note:\nclass X {}\n# heading */\n  return 1;\n}"
    template = "  const s = `\ndef not_python():\n`;\n  return s;\n}"
    assert cut(block_comment + "\n\nclass Y {}") == block_comment
    assert cut(template + "\nclass Z {}") == template
    # A user's stop sequence inside a one-line string or a comment is not where the code ends.
    code = '    msg = "return early"  # return if empty\n    return msg\n'
    assert cut(code, stops=["return"]) == code[: code.index("return msg")].rstrip()


def test_line_comments_end_at_their_newline():
    completion = "\n    return 1  # done, 'quote\n\ndef g(): pass"
    assert cut(completion) == "\n    return 1  # done, 'quote"


def test_one_line_strings_end_at_the_line_end_even_unterminated():
    # A Rust lifetime or an apostrophe in text must not hide the rest of the completion from the stop rules.
    completion = "\nfn f<'a>(x: &'a str) {}\n\nclass Next:"
    assert cut(completion) == "\nfn f<'a>(x: &'a str) {}"


def test_c_preprocessor_lines_and_shebangs_do_not_stop():
    c_body = "\n  int x = 0;\n#ifdef DEBUG\n  x = 1;\n#endif\n  return x;\n}"
    assert cut(c_body) == c_body
    assert cut("\n#!/usr/bin/env python\nimport os") == "\n#!/usr/bin/env python\nimport os"


def test_crlf_line_endings():
    body = "\r\n    return 1\r\n"
    assert cut(body + "\r\ndef g():\r\n    pass\r\n") == "\r\n    return 1"
    kept = "\r\n    x = '''\r\n# in a string\r\n'''\r\n    return x"
    assert cut(kept + "\r\n\r\n# cut") == kept


def test_trailing_whitespace_and_tabs_are_removed_leading_kept():
    assert cut("\n\tif x:\n\t\treturn 1 \t\n\t\n  \n") == "\n\tif x:\n\t\treturn 1"
    assert cut("  x = 1\t \r\n") == "  x = 1"


def test_earliest_stop_sequence_wins_and_is_reported():
    completion = "\n    return 1\nprint(1)\ndef g(): pass"
    assert find_stop(completion, DEFAULT_STOP_SEQUENCES).sequence == "\nprint("
    text, stop = truncate(completion, ["\ndef ", "\nprint("])
    assert (text, stop.index, stop.sequence) == ("\n    return 1", 13, "\nprint(")


def test_completion_ids_stop_at_eos_drop_padding_and_bound_the_budget():
    assert completion_ids(CharTokenizer(), [65, 66, EOS, 67, PAD]) == [65, 66, EOS]
    assert completion_ids(CharTokenizer(), torch.tensor([65, 66, PAD, PAD])) == [65, 66]
    assert completion_ids(CharTokenizer(), [65, 66, 67, EOS], max_new_tokens=2) == [65, 66]


def test_finish_completion_reasons():
    tokenizer = CharTokenizer()
    eos = finish_completion(tokenizer, tokenizer.encode("\n    return 1  \n") + [EOS, PAD, PAD])
    assert (eos.text, eos.stop_reason, eos.stop_sequence) == ("\n    return 1", STOP_EOS, None)
    assert eos.completion_tokens == 17  # the end-of-text token counts, the padding after it does not
    stop = finish_completion(tokenizer, tokenizer.encode("\n    return 1\n\ndef g"), prompt="def f():")
    assert (stop.text, stop.stop_reason, stop.stop_sequence) == ("\n    return 1", STOP_SEQUENCE, "\ndef ")
    # Text after end-of-text is not part of the completion, stop sequence or not.
    after_eos = finish_completion(tokenizer, tokenizer.encode("x = 1") + [EOS] + tokenizer.encode("\ndef g(): "))
    assert (after_eos.text, after_eos.stop_reason) == ("x = 1", STOP_EOS)
    length = finish_completion(tokenizer, tokenizer.encode("x = [1,\n  2,"), max_new_tokens=9)
    assert (length.text, length.stop_reason, length.completion_tokens) == ("x = [1,", STOP_LENGTH, 9)
    unstopped = finish_completion(tokenizer, tokenizer.encode("\n\ndef g(): pass\n\ndef h"), stop_sequences=())
    assert (unstopped.text, unstopped.stop_reason) == ("\n\ndef g(): pass\n\ndef h", STOP_LENGTH)


def stream(completion, split_points, prompt="", stops=DEFAULT_STOP_SEQUENCES):
    """The pieces a StreamingPostprocessor shows for `completion` arriving in pieces cut at `split_points`."""
    postprocessor = StreamingPostprocessor(stops, prompt)
    pieces = [postprocessor.update(completion[:end]) for end in sorted(split_points)]
    pieces.append(postprocessor.finish(truncate(completion, stops, prompt)[0]))
    return pieces


def test_streaming_holds_back_what_post_processing_may_remove():
    completion = "\n    return 1  \n\ndef g():"
    postprocessor = StreamingPostprocessor(DEFAULT_STOP_SEQUENCES, prompt="def f():")
    assert postprocessor.update("\n    return 1  \n") == "\n    return 1"  # trailing spaces may be trimmed
    assert postprocessor.update("\n    return 1  \n\nde") == ""  # "\nde" may start "\ndef "
    assert postprocessor.update(completion) == ""  # it did: the completion is over
    assert postprocessor.finish("\n    return 1") == ""
    assert "".join(stream("x = 'caf\ufffd", [len("x = 'caf\ufffd")])) == "x = 'caf\ufffd"  # U+FFFD shown at the end
    assert stream("x = 'caf\ufffd", [len("x = 'caf\ufffd")])[0] == "x = 'caf"


code_alphabet = st.sampled_from(
    ["\n", "\r\n", " ", "\t", "def ", "class ", "@", "#", "# ", "print(", "if __name__", "x", "=", "1", "'", '"',
     '"""', "'''", "`", "/*", "*/", "//", "\\", "return", "\ufffd", "async def "]  # fmt: skip
)


@settings(max_examples=300, deadline=None)
# Found by CI: a prompt that opens a docstring, a completion that ends in a lone backslash.
@example(prompt='"""', completion='def \ndef def \n\n\n\n\n\\',
         split_fractions=[0.5], stops=DEFAULT_STOP_SEQUENCES)
@given(
    prompt=st.lists(code_alphabet, max_size=6).map("".join),
    completion=st.lists(code_alphabet, max_size=30).map("".join),
    split_fractions=st.lists(st.floats(0, 1), max_size=10),
    stops=st.sampled_from([DEFAULT_STOP_SEQUENCES, ("return", "\n\n"), ()]),
)
def test_streamed_pieces_add_up_to_the_post_processed_completion(prompt, completion, split_fractions, stops):
    split_points = {round(f * len(completion)) for f in split_fractions} | {len(completion)}
    assert "".join(stream(completion, split_points, prompt, stops)) == truncate(completion, stops, prompt)[0]


def test_stopping_criteria_stops_each_row_at_its_stop_sequence():
    tokenizer = CharTokenizer()
    prompts = ["def f():", "  def g():"]  # left-padded to one length
    rows = [
        "\n    return 1\n\ndef ",  # a stop sequence: done
        "\n    x = 1\n    def ",  # nested: not a stop
    ]
    width = max(map(len, prompts))
    input_ids = torch.tensor(
        [[PAD] * (width - len(p)) + tokenizer.encode(p) + tokenizer.encode(r) for p, r in zip(prompts, rows)]
    )
    criteria = StopSequenceCriteria(tokenizer, prompt_length=width, stop_sequences=DEFAULT_STOP_SEQUENCES)
    assert criteria(input_ids, scores=None).tolist() == [True, False]
    assert StopSequenceCriteria(tokenizer, width, ["x = "])(input_ids, None).tolist() == [False, True]


@pytest.mark.parametrize("stops", [DEFAULT_STOP_SEQUENCES, ("\n\n",)])
def test_stopping_criteria_agrees_with_post_processing(stops):
    """Wherever generation is stopped, post-processing cuts the same completion at a stop sequence."""
    tokenizer = CharTokenizer()
    prompt = 'def f():\n    """'
    completion = 'Doc.\n\n# in docstring\n"""\n    return 1\n\n# Tests\nprint(f())'
    ids = tokenizer.encode(prompt + completion)
    criteria = StopSequenceCriteria(tokenizer, prompt_length=len(prompt), stop_sequences=stops)
    stopped_at = next(n for n in range(len(prompt), len(ids) + 1) if criteria(torch.tensor([ids[:n]]), None)[0])
    finished = finish_completion(tokenizer, ids[len(prompt) : stopped_at], stops, prompt)
    assert finished.stop_reason == STOP_SEQUENCE
    assert finished.text == truncate(completion, stops, prompt)[0]


def test_what_the_one_lexer_misreads_is_as_docs_completion_md_says():
    """docs/completion.md lists where the lexer, one for all languages, takes code for strings and comments or
    misses them; these are its examples, so that the list stays true."""
    # A Rust string spanning lines ends, for the lexer, at its first line's end: a stop on the next line counts.
    rust = '\n    let s = "usage:\n\nmore";\n}'
    assert cut(rust, prompt="fn f() {", stops=["\n\n"]) == '\n    let s = "usage:'
    # Python's floor division reads as a // comment: the docstring opened after it is not seen.
    python = '\n    half = n // 2; doc = """\n# Note\n"""\n    return half'
    assert cut(python, prompt="def f(n):") == '\n    half = n // 2; doc = """'
    # A Shell glob opens a /* comment that never ends: no stop sequence counts after it.
    shell = "\ncp build/* dist/\necho done\n\nrm -rf tmp"
    assert truncate(shell, ["\n\n"], "#!/bin/sh") == (shell, None)
