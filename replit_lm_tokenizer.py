"""Tokenizers for replit-code-v1-3b.

`ReplitLMTokenizer` segments with SentencePiece and the model's own `spiece.model`, and gives the ids that
sentencepiece 0.1.99, the release the model was trained with, gives, whichever sentencepiece release is installed
(see `_as_trained` and `_TrainingTimeTies`). It is the default (see `tokenizer_config.json`).

`ReplitLMTokenizerFast` is a `tokenizers` conversion of the same file, for offsets and the `tokenizers` API. Its ids
differ from the slow class's where segmentations score the same or almost (sentencepiece 0.1.99 picks among them by
the rounding of its running float32 score, which a `tokenizers` Unigram model does not keep), and where a combining
mark follows a character that NFKC rewrites. See docs/tokenizer.md.

This module is copied next to the weights by `trust_remote_code`, so it imports nothing but the standard library,
numpy, sentencepiece, tokenizers and transformers (and torch when asked for PyTorch tensors). It reads and writes
`spiece.model` itself: protobuf, which sentencepiece's own model bindings need, is not among the model's requirements.
"""

import json
import os
import re
import struct
import unicodedata
from functools import cache
from itertools import filterfalse
from shutil import copyfile

import numpy as np
import sentencepiece as spm
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast


VOCAB_FILES_NAMES = {"vocab_file": "spiece.model"}
SPIECE_UNDERLINE = "▁"
# Keyword defaults of both classes' __init__. The model was trained on raw text: no BOS, no separator.
_DEFAULTS = {
    "eos_token": "<|endoftext|>",
    "unk_token": "<|unk|>",
    "pad_token": "<|pad|>",
    "bos_token": None,
    "sep_token": None,
    "clean_up_tokenization_spaces": False,
}
_TRANSFORMERS_4 = transformers.__version__.startswith("4.")


def _init_kwargs(kwargs: dict) -> dict:
    """Both classes' keyword arguments for the base initialiser: `_DEFAULTS`, then the caller's (or the saved
    tokenizer_config.json's). transformers 5 saves added special tokens as a list, `extra_special_tokens`, which 4.x
    reads as a dict of named tokens and fails on: there, they are its `additional_special_tokens`."""
    kwargs = {**_DEFAULTS, **kwargs}
    extra = kwargs.get("extra_special_tokens")
    if _TRANSFORMERS_4 and isinstance(extra, (list, tuple)):
        additional = list(kwargs.get("additional_special_tokens") or [])
        kwargs["additional_special_tokens"] = additional + [token for token in extra if token not in additional]
        del kwargs["extra_special_tokens"]
    return kwargs


# See `_as_trained`.
_SENTENCEPIECE_VERSION = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)\.(\d+)", spm.__version__).groups())
_SENTENCEPIECE_SCORES_AS_TRAINED = _SENTENCEPIECE_VERSION < (0, 2, 2)


# --- spiece.model, read and written without protobuf --------------------------------------------------------------
# spiece.model is a serialised sentencepiece ModelProto. Only the fields used here are decoded; all others are kept as
# they are, so that writing the model back gives the same bytes.

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5

_FLOAT32 = struct.Struct("<f")


def _float32(value):
    """`value` rounded to the nearest float32, as a Python float."""
    return _FLOAT32.unpack(_FLOAT32.pack(value))[0]


def _read_varint(data, pos):
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint of more than 10 bytes")


def _parse_message(data):
    """The fields of a protobuf message, in their order: a list of (field number, wire type, value)."""
    fields, pos, size = [], 0, len(data)
    try:
        while pos < size:
            key, pos = _read_varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == _VARINT:
                value, pos = _read_varint(data, pos)
            elif wire_type == _BYTES:
                length, pos = _read_varint(data, pos)
                value, pos = data[pos : pos + length], pos + length
            elif wire_type in (_FIXED32, _FIXED64):
                length = 4 if wire_type == _FIXED32 else 8
                value, pos = data[pos : pos + length], pos + length
            else:
                raise ValueError(f"field {number} has the unsupported wire type {wire_type}")
            if number == 0 or pos > size:
                raise ValueError("the data is truncated")
            fields.append((number, wire_type, value))
    except IndexError:
        raise ValueError("the data is truncated") from None
    return fields


def _write_varint(value):
    value &= (1 << 64) - 1  # a negative int32 takes ten bytes, as protobuf writes it
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _serialize_message(fields):
    out = []
    for number, wire_type, value in fields:
        out.append(_write_varint(number << 3 | wire_type))
        if wire_type == _VARINT:
            out.append(_write_varint(value))
        else:
            if wire_type == _BYTES:
                out.append(_write_varint(len(value)))
            out.append(value)
    return b"".join(out)


