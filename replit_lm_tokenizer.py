"""Tokenizers for replit-code-v1-3b.

`ReplitLMTokenizer` segments with SentencePiece and the model's own `spiece.model`, scoring pieces as the
sentencepiece releases the model was trained with did (newer releases score user-defined pieces differently, see
`_as_trained`). It is the default (see `tokenizer_config.json`).

`ReplitLMTokenizerFast` is a `tokenizers` conversion of the same file, for offsets and the `tokenizers` API. It gives
the same ids except among segmentations that score the same (d+ddd or ddd+d, "\\n"+"\\n\\n" or "\\n\\n"+"\\n"), where
SentencePiece's choice follows its float32 rounding, and where a combining mark follows a character that NFKC
rewrites. See the README for details.

This module is copied next to the weights by `trust_remote_code`, so it imports nothing but the standard library,
sentencepiece, tokenizers and transformers (and numpy and torch when asked for PyTorch tensors).
"""

import os
import re
import struct
from itertools import filterfalse
from shutil import copyfile

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast


VOCAB_FILES_NAMES = {"vocab_file": "spiece.model"}
SPIECE_UNDERLINE = "▁"

_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
# See `_as_trained`.
_SENTENCEPIECE_SCORES_USER_DEFINED_BY_LENGTH = tuple(
    int(part) for part in re.match(r"(\d+)\.(\d+)\.(\d+)", spm.__version__).groups()
) >= (0, 2, 2)


def _vocab_file_path(vocab_file, name_or_path):
    """Return the path of the SentencePiece model, or raise naming the path that was looked for."""
    if vocab_file is None:
        looked_for = os.path.join(name_or_path or ".", VOCAB_FILES_NAMES["vocab_file"])
    else:
        looked_for = os.fspath(vocab_file)
    # ValueError rather than FileNotFoundError: `from_pretrained` replaces any OSError with a generic message.
    if not os.path.isfile(looked_for):
        raise ValueError(f"The SentencePiece model of replit-code-v1-3b was not found: no file at {looked_for!r}.")
    return looked_for


def _read_model(path):
    """The `ModelProto` in `path`, or a ValueError saying the file is not a SentencePiece model."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        proto = sentencepiece_model_pb2.ModelProto.FromString(data)
    except Exception as error:  # protobuf's DecodeError moves between protobuf releases
        raise ValueError(f"{path!r} is not a valid SentencePiece model: {error}") from error
    if not proto.pieces:
        raise ValueError(f"{path!r} is not a valid SentencePiece model: it has no pieces.")
    return proto


def _check_text(value, name, optional=True):
    """Raise a TypeError for inputs that are not text, a batch of texts or token ids."""
    if isinstance(value, str) or (value is None and optional):
        return
    if isinstance(value, (list, tuple)):
        if all(isinstance(item, str) for item in value) or all(isinstance(item, (list, tuple)) for item in value):
            return
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return
        kinds = sorted({type(item).__name__ for item in value})
        got = f"a {type(value).__name__} of {', '.join(kinds)}"
    else:
        got = type(value).__name__
    raise TypeError(f"`{name}` must be a str, a list of str (a batch), or a list of int token ids; got {got}.")


class _TextInputCheck:
    """Turns the base classes' mixed errors for non-text input into one clear TypeError."""

    def __call__(self, text=None, text_pair=None, *args, **kwargs):
        _check_text(text, "text")
        _check_text(text_pair, "text_pair")
        _check_text(kwargs.get("text_target"), "text_target")
        _check_text(kwargs.get("text_pair_target"), "text_pair_target")
        return super().__call__(text, text_pair, *args, **kwargs)

    def encode(self, text, text_pair=None, *args, **kwargs):
        _check_text(text, "text", optional=False)
        _check_text(text_pair, "text_pair")
        return super().encode(text, text_pair, *args, **kwargs)

    def tokenize(self, text, *args, **kwargs):
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str; got {type(text).__name__}.")
        return super().tokenize(text, *args, **kwargs)


