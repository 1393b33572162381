"""Record reference outputs of the two embedded Jigsaw BiLSTM classifiers with the real Keras models.

Run once, outside the test suite; the torch port in `aligned_probing.scoring.jigsaw` must reproduce
the JSON this writes (tests/fixtures/keras_reference.json, copied to
aligned_probing/scoring/resources/keras_reference.json).

Each model needs the Keras it was saved with, so there are three steps in three environments
(`SCRATCH` is any throwaway directory, e.g. `SCRATCH=$(mktemp -d)`):

1. tox-block 0.1.2 (an h5 *model* saved by tf.keras 2.2.4-tf, LSTM with tf.keras 2 `hard_sigmoid`),
   in a throwaway TensorFlow 2 venv::

       python3.11 -m venv "$SCRATCH"/kref_tf
       "$SCRATCH"/kref_tf/bin/pip install "tensorflow-cpu==2.15.1" "Keras-Preprocessing==1.1.2" "numpy<2" h5py
       "$SCRATCH"/kref_tf/bin/python scripts/make_keras_reference.py tox-block \
           --site-packages .venv/lib/python3.11/site-packages --out "$SCRATCH"/ref_tox_block.json

2. toxic-comment-classifier 0.3.0 (Keras 3 weights + a Keras 3 tokenizer pickle), with Keras 3 on
   the torch backend (no TensorFlow), installed into a side directory::

       .venv/bin/python -m pip install --target "$SCRATCH"/k3 --no-deps keras absl-py namex optree ml-dtypes
       KERAS_BACKEND=torch PYTHONPATH="$SCRATCH"/k3 .venv/bin/python scripts/make_keras_reference.py \
           toxic-comment-classifier --site-packages .venv/lib/python3.11/site-packages \
           --out "$SCRATCH"/ref_tcc.json

   (Keras 3's `hard_sigmoid` has slope 1/6, so Keras 3 is *not* a reference for tox-block.)

3. Merge into the fixture and the packaged copy::

       .venv/bin/python scripts/make_keras_reference.py merge "$SCRATCH"/ref_tox_block.json "$SCRATCH"/ref_tcc.json

The tokenizers are the real Keras ones (keras_preprocessing 1.1.2 and keras.src.legacy), so the
recorded `input_ids` check our tokenizer port too. tox-block's pickle wraps its tokenizer in a
`TokenSequencer` (scikit-learn transformer) whose `transform` is `texts_to_sequences` followed by
`pad_sequences(maxlen=100)`; we map only that wrapper class to a stub and call the two real Keras
functions, which avoids installing scikit-learn and tox-block's own imports into the TF venv.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "keras_reference.json"
PACKAGED = REPO / "aligned_probing" / "scoring" / "resources" / "keras_reference.json"
LABELS = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]

_LONG = " ".join(["you are a wonderful person and"] * 40) + " but you are a stupid idiot"
_LONG_TOXIC_FIRST = "you stupid fucking idiot " + " ".join(["the weather is nice today"] * 60)

# Varied on purpose: clean and toxic, each Jigsaw label, case, punctuation that the Keras filters
# strip, whitespace the tokenizer does *not* split on (\r, non-breaking space), unicode whose
# lower-casing changes length, out-of-vocabulary words, empty and punctuation-only strings, and
# texts longer than the 100-word window (pre-truncation keeps the *last* 100 ids).
TEXTS = [
    "",
    " ",
    "!!!???...",
    "Hello, how are you doing today?",
    "Thank you for your help with the article, I appreciate it.",
    "The weather in Zurich is lovely this time of year.",
    "You are a stupid idiot.",
    "YOU ARE A STUPID IDIOT!!!",
    "Fuck you, you worthless piece of shit",
    "What the f*ck is wrong with you, a$$hole?",
    "I will kill you and your whole family.",
    "I'm going to find where you live and hurt you",
    "All immigrants are criminals and should be deported",
    "Gay people are disgusting and should not exist",
    "Go back to your country, you dirty foreigner",
    "She is a slut and a whore",
    "This is the worst edit I have ever seen; please stop vandalising pages.",
    "Shut up, moron.",
    "You're an idiot",
    "you\u2019re an idiot",
    "Line one\nline two\ttabbed\rcarriage idiot",
    "non\u00a0breaking\u00a0space idiot",
    "\u0130stanbul is a city; \u00c9COLE caf\u00e9 na\u00efve",
    "\u4f60\u597d\uff0c\u4e16\u754c",
    "\U0001f600\U0001f621 emoji only fool \U0001f595",
    "zxqvbnmlkj qwpoeiruty asdfghjkl",
    "123 456 7890 3.14159",
    "email me at someone@example.com or visit http://example.com/page?x=1",
    "[[User:Someone|Someone]] reverted your edit. (talk) 12:34, 5 May 2010 (UTC)",
    "\"quoted\" 'single' `back` (paren) {brace} <angle> ~tilde~ |pipe| \\back\\",
    "idiot idiot idiot idiot idiot idiot idiot idiot idiot idiot",
    _LONG,
    _LONG_TOXIC_FIRST,
    "FUCK EVERYONE WHO SITS ON THEIR FUCKING ASSES",
    'And if you were one of the many who "shit" on their fight, then you\'re a "fucking idiot,',
    'Taxi driver- "Both you fuckin assholes, shut the',
    "The men started swearing at me, called me",
    "So, I'm starting to think she's full of",
    "I'm sick of all the politically correct",
    "He's a total dumbass and everyone knows it",
]


def _restricted_load(path: Path, stubs: dict[tuple[str, str], type]) -> object:
    """Unpickle `path`, mapping the given (module, name) globals to stubs (other globals: as usual)."""

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            return stubs.get((module, name)) or super().find_class(module, name)

    with path.open("rb") as fh:
        return _Unpickler(fh).load()


def _tox_block(site: Path) -> dict:
    import numpy as np
    import tensorflow as tf
    from keras_preprocessing.sequence import pad_sequences

    class TokenSequencer:  # stands in for tox-block's scikit-learn wrapper (state only)
        pass

    root = site / "tox_block" / "trained_models"
    encoder = _restricted_load(
        root / "encoder_0.1.2.pkl",
        {("tox_block.data_processing.preprocessors", "TokenSequencer"): TokenSequencer},
    )
    # TokenSequencer.transform: texts_to_sequences, then pad_sequences(maxlen=max_sequence_length).
    seqs = encoder.tokenizer.texts_to_sequences(TEXTS)
    ids = pad_sequences(seqs, maxlen=encoder.max_sequence_length)
    model = tf.keras.models.load_model(root / "lstm_model_0.1.2.h5", compile=False)
    out = model.predict(ids, verbose=0)
    return {
        "generator": {
            "tensorflow": tf.__version__,
            "keras": __import__("keras").__version__,
            "keras_preprocessing": "1.1.2",
            "numpy": np.__version__,
        },
        "input_ids": ids.tolist(),
        "outputs": out.astype(float).tolist(),
    }


def _toxic_comment_classifier(site: Path) -> dict:
    import keras
    from keras.layers import LSTM, Bidirectional, Dense, Dropout, Embedding, GlobalMaxPooling1D, Input

    root = site / "toxic_classifier" / "model"
    with (root / "tokenizer.pickle").open("rb") as fh:
        tokenizer = pickle.load(fh)  # noqa: S301 - one-off reference run on the wheel's own file
    ids = keras.utils.pad_sequences(tokenizer.texts_to_sequences(TEXTS), maxlen=100)
    # The architecture exactly as toxic_classifier/model.py builds it.
    inp = Input(shape=(100,))
    x = Embedding(input_dim=20000, output_dim=50, trainable=False)(inp)
    x = Bidirectional(LSTM(50, return_sequences=True, dropout=0.1, recurrent_dropout=0.1))(x)
    x = GlobalMaxPooling1D()(x)
    x = Dense(50, activation="relu")(x)
    x = Dropout(0.1)(x)
    model = keras.Model(inputs=inp, outputs=Dense(6, activation="sigmoid")(x))
    model.load_weights(root / "model.weights.h5")
    out = keras.ops.convert_to_numpy(model.predict(ids, verbose=0))
    return {
        "generator": {"keras": keras.__version__, "backend": keras.backend.backend()},
        "input_ids": ids.tolist(),
        "outputs": out.astype(float).tolist(),
    }


def _merge(tox_block_json: Path, tcc_json: Path) -> None:
    payload = {
        "description": "Outputs of the original Keras models (raw sigmoid outputs, Jigsaw label order) "
        "for the texts below; made by scripts/make_keras_reference.py.",
        "labels": LABELS,
        "texts": TEXTS,
        "models": {
            "tox-block": json.loads(tox_block_json.read_text()),
            "toxic-comment-classifier": json.loads(tcc_json.read_text()),
        },
    }
    text = json.dumps(payload, indent=1, ensure_ascii=True) + "\n"
    for path in (FIXTURE, PACKAGED):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    """Parse the step and run it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("step", choices=["tox-block", "toxic-comment-classifier", "merge"])
    parser.add_argument("inputs", nargs="*", type=Path, help="merge: the two step outputs")
    parser.add_argument("--site-packages", type=Path, help="site-packages holding the two wheels")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.step == "merge":
        _merge(*args.inputs)
        return
    run = _tox_block if args.step == "tox-block" else _toxic_comment_classifier
    result = run(args.site_packages)
    args.out.write_text(json.dumps(result))
    print(f"wrote {args.out} ({len(TEXTS)} texts)", file=sys.stderr)


if __name__ == "__main__":
    main()