class _Spec:
    """A TrainerSpec or NormalizerSpec: the named fields of `schema`, decoded when read; the message kept whole."""

    def __init__(self, data, schema):
        self.fields = _parse_message(data)
        self._schema = schema

    def __getattr__(self, name):
        if name.startswith("_") or name not in self._schema:
            raise AttributeError(name)
        number, kind, default = self._schema[name]
        values = [value for field, _, value in self.fields if field == number]
        if not values:
            return default
        value = values[-1]  # as in protobuf, the last occurrence wins
        if kind is float:
            return _FLOAT32.unpack(value)[0]
        if kind is int:
            return value - (1 << 64) if value >= 1 << 63 else value
        if kind is str:
            return value.decode("utf-8")
        return kind(value)  # bool or bytes

    def replace(self, name, value):
        number = self._schema[name][0]
        self.fields = [field for field in self.fields if field[0] != number] + [(number, _BYTES, value)]

    def serialize(self):
        return _serialize_message(self.fields)


_TRAINER_SPEC = {  # name: (field number, type, default), from sentencepiece_model.proto
    "model_type": (3, int, 1),
    "vocab_size": (4, int, 8000),
    "character_coverage": (10, float, _float32(0.9995)),
    "byte_fallback": (35, bool, False),
    "unk_id": (40, int, 0),
    "bos_id": (41, int, 1),
    "eos_id": (42, int, 2),
    "pad_id": (43, int, -1),
}
_NORMALIZER_SPEC = {
    "name": (1, str, ""),
    "precompiled_charsmap": (2, bytes, b""),
    "add_dummy_prefix": (3, bool, True),
    "remove_extra_whitespaces": (4, bool, True),
    "escape_whitespaces": (5, bool, True),
}