class _FastBatchTensors:
    """Builds the tensors of a padded batch through numpy.

    transformers turns each field of a batch into a tensor with `torch.tensor(list_of_lists)`, which takes longer
    than tokenizing the batch: 0.1 s for 1000 snippets of code padded to 700 tokens, against 0.01 s through numpy.
    Rectangular fields (padded, or all of one length) go through numpy; the rest is left to transformers, which also
    raises its usual error for a ragged batch.
    """

    def __call__(self, text=None, text_pair=None, *args, return_tensors=None, **kwargs):
        is_batch = isinstance(text, (list, tuple)) and text and isinstance(text[0], str)
        if return_tensors != "pt" or not is_batch or kwargs.get("is_split_into_words"):
            return super().__call__(text, text_pair, *args, return_tensors=return_tensors, **kwargs)
        import numpy as np
        import torch

        encoding = super().__call__(text, text_pair, *args, return_tensors=None, **kwargs)
        for key, value in encoding.items():
            if isinstance(value[0], list) and len({len(row) for row in value}) == 1:
                encoding[key] = torch.from_numpy(np.array(value, dtype=np.int64))
        encoding.convert_to_tensors(tensor_type=return_tensors)
        return encoding


class ReplitLMTokenizer(_TextInputCheck, _FastBatchTensors, PreTrainedTokenizer):
    """The replit-code-v1-3b tokenizer: SentencePiece's own encoding of `spiece.model`.

    `encode(text)` gives the ids SentencePiece gave when the model was trained, the same as
    `SentencePieceProcessor(spiece.model).encode(text)` with sentencepiece up to 0.2.1, and adds no special tokens.
    Literal `<|endoftext|>`, `<|pad|>` and `<|unk|>` in the text become their ids unless `split_special_tokens=True`.
    Decoding restores the text exactly (up to NFKC normalisation and unknown characters), whitespace included.

    Args:
        vocab_file: path of `spiece.model`.
        sp_model_kwargs: passed to `sentencepiece.SentencePieceProcessor`, e.g. to enable subword sampling.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file=None,
        eos_token="<|endoftext|>",
        unk_token="<|unk|>",
        pad_token="<|pad|>",
        bos_token=None,
        sep_token=None,
        sp_model_kwargs=None,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        self.vocab_file = _vocab_file_path(vocab_file, kwargs.get("name_or_path"))
        self.sp_model_kwargs = sp_model_kwargs or {}
        # The base initialiser looks the special tokens up in the vocabulary, so SentencePiece has to be loaded first
        # (the original class loaded it afterwards and broke with transformers 4.34).
        proto = _read_model(self.vocab_file)
        if _SENTENCEPIECE_SCORES_USER_DEFINED_BY_LENGTH:
            proto = _as_trained(proto)
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        try:
            self.sp_model.LoadFromSerializedProto(proto.SerializeToString())
        except RuntimeError as error:
            raise ValueError(f"{self.vocab_file!r} is not a valid SentencePiece model: {error}") from error
        self._pieces = [self.sp_model.id_to_piece(i) for i in range(self.sp_model.get_piece_size())]
        self._piece_ids = {piece: i for i, piece in enumerate(self._pieces)}
        super().__init__(
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            bos_token=bos_token,
            sep_token=sep_token,
            sp_model_kwargs=self.sp_model_kwargs,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @property
    def vocab_size(self):
        return len(self._pieces)

    @property
    def _tokenizer(self):
        """The `tokenizers` twin's backend, for code that decodes a stream of ids with it (`transformers serve` reads
        `tokenizer._tokenizer`); encoding stays SentencePiece's. Built on first use."""
        if "_twin_backend" not in self.__dict__:
            twin = ReplitLMTokenizerFast(vocab_file=self.vocab_file, **self.special_tokens_map)
            self.__dict__["_twin_backend"] = twin.backend_tokenizer
        return self.__dict__["_twin_backend"]

    def get_vocab(self):
        return {**self._piece_ids, **self.added_tokens_encoder}

    # The base class's encode and decode loop over tokens in Python and find added tokens with a character-by-character
    # trie walk, several times slower than SentencePiece itself. The overrides below keep its behaviour but hand
    # whole texts and whole runs of ids to SentencePiece.

    def tokenize(self, text, **kwargs):
        # With no added token to split out, the base class would only run `_tokenize` on the text.
        if isinstance(text, str) and (
            kwargs.get("split_special_tokens", self.split_special_tokens)
            or not any(token in text for token in self._added_tokens_encoder)
        ):
            return self._tokenize(text)
        return super().tokenize(text, **kwargs)  # which also rejects what is not text

    def _tokenize(self, text, **kwargs):
        # Pieces looked up from ids rather than `out_type=str`, which is slower and spells unknown characters out
        # instead of naming the unknown token.
        return list(map(self._pieces.__getitem__, self.sp_model.encode(text)))

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return super().convert_tokens_to_ids(tokens)
        try:
            # Special tokens are pieces too, with the same ids.
            return list(map(self._piece_ids.__getitem__, tokens))
        except KeyError:  # a token added to the vocabulary, or a string that is no token at all
            added, pieces, unk_id = self._added_tokens_encoder, self._piece_ids, self.sp_model.unk_id()
            return [added[token] if token in added else pieces.get(token, unk_id) for token in tokens]

    def _convert_token_to_id(self, token):
        return self._piece_ids.get(token, self.sp_model.unk_id())

    def _convert_id_to_token(self, index):
        return self._pieces[index]

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        if isinstance(ids, int):
            return super().convert_ids_to_tokens(ids)
        if skip_special_tokens:
            ids = filterfalse(set(self.all_special_ids).__contains__, ids)
        ids = list(ids)
        try:
            # Special tokens are pieces too, under their own names.
            return list(map(self._pieces.__getitem__, ids))
        except IndexError:  # a token added to the vocabulary
            return super().convert_ids_to_tokens(ids)

    def convert_tokens_to_string(self, tokens):
        # SentencePiece's decoding for this model (there is no dummy prefix to strip), except that special tokens keep
        # their text instead of decoding to "" (control pieces) or " ⁇ " (the unknown piece).
        return "".join(tokens).replace(SPIECE_UNDERLINE, " ")

    def decode(self, token_ids, skip_special_tokens=False, **kwargs):
        if isinstance(token_ids, list) and token_ids and type(token_ids[0]) is int:
            # Skip the base class's conversion, which type-checks every id in Python, more work than decoding.
            return self._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
        return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens=False, **kwargs):
        # One sequence at a time, so that lists of ints take the shortcut above.
        return [self.decode(sequence, skip_special_tokens=skip_special_tokens, **kwargs) for sequence in sequences]

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        # Added tokens are joined to their neighbours without the spaces transformers 4 would put around some of them,
        # as the fast tokenizer does.
        tokens = self.convert_ids_to_tokens(token_ids, skip_special_tokens=skip_special_tokens)
        text = self.convert_tokens_to_string([tokens] if isinstance(tokens, str) else tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        # The model was trained on raw text: no BOS, no EOS, no separator.
        return token_ids_0 if token_ids_1 is None else token_ids_0 + token_ids_1

    def save_vocabulary(self, save_directory, filename_prefix=None):
        if not os.path.isdir(save_directory):
            raise ValueError(f"Cannot save the vocabulary: {save_directory!r} is not a directory.")
        out_vocab_file = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        )
        if os.path.abspath(self.vocab_file) != os.path.abspath(out_vocab_file):
            copyfile(self.vocab_file, out_vocab_file)
        return (out_vocab_file,)


