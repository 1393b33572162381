"""Keras `Tokenizer` pickles, read without Keras, and a port of the two functions the scorers use.

The embedded classifiers ship their vocabularies as pickled Keras tokenizers. Unpickling runs
arbitrary code, and importing Keras would pull TensorFlow, so we (1) unpickle through an
allow-list that maps only the tokenizer classes to a plain state holder and refuses every other
global, and (2) re-implement `texts_to_sequences` and `pad_sequences`. The port is hand-written
because the originals live only inside Keras; it follows keras_preprocessing 1.1.2 `text.py` /
`sequence.py` (identical to Keras 3's `keras.src.legacy.preprocessing.text`), and the recorded
Keras reference ids test it.
"""

from __future__ import annotations

import collections
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The only globals a tokenizer pickle may name. Tokenizer classes become a state holder; the three
# containers are what their attribute values are made of (word counts are an OrderedDict,
# word_docs a defaultdict(int)). Anything else (os.system, builtins.eval, ...) is refused.
_STATE_CLASSES = frozenset(
    {
        ("keras_preprocessing.text", "Tokenizer"),
        ("keras.preprocessing.text", "Tokenizer"),
        ("keras.src.preprocessing.text", "Tokenizer"),
        ("keras.src.legacy.preprocessing.text", "Tokenizer"),
        ("tensorflow.keras.preprocessing.text", "Tokenizer"),
        # tox-block wraps its tokenizer in a scikit-learn transformer; only its state is needed.
        ("tox_block.data_processing.preprocessors", "TokenSequencer"),
    }
)
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "int"): int,
}

# Keras' default `filters` argument; every character in it becomes a split character.
DEFAULT_FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'


class _PickledState:
    """Receives the `__dict__` of an allow-listed class; it has no behaviour, so loading is inert."""


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _STATE_CLASSES:
            return _PickledState
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[module, name]
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name} from a tokenizer pickle; only Keras Tokenizer "
            f"state and {sorted('.'.join(k) for k in _SAFE_GLOBALS)} are allowed"
        )


@dataclass(frozen=True)
class KerasTokenizer:
    """The parts of a fitted Keras `Tokenizer` that `texts_to_sequences` reads.

    Attributes:
        word_index: Word -> id (1-based, by descending training frequency).
        num_words: Keep only ids < num_words (None: keep all).
        filters: Characters replaced by `split` before splitting.
        lower: Lower-case first (Python `str.lower`).
        split: The one separator (`str.split(split)`, so other whitespace stays inside words).
        char_level: Treat every character as a token.
        oov_token: Token whose id replaces unknown or cut-off words (None: drop them).
    """

    word_index: dict[str, int]
    num_words: int | None
    filters: str = DEFAULT_FILTERS
    lower: bool = True
    split: str = " "
    char_level: bool = False
    oov_token: str | None = None
    # str.translate table built once (per text it would dominate the cost of short texts).
    _table: dict[int, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_table", str.maketrans({c: self.split for c in self.filters}))

    def words(self, text: str) -> list[str]:
        """Keras `text_to_word_sequence`: lower-case, map filter characters to `split`, split."""
        if self.char_level:
            return list(text.lower() if self.lower else text)
        if self.lower:
            text = text.lower()
        text = text.translate(self._table)
        return [w for w in text.split(self.split) if w]

    def texts_to_sequences(self, texts: list[str]) -> list[list[int]]:
        """Keras `Tokenizer.texts_to_sequences`: word ids, dropping (or OOV-mapping) unknown words."""
        index = self.word_index
        limit = self.num_words
        oov = index.get(self.oov_token) if self.oov_token is not None else None
        out = []
        for text in texts:
            ids = []
            for word in self.words(text):
                i = index.get(word)
                if i is not None and not (limit and i >= limit):
                    ids.append(i)
                elif oov is not None:
                    ids.append(oov)
            out.append(ids)
        return out


def pad_sequences(sequences: list[list[int]], maxlen: int) -> np.ndarray:
    """Keras `pad_sequences` defaults: pre-pad with 0 and pre-truncate (keep the *last* `maxlen` ids).

    Returns:
        int64 array [n_sequences, maxlen].
    """
    out = np.zeros((len(sequences), maxlen), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-maxlen:]
        if tail:
            out[row, maxlen - len(tail) :] = tail
    return out


def load_keras_tokenizer(path: str | Path) -> KerasTokenizer:
    """Read a pickled Keras `Tokenizer` (or tox-block's wrapper around one) without importing Keras.

    Args:
        path: The pickle file.

    Returns:
        The tokenizer's configuration and vocabulary.

    Raises:
        pickle.UnpicklingError: The pickle names a global outside the allow-list.
        ValueError: The pickle holds no tokenizer state.
    """
    with Path(path).open("rb") as fh:
        state = _AllowListUnpickler(fh).load()
    if isinstance(state, _PickledState) and "word_index" not in vars(state):
        state = getattr(state, "tokenizer", None)  # tox-block's TokenSequencer.tokenizer
    if not isinstance(state, _PickledState) or "word_index" not in vars(state):
        raise ValueError(f"{path} holds no Keras Tokenizer state (no word_index)")
    s = vars(state)
    if s.get("analyzer") is not None:
        raise ValueError(f"{path} uses a custom analyzer, which this port does not reproduce")
    return KerasTokenizer(
        word_index=dict(s["word_index"]),
        num_words=s.get("num_words"),
        filters=s.get("filters", DEFAULT_FILTERS),
        lower=s.get("lower", True),
        split=s.get("split", " "),
        char_level=s.get("char_level", False),
        oov_token=s.get("oov_token"),
    )
