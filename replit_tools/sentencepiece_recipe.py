"""The SentencePiece training recipe behind replit-code-v1-3b's `spiece.model`.

The settings below were read back from the released model's `trainer_spec` and `normalizer_spec`, so a tokenizer
trained with `train_sentencepiece` on another corpus (for a small demo model, or the test suite's toy model) behaves
like the real one: NFKC normalisation, no dummy prefix, whitespace kept as it is, indentation runs and line breaks as
single pieces, and the same special pieces at the same ids.
"""

import os

import sentencepiece as spm


# User-defined pieces are never split and are exempt from normalisation, which would otherwise fold tabs and line
# breaks into spaces. Runs of 2 to 32 spaces ("▁" is SentencePiece's escaped space) and 1 to 8 tabs make indentation
# cheap; the sentinels are the T5-style `<extra_id_N>` pieces of the released vocabulary. They take ids 3 to 146.
USER_DEFINED_SYMBOLS = (
    ["▁" * n for n in range(32, 1, -1)]
    + ["\t" * n for n in range(8, 0, -1)]
    + ["\n\n", "\n", "\r", "\x0b", "\x0c"]
    + [f"<extra_id_{i}>" for i in range(100)]
)

RECIPE = {
    "model_type": "unigram",
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": False,
    "byte_fallback": False,
    "character_coverage": 0.9995,
    "max_sentence_length": 4192,
    "max_sentencepiece_length": 16,
    "unk_id": 0,
    "eos_id": 1,
    "pad_id": 2,
    "bos_id": -1,
    "unk_piece": "<|unk|>",
    "eos_piece": "<|endoftext|>",
    "pad_piece": "<|pad|>",
    "user_defined_symbols": USER_DEFINED_SYMBOLS,
}


def train_sentencepiece(input_files_or_iterator, model_prefix, vocab_size, seed=None, **overrides):
    """Train a SentencePiece model with the replit-code-v1-3b recipe and return the path of the `.model` file.

    Args:
        input_files_or_iterator: a path, a list or tuple of paths (SentencePiece reads them one line per sentence),
            or any other iterable of strings, used as the training sentences.
        model_prefix: where to write `<model_prefix>.model` and `<model_prefix>.vocab`.
        vocab_size: the size of the vocabulary, special and user-defined pieces included (32768 for the real model).
        seed: seeds SentencePiece's sampling of the training sentences, for a reproducible model.
        **overrides: any other `sentencepiece` trainer option, e.g. `num_threads`, `input_sentence_size` or
            `hard_vocab_limit=False` for a corpus too small to fill the vocabulary.
    """
    options = {**RECIPE, **overrides, "model_prefix": os.fspath(model_prefix), "vocab_size": vocab_size}
    if isinstance(input_files_or_iterator, (str, os.PathLike)):
        options["input"] = [os.fspath(input_files_or_iterator)]
    elif isinstance(input_files_or_iterator, (list, tuple)):
        options["input"] = [os.fspath(path) for path in input_files_or_iterator]
    else:
        options["sentence_iterator"] = iter(input_files_or_iterator)
    if seed is not None:
        spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(**options)
    return f"{os.fspath(model_prefix)}.model"