# darts-clone double-array units, as read by sentencepiece's normalizer and tokenizers' `Precompiled`.
_DARTS_HAS_LEAF = 1 << 8
_DARTS_LABEL_MASK = (1 << 31) | 0xFF


def _darts_offset(unit):
    return (unit >> 10) << ((unit & (1 << 9)) >> 6)


def _exempt_from_charsmap(charsmap, chars):
    """Return a copy of a precompiled SentencePiece charsmap that leaves each of `chars` unchanged.

    SentencePiece does not normalise user-defined pieces, so "\\t", "\\n" or "\\r" survive although the NFKC map folds
    them into spaces; without that privilege, they need to leave the map. The map is a uint32 trie size, a darts-clone
    trie of uint32 units, then the replacement strings; unsetting a key's leaf bit removes the key.
    """
    (trie_size,) = struct.unpack_from("<I", charsmap)
    units = list(struct.unpack_from(f"<{trie_size // 4}I", charsmap, 4))
    for char in chars:
        node = _darts_offset(units[0])
        key_unit = None
        for byte in char.encode("utf-8"):
            index = node ^ byte
            if index >= len(units) or units[index] & _DARTS_LABEL_MASK != byte:
                key_unit = None
                break
            key_unit = index
            node = index ^ _darts_offset(units[index])
        if key_unit is not None:
            units[key_unit] &= ~_DARTS_HAS_LEAF
    return struct.pack(f"<I{len(units)}I", trie_size, *units) + charsmap[4 + trie_size :]