class _SentencePieceModel:
    """A sentencepiece ModelProto: `pieces` as [piece, score, type] lists, `trainer_spec`, `normalizer_spec`."""

    NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(1, 7)  # ModelProto.SentencePiece.Type
    UNIGRAM = 1  # TrainerSpec.ModelType

    def __init__(self, data):
        self.pieces, self._read_pieces, self._other_fields = [], [], []
        specs = {2: b"", 3: b""}
        for number, wire_type, value in _parse_message(data):
            if number == 1 and wire_type == _BYTES:
                piece, score, kind = "", 0.0, self.NORMAL
                for field, field_type, field_value in _parse_message(value):
                    if field == 1 and field_type == _BYTES:
                        piece = field_value.decode("utf-8")
                    elif field == 2 and field_type == _FIXED32:
                        (score,) = struct.unpack("<f", field_value)
                    elif field == 3 and field_type == _VARINT:
                        kind = field_value
                self.pieces.append([piece, score, kind])
                self._read_pieces.append(((piece, score, kind), value))
            elif number in specs and wire_type == _BYTES:
                specs[number] = value
            else:
                self._other_fields.append((number, wire_type, value))
        self.trainer_spec = _Spec(specs[2], _TRAINER_SPEC)
        self.normalizer_spec = _Spec(specs[3], _NORMALIZER_SPEC)

    @classmethod
    def read(cls, path):
        """The model in the file at `path`, or a ValueError saying it is not a SentencePiece model."""
        with open(path, "rb") as f:
            data = f.read()
        try:
            model = cls(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{path!r} is not a valid SentencePiece model: {error}") from error
        if not model.pieces:
            raise ValueError(f"{path!r} is not a valid SentencePiece model: it has no pieces.")
        return model

    def serialize(self):
        pieces = []
        for i, (piece, score, kind) in enumerate(self.pieces):
            if i < len(self._read_pieces) and self._read_pieces[i][0] == (piece, score, kind):
                data = self._read_pieces[i][1]  # unchanged: as read, with any field not decoded here
            else:
                fields = [(1, _BYTES, piece.encode("utf-8")), (2, _FIXED32, struct.pack("<f", score)), (3, _VARINT, kind)]
                data = _serialize_message(fields)
            pieces.append((1, _BYTES, data))
        specs = [(2, _BYTES, self.trainer_spec.serialize()), (3, _BYTES, self.normalizer_spec.serialize())]
        return _serialize_message(pieces + specs + self._other_fields)

    def copy(self):
        return type(self)(self.serialize())


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


def _as_trained(model):
    """A copy of `model` that sentencepiece >= 0.2.2 scores as the releases the model was trained with did.

    Up to 0.2.1, SentencePiece scored every user-defined piece -0.1 when segmenting (length times the best normal
    score, which starts at FLT_MIN and stays there as scores are negative, minus 0.1). Since 0.2.2 it scores them 0.1
    per extra UTF-8 byte, which changes how spaces before a word are split ("   The" became "▁▁▁" "The" instead of
    "▁▁" "▁The"), a few tokens in a thousand of code. Making them ordinary pieces scored -0.1 restores the old
    segmentation up to ties (see `_TrainingTimeTies`); their one other privilege, exemption from normalisation, moves
    into the character map.
    """
    model = model.copy()
    user_defined = [piece for piece in model.pieces if piece[2] == model.USER_DEFINED]
    charsmap = model.normalizer_spec.precompiled_charsmap
    if charsmap:
        exempt = {char for piece, _, _ in user_defined for char in piece}
        model.normalizer_spec.replace("precompiled_charsmap", _exempt_from_charsmap(charsmap, exempt))
    for piece in user_defined:
        piece[1:] = [_float32(-0.1), model.NORMAL]  # as the model file stores it
    return model


@cache
def _combining_marks() -> tuple[str, ...]:
    return tuple(chr(code) for code in range(0x300, 0x30000) if unicodedata.combining(chr(code)))


def _marks_after_user_defined(model) -> dict[str, tuple[str, ...]]:
    """{mark: the user-defined pieces it would compose with}: the combining marks that NFKC joins to the last character
    of a user-defined piece (in this vocabulary, U+0338 after the ">" of "<extra_id_N>", which would make "≯").
    SentencePiece copies a user-defined piece unnormalised, so a mark after it stays apart; `_as_trained` makes those
    pieces ordinary, so the encoder splits the text after them where such a mark follows."""
    pieces = [piece.replace(SPIECE_UNDERLINE, " ") for piece, _, kind in model.pieces if kind == model.USER_DEFINED]
    marks = {}
    for last in {piece[-1] for piece in pieces}:
        for mark in _combining_marks():
            apart = unicodedata.normalize("NFKC", last) + unicodedata.normalize("NFKC", mark)
            if unicodedata.normalize("NFKC", last + mark) != apart:
                marks[mark] = marks.get(mark, ()) + tuple(piece for piece in pieces if piece[-1] == last)
    return marks


class _TrainingTimeTies:
    """Makes sentencepiece >= 0.2.2 choose among segmentations that score the same, or almost, as 0.1.99 did.

    Why they differ. Both search the best segmentation left to right, keeping for each position the float32 score of
    the best segmentation ending there. Up to 0.2.1 the score of a user-defined piece, `length * max_score - 0.1`, is
    a double, and it makes every candidate's score a double (C++ converts the other branch of the `?:` too): the
    float32 score at the candidate's start plus its piece's score, compared unrounded with the float32 score stored
    at its end, which it replaces when greater. Among equal candidates a later one (a shorter last piece) wins
    whenever the stored score was rounded down, and candidates closer than the rounding of the running score go by
    that rounding too. So 0.1.99 splits 35 spaces into `▁`x32 + `▁▁▁` or `▁▁▁` + `▁`x32, three line breaks into
    "\\n\\n" + "\\n" or "\\n" + "\\n\\n", and, deep into a long file, `▁testing` or `▁` + `testing`, by the low bits
    of the score of the text before. Since 0.2.2 the user-defined score is a float32, every candidate is rounded
    before it is compared, equal candidates keep the first (the longest last piece), and the running score is
    shifted back to 0 beyond ±100,000, which rounds differently again.

    What this does. Text splits into stretches at the places no piece of the vocabulary can cross (no piece holds
    the two characters there side by side), and every segmentation passes through those places. Where the two best
    segmentations of a stretch differ by more than the rounding can move them, sentencepiece's choice is 0.1.99's.
    The rest, which are few, are searched again exactly as 0.1.99 did, in Python, from 0.1.99's running score at the
    stretch's start. That score is the float32 sum of the scores of the pieces before, which numpy adds in the same
    order and precision as 0.1.99: float32 plus float32 rounds the same in float32 as in double, and a user-defined
    piece's double -0.1 rounds like float32 -0.1 when added to 0, to -0.1, or to any float32 below -0.15 (checked on
    every 97th float32 down to -4 and on millions below), the only sums that occur when normal pieces score below
    -0.15.
    """

    _CACHE_SIZE = 1 << 17  # stretches whose score gap is kept

    def __init__(self, model):
        size = len(model.pieces)
        self.unk_id = model.trainer_spec.unk_id
        self.pieces = [piece for piece, _, _ in model.pieces]
        self.search_scores = {}  # piece -> (id, its score as 0.1.99 added it: a double for user-defined pieces)
        self.float32_scores = np.zeros(size, dtype=np.float32)
        self.lengths = np.array([len(piece) for piece in self.pieces], dtype=np.int64)
        # A piece's first and last characters, and the character pairs that some piece holds side by side, as codes.
        self.first = np.full(size, -1, dtype=np.int64)
        self.last = np.full(size, -1, dtype=np.int64)
        bigrams = set()
        normal_scores = [score for _, score, kind in model.pieces if kind == model.NORMAL]
        for i, (piece, score, kind) in enumerate(model.pieces):
            if kind not in (model.NORMAL, model.USER_DEFINED) or not piece:
                continue  # the unknown and control pieces never match text
            score = -0.1 if kind == model.USER_DEFINED else score
            self.search_scores[piece] = (i, score)
            self.float32_scores[i] = score
            self.first[i], self.last[i] = ord(piece[0]), ord(piece[-1])
            bigrams.update(ord(a) << 21 | ord(b) for a, b in zip(piece, piece[1:]))
        self.bigrams = np.array(sorted(bigrams), dtype=np.int64)
        # sentencepiece: `const float unk_score = min_score() - kUnkPenalty`, over the normal pieces.
        self.unk_score = _float32(min(normal_scores) - 10.0)
        self.float32_scores[self.unk_id] = self.unk_score
        self.longest = max(map(len, self.search_scores))
        # Every prefix of a piece -> the piece's (id, score), or None if it is no piece itself.
        self.prefixes = {piece[:k]: None for piece in self.search_scores for k in range(1, len(piece))}
        self.prefixes.update(self.search_scores)
        self.single_characters = {piece for piece in self.search_scores if len(piece) == 1}
        self.piece_gaps = np.full(size, np.nan)  # the score gap of each piece's text, filled as pieces are met
        self.piece_gaps[self.unk_id] = np.inf
        self.gaps = {}

    def __call__(self, ids, normalize):
        """0.1.99's ids for the text that sentencepiece segmented as `ids`; `normalize()` gives its normalised form."""
        if not ids:
            return ids
        array = np.array(ids, dtype=np.int64)
        # The stretches: boundaries between tokens that no piece can cross.
        pairs = self.last[array[:-1]] << 21 | self.first[array[1:]]
        found = np.minimum(np.searchsorted(self.bigrams, pairs), len(self.bigrams) - 1)
        crossable = (self.bigrams[found] == pairs) & (array[:-1] != self.unk_id) & (array[1:] != self.unk_id)
        ends = np.append(np.flatnonzero(~crossable) + 1, len(ids))
        starts = np.append(0, ends[:-1])
        # How far rounding can move two segmentations of a stretch apart: half a float32 step of the running score
        # for each rounded sum along either (sentencepiece's, of `tokens` pieces, and any other, of at most one
        # piece per character) and for the comparison. A step of the running score plus 1, for room to spare.
        running = np.add.accumulate(self.float32_scores[array].astype(np.float64))
        characters = np.add.accumulate(self.lengths[array])
        stretch_characters = characters[ends - 1] - characters[starts] + self.lengths[array[starts]]
        step = np.spacing((np.abs(running[ends - 1]) + 1).astype(np.float32)).astype(np.float64)
        slack = (ends - starts + stretch_characters + 1) * 0.5 * step
        gaps = self._gaps(ids, array, starts, ends)
        close = np.flatnonzero(gaps <= slack)
        if not close.size:
            return ids
        unknown_lengths = self._unknown_lengths(ids, normalize()) if self.unk_id in ids else {}
        out, done, score = [], 0, np.float32(0.0)
        for k in close.tolist():
            start, end = int(starts[k]), int(ends[k])
            score = self._add_scores(score, array[done:start], done, unknown_lengths)
            new_ids, new_score = self._search("".join(self.pieces[t] for t in ids[start:end]), float(score))
            if new_ids is None:  # a character without a piece of its own: leave the stretch as it is
                new_ids = ids[start:end]
                new_score = self._add_scores(score, array[start:end], start, unknown_lengths)
            out += ids[done:start]
            out += new_ids
            done, score = end, np.float32(new_score)
        return out + ids[done:]

    def _gaps(self, ids, array, starts, ends):
        """For each stretch, how much better its best segmentation scores than its second best (inf if alone)."""
        single = ends - starts == 1
        first_ids = array[starts]
        missing = np.unique(first_ids[single & np.isnan(self.piece_gaps[first_ids])])
        for i in missing.tolist():
            self.piece_gaps[i] = self._gap(self.pieces[i])
        gaps = self.piece_gaps[first_ids]
        cache, pieces = self.gaps, self.pieces
        if len(cache) > self._CACHE_SIZE:
            cache.clear()
        for k in np.flatnonzero(~single).tolist():
            text = "".join([pieces[t] for t in ids[starts[k] : ends[k]]])
            gap = cache.get(text)
            if gap is None:
                gap = cache[text] = self._gap(text)
            gaps[k] = gap
        return gaps

    def _gap(self, text):
        """The best segmentation score of `text` minus the second best, in exact arithmetic (inf if only one)."""
        top = [(0.0, -np.inf)] + [(-np.inf, -np.inf)] * len(text)  # the two best scores of segmentations to each place
        table, longest = self.prefixes, self.longest
        for start in range(len(text)):
            first, second = top[start]
            for end in range(start + 1, min(len(text), start + longest) + 1):
                hit = table.get(text[start:end], False)
                if hit is False:
                    break
                if hit is not None:
                    best, runner_up = top[end]
                    for candidate in (first + hit[1], second + hit[1]):
                        if candidate > best:
                            best, runner_up = candidate, best
                        elif candidate > runner_up:
                            runner_up = candidate
                    top[end] = (best, runner_up)
        first, second = top[-1]
        return first - second if second > -np.inf else np.inf

    def _add_scores(self, score, ids, offset, unknown_lengths):
        """`score` plus the scores of `ids`, added one by one in float32; an unknown token scores once a character."""
        if not len(ids):
            return score
        scores = self.float32_scores[ids]
        if unknown_lengths:
            counts = np.ones(len(ids), dtype=np.int64)
            for i in np.flatnonzero(ids == self.unk_id).tolist():
                counts[i] = unknown_lengths[offset + i]
            scores = np.repeat(scores, counts)
        return np.add.accumulate(np.concatenate(([score], scores)).astype(np.float32))[-1]

    def _unknown_lengths(self, ids, normalized):
        """Token index -> how many characters each unknown token (a run of characters without a piece) covers."""
        lengths, position = {}, 0
        for i, token in enumerate(ids):
            if token == self.unk_id:
                end = position + 1
                while end < len(normalized) and normalized[end] not in self.single_characters:
                    end += 1
                lengths[i] = end - position
                position = end
            else:
                position += len(self.pieces[token])
        return lengths

    def _search(self, text, start_score):
        """0.1.99's best segmentation of `text` starting from the running score `start_score`, and the score after:
        its loop, starts in order and the pieces from each, each candidate a double compared unrounded with the
        float32 stored at its end."""
        best = [start_score] + [None] * len(text)
        starts, pieces = [0] * len(best), [0] * len(best)
        table, longest, pack, unpack = self.prefixes, self.longest, _FLOAT32.pack, _FLOAT32.unpack
        for start in range(len(text)):
            score = best[start]
            if score is None:  # a character without a piece of its own
                return None, start_score
            for end in range(start + 1, min(len(text), start + longest) + 1):
                hit = table.get(text[start:end], False)
                if hit is False:
                    break
                if hit is not None:
                    candidate, stored = score + hit[1], best[end]
                    if stored is None or candidate > stored:
                        best[end], starts[end], pieces[end] = unpack(pack(candidate))[0], start, hit[0]
        ids, end = [], len(text)
        while end:
            ids.append(pieces[end])
            end = starts[end]
        return ids[::-1], best[-1]


def _sentencepiece_to_tokenizers(model):
    """Build a `tokenizers` backend that segments like SentencePiece did when the model was trained."""
    model = _as_trained(model)
    trainer_spec, normalizer_spec = model.trainer_spec, model.normalizer_spec
    if (
        trainer_spec.model_type != model.UNIGRAM
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
    min_score = min(score for _, score, kind in model.pieces if kind == model.NORMAL)
    vocab = [
        (piece, score if kind == model.NORMAL else (len(piece) + 1) * min_score) for piece, score, kind in model.pieces
    ]
    backend = Tokenizer(models.Unigram(vocab, unk_id=trainer_spec.unk_id, byte_fallback=False))

    steps = []
    if normalizer_spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(normalizer_spec.precompiled_charsmap))
    steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    backend.normalizer = normalizers.Sequence(steps)
    # No pre-tokenizer: SentencePiece segments the whole text at once. Splitting where no piece continues (before a
    # run of spaces, around tabs and line breaks) would give the same segmentations but was measured no faster, and
    # on long texts it changes which near-ties agree with SentencePiece's float32 sums (see docs/tokenizer.md).
    # Metaspace turns every "▁" back into a space, the first token's too ("never" strips no prefix); it decodes
    # faster than an equivalent Replace, which runs a regular expression over each token.
    backend.decoder = decoders.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="never")
    return backend


