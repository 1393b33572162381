"""The Keras tokenizer port (hand-written expected ids) and the allow-list unpickler."""

from __future__ import annotations

import collections
import os
import pickle
import sys
import types

import numpy as np
import pytest

from aligned_probing.scoring._keras_tokenizer import KerasTokenizer, load_keras_tokenizer, pad_sequences

WORDS = {"you": 1, "are": 2, "an": 3, "idiot": 4, "don't": 5, "café": 6, "rare": 7}


def test_texts_to_sequences_by_hand():
    tok = KerasTokenizer(word_index=WORDS, num_words=7)  # ids >= 7 are cut off
    assert tok.texts_to_sequences(
        [
            "You ARE an idiot!",  # lower-cased; '!' is a filter character
            "you,are;an(idiot)",  # filter characters split words
            "don't",  # the apostrophe is not a filter character
            "you\u00a0are idiot",  # a non-breaking space does not split: 'you\xa0are' is unknown
            "you\rare",  # neither does \r (only ' ' after filtering \t and \n)
            "you\tare\nan",  # \t and \n are filters, so they split
            "CAFÉ rare",  # unicode lower-casing; 'rare' (id 7) is beyond num_words
            "",  # nothing
            "unknown words only",  # unknown words are dropped (no oov_token)
        ]
    ) == [[1, 2, 3, 4], [1, 2, 3, 4], [5], [4], [], [1, 2, 3], [6], [], []]


def test_oov_token_replaces_unknown_and_cut_off_words():
    tok = KerasTokenizer(
        word_index={"<oov>": 1, **{w: i + 1 for w, i in WORDS.items()}}, num_words=8, oov_token="<oov>"
    )
    #                                 you=2 zzz->oov rare=8 >= num_words -> oov
    assert tok.texts_to_sequences(["you zzz rare"]) == [[2, 1, 1]]


def test_pad_sequences_pre_pads_and_pre_truncates():
    out = pad_sequences([[1, 2], [], [1, 2, 3, 4, 5]], maxlen=4)
    np.testing.assert_array_equal(
        out,
        [
            [0, 0, 1, 2],  # pre-padded with 0
            [0, 0, 0, 0],  # empty -> all padding
            [2, 3, 4, 5],  # pre-truncated: the last maxlen ids are kept
        ],
    )
    assert out.dtype == np.int64


def _pickle_with_fake_module(module: str, name: str, state: dict, monkeypatch) -> bytes:
    """Pickle an instance of a class that pretends to live in `module` (e.g. Keras)."""
    parts = module.split(".")
    with monkeypatch.context() as patch:
        for i in range(1, len(parts) + 1):  # pickle re-imports the module, parents first
            patch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        cls = type(name, (), {"__module__": module})
        setattr(sys.modules[module], name, cls)
        obj = cls.__new__(cls)
        obj.__dict__.update(state)
        return pickle.dumps(obj, protocol=4)


def test_loads_keras_tokenizer_state_without_keras(tmp_path, monkeypatch):
    state = {
        "word_index": collections.OrderedDict(WORDS),
        "num_words": 5,
        "filters": "!",
        "lower": False,
        "split": " ",
        "char_level": False,
        "oov_token": None,
        "word_docs": collections.defaultdict(int, {"you": 3}),
    }
    path = tmp_path / "tok.pickle"
    path.write_bytes(
        _pickle_with_fake_module("keras.src.legacy.preprocessing.text", "Tokenizer", state, monkeypatch)
    )
    tok = load_keras_tokenizer(path)
    assert tok.word_index == WORDS and tok.num_words == 5 and tok.filters == "!" and tok.lower is False
    assert tok.texts_to_sequences(["you are!an"]) == [[1, 2, 3]]


def test_loads_tox_block_wrapper(tmp_path, monkeypatch):
    # tox-block pickles a scikit-learn TokenSequencer whose `tokenizer` attribute is the Tokenizer.
    with monkeypatch.context() as patch:
        for mod in ("keras_preprocessing", "keras_preprocessing.text"):
            patch.setitem(sys.modules, mod, types.ModuleType(mod))
        tok_cls = type("Tokenizer", (), {"__module__": "keras_preprocessing.text"})
        sys.modules["keras_preprocessing.text"].Tokenizer = tok_cls
        tokenizer = tok_cls.__new__(tok_cls)
        tokenizer.__dict__.update({"word_index": WORDS, "num_words": 20000})
        data = _pickle_with_fake_module(
            "tox_block.data_processing.preprocessors",
            "TokenSequencer",
            {"max_sequence_length": 100, "tokenizer": tokenizer},
            monkeypatch,
        )
    path = tmp_path / "encoder.pkl"
    path.write_bytes(data)
    assert load_keras_tokenizer(path).word_index == WORDS


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_refuses_any_other_global(tmp_path):
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (posix|os)\.system"):
        load_keras_tokenizer(path)
    path.write_bytes(pickle.dumps({"word_index": {"a": 1}, "f": np.float64(1.0)}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global numpy"):
        load_keras_tokenizer(path)


def test_pickle_without_tokenizer_state_is_an_error(tmp_path):
    path = tmp_path / "plain.pickle"
    path.write_bytes(pickle.dumps({"word_index": {"a": 1}}))
    with pytest.raises(ValueError, match="holds no Keras Tokenizer state"):
        load_keras_tokenizer(path)