def _as_trained(proto):
    """A copy of `proto` that any sentencepiece release segments as the releases the model was trained with did.

    Up to 0.2.1, SentencePiece scored every user-defined piece -0.1 when segmenting (length times the best normal
    score, which starts at FLT_MIN and stays there as scores are negative, minus 0.1). Since 0.2.2 it scores them 0.1
    per extra UTF-8 byte, which changes how spaces before a word are split ("   The" became "▁▁▁" "The" instead of
    "▁▁" "▁The"), a few tokens in a thousand of code. Making them ordinary pieces scored -0.1 restores the old
    segmentation; their one other privilege, exemption from normalisation, moves into the character map.
    """
    proto = sentencepiece_model_pb2.ModelProto.FromString(proto.SerializeToString())
    user_defined = [piece for piece in proto.pieces if piece.type == _Piece.USER_DEFINED]
    if proto.normalizer_spec.precompiled_charsmap:
        exempt = {char for piece in user_defined for char in piece.piece}
        proto.normalizer_spec.precompiled_charsmap = _exempt_from_charsmap(
            proto.normalizer_spec.precompiled_charsmap, exempt
        )
    for piece in user_defined:
        piece.type, piece.score = _Piece.NORMAL, -0.1
    return proto


def _sentencepiece_to_tokenizers(proto):
    """Build a `tokenizers` backend that segments like SentencePiece did when the model was trained."""
    proto = _as_trained(proto)
    trainer_spec, normalizer_spec = proto.trainer_spec, proto.normalizer_spec
    if (
        trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM
        or trainer_spec.byte_fallback
        or normalizer_spec.add_dummy_prefix
        or normalizer_spec.remove_extra_whitespaces
        or not normalizer_spec.escape_whitespaces
    ):
        raise ValueError(
            "ReplitLMTokenizerFast converts unigram models trained like replit-code-v1-3b's (no byte fallback, no "
            "dummy prefix, whitespace kept and escaped; see sentencepiece_recipe.py). Use ReplitLMTokenizer instead."
        )
    # SentencePiece never matches control, unknown or unused pieces in text, but the Unigram model matches every
    # entry: score them below spelling their text out with the worst normal pieces. This lowers the Unigram model's
    # score for unknown characters (its lowest score minus 10) too, which changes nothing: the trainer gives every
    # character of the vocabulary a piece of its own, so an unknown character is in no piece and every segmentation
    # has the same unknown pieces.
    min_score = min(piece.score for piece in proto.pieces if piece.type == _Piece.NORMAL)
    vocab = [
        (piece.piece, piece.score if piece.type == _Piece.NORMAL else (len(piece.piece) + 1) * min_score)
        for piece in proto.pieces
    ]
    backend = Tokenizer(models.Unigram(vocab, unk_id=trainer_spec.unk_id, byte_fallback=False))

    steps = []
    if normalizer_spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(normalizer_spec.precompiled_charsmap))
    steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    backend.normalizer = normalizers.Sequence(steps)
    # No pre-tokenizer: SentencePiece segments the whole text at once. Splitting where no piece continues (before a
    # run of spaces, around tabs and line breaks) would give the same segmentations but was measured no faster, and
    # on long texts it changes which near-ties agree with SentencePiece's float32 sums (see the README).
    # Metaspace turns every "▁" back into a space, the first token's too ("never" strips no prefix); it decodes
    # a third faster than an equivalent Replace, which runs a regular expression over each token.
    backend.decoder = decoders.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="never")
    return backend