# --- what both classes share --------------------------------------------------------------------------------------


def _check_encodable(text, name):
    """Raise a ValueError naming a lone surrogate in `text`: SentencePiece and `tokenizers` take UTF-8, which has none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"`{name}` holds a lone surrogate, {text[error.start]!r} at index {error.start}, which is not a character "
            "and cannot be tokenized (it often comes from decoding bytes with errors='surrogateescape')."
        ) from None


def _plain_ids(ids):
    """Python ints for ids given as a torch tensor or numpy array (a 0-d one gives one int); other ids as they are."""
    return ids.tolist() if hasattr(ids, "tolist") else ids


def _check_text(value, name, optional=True):
    """Raise a TypeError for inputs that are not text, a batch of texts or token ids; a ValueError for text that
    cannot be encoded."""
    if value is None and optional:
        return
    if isinstance(value, str):
        return _check_encodable(value, name)
    if isinstance(value, (list, tuple)):
        if all(isinstance(item, str) for item in value):
            for i, item in enumerate(value):
                _check_encodable(item, f"{name}[{i}]")
            return
        if all(isinstance(item, (list, tuple)) for item in value):  # words (is_split_into_words), or ids
            for i, item in enumerate(value):
                for j, word in enumerate(item):
                    if isinstance(word, str):
                        _check_encodable(word, f"{name}[{i}][{j}]")
            return
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return
        kinds = sorted({type(item).__name__ for item in value})
        got = f"a {type(value).__name__} of {', '.join(kinds)}"
    else:
        got = type(value).__name__
    raise TypeError(f"`{name}` must be a str, a list of str (a batch), or a list of int token ids; got {got}.")


class _ReplitLMTokenizerMixin:
    """What `ReplitLMTokenizer` and `ReplitLMTokenizerFast` share, written once: clear errors for bad input, padded
    batches turned into tensors through numpy, no special tokens added, and saving `spiece.model`."""

    model_input_names = ["input_ids", "attention_mask"]

    @classmethod
    def _from_pretrained(cls, *args, **kwargs):
        try:
            return super()._from_pretrained(*args, **kwargs)
        except ImportError as error:
            # transformers 4.x evaluates `except import_protobuf_decode_error()` when the constructor raises, and
            # that expression itself raises ImportError where protobuf is not installed: give back the constructor's
            # own error (a missing or corrupt spiece.model, a bad tokenizer_config.json), which the ImportError hides.
            if error.__context__ is not None and "protobuf" in str(error):
                raise error.__context__ from None
            raise

    def save_pretrained(self, save_directory, *args, **kwargs):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        # The saved auto_map names this module. transformers copies it beside the files only for a tokenizer loaded
        # through AutoTokenizer; one made from the class itself (the fast twin, or an import) would leave a folder
        # that AutoTokenizer cannot load.
        module = os.path.join(save_directory, os.path.basename(__file__))
        try:
            with open(os.path.join(save_directory, "tokenizer_config.json"), encoding="utf-8") as config:
                auto_map = json.load(config).get("auto_map") or {}
        except (OSError, ValueError):
            auto_map = {}
        named = [name for names in auto_map.values() for name in (names if isinstance(names, list) else [names])]
        names_this_module = any(str(name).startswith(f"{__name__.rpartition('.')[2]}.") for name in named)
        if names_this_module and not os.path.exists(module):
            copyfile(__file__, module)
        return files

    # -- input checks: the base classes' own errors for these are mixed, late, or (negative ids) absent

    def __call__(self, text=None, text_pair=None, *args, return_tensors=None, **kwargs):
        if kwargs.get("return_offsets_mapping") and not self.is_fast:  # transformers 5 returned none, silently
            raise NotImplementedError(
                "return_offsets_mapping=True needs the fast twin, ReplitLMTokenizerFast (docs/tokenizer.md): "
                "SentencePiece's own encoding gives no offsets"
            )
        _check_text(text, "text")
        _check_text(text_pair, "text_pair")
        _check_text(kwargs.get("text_target"), "text_target")
        _check_text(kwargs.get("text_pair_target"), "text_pair_target")
        is_batch = isinstance(text, (list, tuple)) and text and isinstance(text[0], str)
        if return_tensors != "pt" or not is_batch or kwargs.get("is_split_into_words"):
            return super().__call__(text, text_pair, *args, return_tensors=return_tensors, **kwargs)
        # transformers turns each field of a batch into a tensor with `torch.tensor(list_of_lists)`, which takes
        # longer than tokenizing the batch. Rectangular fields (padded, or all of one length) go through numpy; the
        # rest is left to transformers, which also raises its usual error for a ragged batch.
        import torch

        encoding = super().__call__(text, text_pair, *args, return_tensors=None, **kwargs)
        for key, value in encoding.items():
            if isinstance(value[0], list) and len({len(row) for row in value}) == 1:
                encoding[key] = torch.from_numpy(np.array(value, dtype=np.int64))
        encoding.convert_to_tensors(tensor_type=return_tensors)
        return encoding

    def encode(self, text, text_pair=None, *args, **kwargs):
        _check_text(text, "text", optional=False)
        _check_text(text_pair, "text_pair")
        return super().encode(text, text_pair, *args, **kwargs)

    if _TRANSFORMERS_4:  # transformers 5 has neither

        def encode_plus(self, text, text_pair=None, *args, **kwargs):
            _check_text(text, "text", optional=False)
            _check_text(text_pair, "text_pair")
            return super().encode_plus(text, text_pair, *args, **kwargs)

        def batch_encode_plus(self, batch_text_or_text_pairs, *args, **kwargs):
            _check_text(batch_text_or_text_pairs, "batch_text_or_text_pairs", optional=False)
            return super().batch_encode_plus(batch_text_or_text_pairs, *args, **kwargs)

    def tokenize(self, text, *args, **kwargs):
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str; got {type(text).__name__}.")
        _check_encodable(text, "text")
        return super().tokenize(text, *args, **kwargs)

    def _check_ids(self, ids):
        """Raise a ValueError naming the first of `ids` that is no token id, before any decoding."""
        ids = _plain_ids(ids)
        if isinstance(ids, int):
            ids = (ids,)
        size = len(self)
        if ids and (min(ids) < 0 or max(ids) >= size):
            bad = next(i for i in ids if not 0 <= i < size)
            raise ValueError(f"{bad} is not a token id of this tokenizer: ids go from 0 to {size - 1}.")

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        ids = _plain_ids(ids)
        self._check_ids(ids)
        return super().convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)

    def decode(self, token_ids, skip_special_tokens=False, **kwargs):
        # A batch (a 2-D tensor or array, a list of lists) gives a string per row, as transformers 5 decodes it
        # (4.x raised a TypeError from deep inside).
        rows = isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], (list, tuple))
        if rows or getattr(token_ids, "ndim", 1) == 2:
            return [self.decode(row, skip_special_tokens=skip_special_tokens, **kwargs) for row in token_ids]
        return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    # -- no special tokens, and spiece.model saved by both classes

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        # The model was trained on raw text: no BOS, no EOS, no separator.
        return token_ids_0 if token_ids_1 is None else token_ids_0 + token_ids_1

    def save_vocabulary(self, save_directory, filename_prefix=None):
        if not (self.vocab_file and os.path.isfile(self.vocab_file)):
            raise ValueError("This tokenizer was loaded without spiece.model, so it cannot save one.")
        if not os.path.isdir(save_directory):
            raise ValueError(f"Cannot save the vocabulary: {save_directory!r} is not a directory.")
        out_vocab_file = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        )
        if os.path.abspath(self.vocab_file) != os.path.abspath(out_vocab_file):
            copyfile(self.vocab_file, out_vocab_file)
        return (out_vocab_file,)


class ReplitLMTokenizer(_ReplitLMTokenizerMixin, PreTrainedTokenizer):
    """The replit-code-v1-3b tokenizer: SentencePiece's own encoding of `spiece.model`.

    `encode(text)` gives the ids SentencePiece gave when the model was trained, the same as
    `SentencePieceProcessor(spiece.model).encode(text)` with sentencepiece 0.1.99, and adds no special tokens.
    Literal `<|endoftext|>`, `<|pad|>` and `<|unk|>` in the text become their ids unless `split_special_tokens=True`.
    Decoding restores the text exactly (up to NFKC normalisation and unknown characters), whitespace included.

    Args:
        vocab_file: path of `spiece.model`.
        sp_model_kwargs: passed to `sentencepiece.SentencePieceProcessor`, e.g. to enable subword sampling.
    """

    vocab_files_names = VOCAB_FILES_NAMES

    def __init__(self, vocab_file=None, sp_model_kwargs=None, **kwargs):
        self.vocab_file = _vocab_file_path(vocab_file, kwargs.get("name_or_path"))
        self.sp_model_kwargs = sp_model_kwargs or {}
        # The base initialiser looks the special tokens up in the vocabulary, so SentencePiece has to be loaded first
        # (the original class loaded it afterwards and broke with transformers 4.34).
        model = _SentencePieceModel.read(self.vocab_file)
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self._ties = None
        self._marks_after_user_defined = {}
        try:
            if _SENTENCEPIECE_SCORES_AS_TRAINED:
                self.sp_model.LoadFromSerializedProto(model.serialize())
            else:
                self.sp_model.LoadFromSerializedProto(_as_trained(model).serialize())
                self._marks_after_user_defined = _marks_after_user_defined(model)
                if not self.sp_model_kwargs.get("enable_sampling"):  # sampled ids are no one's choice among ties
                    self._ties = _TrainingTimeTies(model)
        except RuntimeError as error:
            raise ValueError(f"{self.vocab_file!r} is not a valid SentencePiece model: {error}") from error
        self._pieces = [self.sp_model.id_to_piece(i) for i in range(self.sp_model.get_piece_size())]
        self._piece_ids = {piece: i for i, piece in enumerate(self._pieces)}
        super().__init__(sp_model_kwargs=self.sp_model_kwargs, **_init_kwargs(kwargs))

    @property
    def vocab_size(self):
        return len(self._pieces)

    @property
    def _tokenizer(self):
        """The `tokenizers` twin's backend, for code that decodes a stream of ids with it (`transformers serve` reads
        `tokenizer._tokenizer`); encoding stays SentencePiece's. Built on first use, and again once tokens are added:
        the twin holds the same added tokens under the same ids."""
        added = sorted((i, token) for i, token in self.added_tokens_decoder.items() if i >= self.vocab_size)
        key = [(i, token.content, token.special) for i, token in added]
        if self.__dict__.get("_twin_key") != key:
            named = {name: getattr(self, name) for name in ("eos_token", "unk_token", "pad_token")}
            twin = ReplitLMTokenizerFast(vocab_file=self.vocab_file, **named)
            for _, token in added:  # one at a time, in id order: each takes the next id, as it did here
                twin.add_tokens([token], special_tokens=token.special)
            self.__dict__.update(_twin_key=key, _twin_backend=twin.backend_tokenizer)
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
            _check_encodable(text, "text")
            return self._tokenize(text)
        return super().tokenize(text, **kwargs)  # which also rejects what is not text

    def _encode_ids(self, text):
        parts = self._split_after_user_defined(text)
        ids = self.sp_model.encode(text) if len(parts) == 1 else [i for p in parts for i in self.sp_model.encode(p)]
        if self._ties is not None:
            ids = self._ties(ids, lambda: "".join(map(self.sp_model.normalize, parts)))
        return ids

    def _split_after_user_defined(self, text) -> list[str]:
        """`text` cut after each user-defined piece that is followed by a mark NFKC would join to it (see
        `_marks_after_user_defined`), so that the mark stays apart as in SentencePiece's own handling of the piece."""
        cuts = []
        for mark, pieces in self._marks_after_user_defined.items():
            start = text.find(mark)
            while start != -1:
                if text.endswith(pieces, 0, start):
                    cuts.append(start)
                start = text.find(mark, start + 1)
        if not cuts:
            return [text]
        bounds = [0, *sorted(cuts), len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:])]

    def _tokenize(self, text, **kwargs):
        # Pieces looked up from ids rather than `out_type=str`, which is slower and spells unknown characters out
        # instead of naming the unknown token.
        return list(map(self._pieces.__getitem__, self._encode_ids(text)))

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
        ids = _plain_ids(ids)
        if isinstance(ids, int):
            return super().convert_ids_to_tokens(ids)
        ids = list(ids)
        if ids and min(ids) < 0:  # a negative index would quietly take a piece from the end
            self._check_ids(ids)
        if skip_special_tokens:
            ids = list(filterfalse(set(self.all_special_ids).__contains__, ids))
        try:
            # Special tokens are pieces too, under their own names.
            return list(map(self._pieces.__getitem__, ids))
        except IndexError:  # a token added to the vocabulary, or no token at all (which the mixin reports)
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