class ReplitLMTokenizerFast(_TextInputCheck, _FastBatchTensors, PreTrainedTokenizerFast):
    """A `tokenizers` twin of [`ReplitLMTokenizer`], converted from the same `spiece.model`.

    Same special tokens, vocabulary and decoding, plus offsets. Its ids are [`ReplitLMTokenizer`]'s except where
    several segmentations score the same and SentencePiece's float32 rounding picks one, and where a combining mark
    follows a character that NFKC rewrites (`tokenizers` then drops the mark).
    """

    vocab_files_names = {**VOCAB_FILES_NAMES, "tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    slow_tokenizer_class = ReplitLMTokenizer

    def __init__(
        self,
        vocab_file=None,
        tokenizer_file=None,
        eos_token="<|endoftext|>",
        unk_token="<|unk|>",
        pad_token="<|pad|>",
        bos_token=None,
        sep_token=None,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        if tokenizer_file is None or not os.path.isfile(tokenizer_file):
            vocab_file = _vocab_file_path(vocab_file, kwargs.get("name_or_path"))
            kwargs["tokenizer_object"] = _sentencepiece_to_tokenizers(_read_model(vocab_file))
        super().__init__(
            vocab_file=vocab_file,
            tokenizer_file=tokenizer_file,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            bos_token=bos_token,
            sep_token=sep_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        self.vocab_file = vocab_file

    @classmethod
    def convert_to_native_format(cls, **kwargs):
        # transformers 5 would otherwise rebuild the backend with its generic SentencePiece converter; __init__ does it.
        return kwargs

    @property
    def can_save_slow_tokenizer(self):
        return self.vocab_file is not None and os.path.isfile(self.vocab_file)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return token_ids_0 if token_ids_1 is None else token_ids_0 + token_ids_1

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        file_names = super()._save_pretrained(
            save_directory, file_names, legacy_format=legacy_format, filename_prefix=filename_prefix
        )
        # transformers 5 writes only tokenizer.json: add spiece.model, which the exact (slow) tokenizer needs.
        saved_vocabulary = any(name.endswith(VOCAB_FILES_NAMES["vocab_file"]) for name in file_names)
        if self.can_save_slow_tokenizer and not saved_vocabulary:
            file_names += self.save_vocabulary(save_directory, filename_prefix=filename_prefix)
        return file_names

    def save_vocabulary(self, save_directory, filename_prefix=None):
        if not self.can_save_slow_tokenizer:
            raise ValueError("This tokenizer was loaded without spiece.model, so it cannot save one.")
        out_vocab_file = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        )
        if os.path.abspath(self.vocab_file) != os.path.abspath(out_vocab_file):
            copyfile(self.vocab_file, out_vocab_file)
        return (out_vocab_file,)