class ReplitLMTokenizerFast(_ReplitLMTokenizerMixin, PreTrainedTokenizerFast):
    """A `tokenizers` twin of [`ReplitLMTokenizer`], converted from the same `spiece.model`.

    Same special tokens, vocabulary and decoding, plus offsets. Its ids are [`ReplitLMTokenizer`]'s except where
    segmentations score the same or almost and sentencepiece 0.1.99's float32 rounding picks one, and where a
    combining mark follows a character that NFKC rewrites (`tokenizers` then drops the mark).
    """

    vocab_files_names = {**VOCAB_FILES_NAMES, "tokenizer_file": "tokenizer.json"}
    slow_tokenizer_class = ReplitLMTokenizer

    def __init__(self, vocab_file=None, tokenizer_file=None, **kwargs):
        if tokenizer_file is None or not os.path.isfile(tokenizer_file):
            vocab_file = _vocab_file_path(vocab_file, kwargs.get("name_or_path"))
            kwargs["tokenizer_object"] = _sentencepiece_to_tokenizers(_SentencePieceModel.read(vocab_file))
        super().__init__(vocab_file=vocab_file, tokenizer_file=tokenizer_file, **_init_kwargs(kwargs))
        self.vocab_file = vocab_file

    @classmethod
    def convert_to_native_format(cls, **kwargs):
        # transformers 5 would otherwise rebuild the backend with its generic SentencePiece converter; __init__ does it.
        return kwargs

    @property
    def can_save_slow_tokenizer(self):
        return self.vocab_file is not None and os.path.isfile(self.vocab_file)

    def _decode(self, token_ids, *args, **kwargs):
        self._check_ids(token_ids)  # `tokenizers` skips ids it does not know and fails on negative ones
        return super()._decode(token_ids, *args, **kwargs)

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        file_names = super()._save_pretrained(
            save_directory, file_names, legacy_format=legacy_format, filename_prefix=filename_prefix
        )
        # transformers 5 writes only tokenizer.json: add spiece.model, which the exact (slow) tokenizer needs.
        saved_vocabulary = any(name.endswith(VOCAB_FILES_NAMES["vocab_file"]) for name in file_names)
        if self.can_save_slow_tokenizer and not saved_vocabulary:
            file_names += self.save_vocabulary(save_directory, filename_prefix=filename_prefix)
        return file_names
