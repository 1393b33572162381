"""Encoder parity: every pooled vector equals an independent Hugging Face computation.

The reference renders each template's string by hand, finds the prompt's tokens from the
tokenizer's character offsets, runs the *unbatched, unpadded* Hugging Face model with
`output_hidden_states=True` and averages the span in numpy. Layer L is read with a forward hook
on the last decoder layer, because HF's last `hidden_states` entry is after the final norm.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from aligned_probing.data.templates import SYSTEM_LINES, render_prompt
from aligned_probing.encoding.encoder import EmptyContinuationWarning, _pad_batch, _Row, encode
from aligned_probing.encoding.store import ActivationStore
from aligned_probing.models import load_model

TOL = 1e-5

# The rendered strings of templates 0-4 without a chat template, written out by hand.
RENDERED = {
    0: "{p}",
    1: "Complete the following text.\n{p}",
    2: "Complete the following text.\nText: {p}\nContinuation:",
    3: "You are a helpful, respectful and honest assistant. Complete the following text.\n{p}",
    4: (
        "You are a helpful, respectful and honest assistant. Complete the following text.\n"
        "Text: {p}\nContinuation:"
    ),
}
BODIES = {0: "{p}", 1: "{p}", 2: "Text: {p}\nContinuation:", 3: "{p}", 4: "Text: {p}\nContinuation:"}

PROMPTS = pd.DataFrame(
    {
        "prompt_id": ["fox", "newline", "day", "short"],
        "text": [
            "The quick brown fox",
            "You are a stupid idiot\nand I hate",  # a newline inside the prompt
            "What a lovely day for a walk in the park",
            "hello",
        ],
    }
)
CONTINUATION_TEXTS = {
    ("fox", 0): " jumps over the lazy dog.",
    ("fox", 1): " and",  # stopped at EOS after one token: padded in its batch
    ("newline", 0): " you so much, friends",
    ("day", 0): " with friends",
    ("day", 1): " 123.",
    ("short", 0): " world",
}


def _continuations(tokenizer, template: int = 0) -> pd.DataFrame:
    rows = []
    for (pid, idx), text in CONTINUATION_TEXTS.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append(
            {
                "prompt_id": pid,
                "continuation_idx": idx,
                "template": template,
                "token_ids": ids,
                "n_tokens": len(ids),
                "stopped_at_eos": idx == 1,
            }
        )
    return pd.DataFrame(rows)


def _reference_render(tokenizer, prompt: str, template: int, chat: bool) -> tuple[list[int], int, int]:
    """Rendered ids and the prompt's token span, from the tokenizer's offsets (not render_prompt)."""
    if chat:
        body = BODIES[template].format(p=prompt)
        messages = [{"role": "user", "content": body}]
        if template in SYSTEM_LINES:
            messages.insert(0, {"role": "system", "content": SYSTEM_LINES[template]})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        start = text.index(prompt)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    else:
        text = RENDERED[template].format(p=prompt)
        start = len(RENDERED[template].split("{p}")[0])
        enc = tokenizer(text, return_offsets_mapping=True)
    end = start + len(prompt)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
    return list(enc["input_ids"]), inside[0], inside[-1] + 1


def _hf_states(hf_model, ids: list[int]) -> list[np.ndarray]:
    """Residual layers 0..L of one unpadded sequence: [pos, d_model] each."""
    captured = {}
    last = hf_model.get_decoder().layers[-1]
    handle = last.register_forward_hook(
        lambda mod, args, out: captured.__setitem__("L", out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            out = hf_model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        handle.remove()
    states = [h[0].numpy() for h in out.hidden_states[:-1]] + [captured["L"][0].numpy()]
    return states


def _assert_parity(model, store: ActivationStore, conts: pd.DataFrame | None, template: int, chat: bool):
    texts = dict(zip(PROMPTS["prompt_id"], PROMPTS["text"], strict=True))
    layers = {
        pos: [store.layer(layer, pos) for layer in range(model.n_layers + 1)] for pos in store.positions
    }
    lasts = {
        pos: [store.layer(layer, pos, "last") for layer in range(model.n_layers + 1)]
        for pos in store.positions
        if "last" in store.poolings
    }
    for i, (pid, idx) in enumerate(
        zip(store.index["prompt_id"], store.index["continuation_idx"], strict=True)
    ):
        prompt_ids, a, b = _reference_render(model.tokenizer, texts[pid], template, chat)
        cont = (
            []
            if idx == -1
            else list(conts.set_index(["prompt_id", "continuation_idx"]).loc[(pid, idx), "token_ids"])
        )
        states = _hf_states(model.hf_model, prompt_ids + cont)
        n = len(prompt_ids)
        for layer, x in enumerate(states):
            expected = {"input": x[a:b].mean(0), "output": x[n : n + len(cont)].mean(0) if cont else None}
            for pos in store.positions:
                drift = np.abs(layers[pos][layer][i] - expected[pos]).max()
                assert drift < TOL, (
                    f"{pos} mean of row {i} ({pid}, {idx}) layer {layer} drifts {drift:.2e} from HF: "
                    "wrong span, padding leaking into the mean, or wrong position ids."
                )
            if "output" in lasts:
                np.testing.assert_allclose(lasts["output"][layer][i], x[n + len(cont) - 1], atol=TOL)
            if "input" in lasts:
                np.testing.assert_allclose(lasts["input"][layer][i], x[b - 1], atol=TOL)


@pytest.mark.parametrize(
    ("template", "padding_side"),
    [(0, "right"), (0, "left"), (1, "left"), (2, "right"), (2, "left"), (3, "left"), (4, "left")],
)
def test_pooled_vectors_equal_hf_hidden_states(tiny_model, tmp_path, template, padding_side):
    conts = _continuations(tiny_model.tokenizer, template)
    store = encode(
        tiny_model,
        PROMPTS,
        conts,
        template=template,
        poolings=("mean", "last"),
        batch_size=3,
        store=tmp_path / "s",
        padding_side=padding_side,
    )
    assert len(store) == len(conts)
    assert store.layer(0, "output").shape == (len(conts), tiny_model.d_model)
    _assert_parity(tiny_model, store, conts, template, chat=False)


@pytest.mark.parametrize("template", [1, 2, 3, 4])
def test_chat_template_parity(tiny_chat_model, tmp_path, template):
    conts = _continuations(tiny_chat_model.tokenizer, template)
    store = encode(
        tiny_chat_model,
        PROMPTS,
        conts,
        template=template,
        batch_size=4,
        store=tmp_path / "s",
        padding_side="left",
    )
    assert store.manifest["chat"] is True
    _assert_parity(tiny_chat_model, store, conts, template, chat=True)


def test_gemma_parity_with_sliding_window_and_padding(tiny_gemma_dir, tmp_path):
    # Gemma scales the embedding by sqrt(d_model) (layer 0) and uses sliding-window attention.
    model = load_model(tiny_gemma_dir)
    conts = _continuations(model.tokenizer, template=2)
    for side in ("right", "left"):
        store = encode(
            model, PROMPTS, conts, template=2, batch_size=6, store=tmp_path / side, padding_side=side
        )
        _assert_parity(model, store, conts, template=2, chat=False)


def test_input_only_run(tiny_model, tmp_path):
    store = encode(
        tiny_model, PROMPTS, None, template=0, poolings=("mean", "last"), batch_size=2, store=tmp_path / "s"
    )
    assert store.positions == ("input",)
    assert (store.index["continuation_idx"] == -1).all()
    assert sorted(store.index["prompt_id"]) == sorted(PROMPTS["prompt_id"])
    _assert_parity(tiny_model, store, None, template=0, chat=False)


def test_batched_equals_unbatched(tiny_model, tmp_path):
    conts = _continuations(tiny_model.tokenizer)
    one = encode(tiny_model, PROMPTS, conts, batch_size=1, store=tmp_path / "one")
    many = encode(tiny_model, PROMPTS, conts, batch_size=6, store=tmp_path / "many", padding_side="left")
    key = ["prompt_id", "continuation_idx"]
    order = many.index.reset_index().set_index(key).loc[pd.MultiIndex.from_frame(one.index[key]), "index"]
    for layer in range(tiny_model.n_layers + 1):
        for pos in ("input", "output"):
            np.testing.assert_allclose(
                one.layer(layer, pos), many.layer(layer, pos)[order.to_numpy()], atol=TOL
            )


def test_max_pooling_matches_numpy(tiny_model, tmp_path):
    conts = _continuations(tiny_model.tokenizer)
    store = encode(tiny_model, PROMPTS, conts, poolings=("max",), batch_size=4, store=tmp_path / "s")
    texts = dict(zip(PROMPTS["prompt_id"], PROMPTS["text"], strict=True))
    row = store.index.reset_index().set_index(["prompt_id", "continuation_idx"]).loc[("fox", 1), "index"]
    ids, a, b = _reference_render(tiny_model.tokenizer, texts["fox"], 0, chat=False)
    cont = tiny_model.tokenizer(CONTINUATION_TEXTS[("fox", 1)], add_special_tokens=False)["input_ids"]
    states = _hf_states(tiny_model.hf_model, ids + cont)
    for layer, x in enumerate(states):
        np.testing.assert_allclose(store.layer(layer, "input", "max")[row], x[a:b].max(0), atol=TOL)
        np.testing.assert_allclose(store.layer(layer, "output", "max")[row], x[len(ids) :].max(0), atol=TOL)


def test_padding_masks_by_hand():
    # Row a: prompt 10 11, template token 12, continuation 13 14 -> input [0, 2), output [3, 5).
    # Row b: prompt 20, continuation 21 -> input [0, 1), output [1, 2).
    long = _Row("a", 0, [10, 11, 12, 13, 14], (0, 2), (3, 5))
    short = _Row("b", 0, [20, 21], (0, 1), (1, 2))
    ids, attn, spans = _pad_batch([long, short], pad_id=0, padding_side="right")
    assert ids.tolist() == [
        [10, 11, 12, 13, 14],  # a
        [20, 21, 0, 0, 0],  # b, right-padded
    ]
    assert attn.tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ]
    assert spans["input"].int().tolist() == [
        [1, 1, 0, 0, 0],  # the template token 12 is outside the prompt span
        [1, 0, 0, 0, 0],
    ]
    assert spans["output"].int().tolist() == [
        [0, 0, 0, 1, 1],
        [0, 1, 0, 0, 0],  # padding is outside the output span
    ]
    ids, attn, spans = _pad_batch([long, short], pad_id=0, padding_side="left")
    assert ids.tolist() == [
        [10, 11, 12, 13, 14],
        [0, 0, 0, 20, 21],  # b, left-padded
    ]
    assert attn.tolist() == [
        [1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1],
    ]
    assert spans["input"].int().tolist() == [
        [1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0],
    ]
    assert spans["output"].int().tolist() == [
        [0, 0, 0, 1, 1],
        [0, 0, 0, 0, 1],
    ]


def test_no_unembedding_or_final_norm(tiny_model, tmp_path):
    calls = []
    hf = tiny_model.hf_model
    handles = [
        hf.get_output_embeddings().register_forward_hook(lambda *a: calls.append("lm_head")),
        hf.get_decoder().norm.register_forward_hook(lambda *a: calls.append("norm")),
    ]
    try:
        encode(tiny_model, PROMPTS, _continuations(tiny_model.tokenizer), batch_size=3, store=tmp_path / "s")
    finally:
        for h in handles:
            h.remove()
    assert calls == []
    assert not tiny_model.bridge.hook_dict["blocks.0.hook_resid_pre"].fwd_hooks, (
        "encoder hooks were left behind"
    )


def test_empty_continuation_is_skipped_with_warning(tiny_model, tmp_path):
    conts = _continuations(tiny_model.tokenizer)
    conts.loc[len(conts)] = {
        "prompt_id": "short",
        "continuation_idx": 1,
        "template": 0,
        "token_ids": [],
        "n_tokens": 0,
        "stopped_at_eos": True,
    }
    with pytest.warns(EmptyContinuationWarning, match="Skipped 1 continuations with 0 tokens"):
        store = encode(tiny_model, PROMPTS, conts, batch_size=4, store=tmp_path / "s")
    assert len(store) == len(conts) - 1
    assert ("short", 1) not in store.committed()
    assert np.isfinite(store.layer(2, "output")).all()


def test_resume_after_crash_equals_uninterrupted_run(tiny_model, tmp_path, monkeypatch):
    import aligned_probing.encoding.store as store_module

    conts = _continuations(tiny_model.tokenizer, template=2)
    kwargs = dict(template=2, poolings=("mean", "last"), batch_size=2, flush_rows=2)
    full = encode(tiny_model, PROMPTS, conts, store=tmp_path / "full", **kwargs)

    real_write = store_module._atomic_write
    index_writes = []

    def crash_on_second_commit(path, write):
        if path.name == "index.parquet":
            index_writes.append(path)
            if len(index_writes) == 3:  # creation, first flush, then die before the 2nd commit
                raise KeyboardInterrupt("killed")
        real_write(path, write)

    monkeypatch.setattr(store_module, "_atomic_write", crash_on_second_commit)
    with pytest.raises(KeyboardInterrupt):
        encode(tiny_model, PROMPTS, conts, store=tmp_path / "resumed", **kwargs)
    monkeypatch.setattr(store_module, "_atomic_write", real_write)
    partial = ActivationStore.open(tmp_path / "resumed")
    assert len(partial) == 2  # the first flush is committed, the orphan second one rolled back
    assert partial.array("input", "mean").shape[1] == 2

    resumed = encode(tiny_model, PROMPTS, conts, store=tmp_path / "resumed", **kwargs)
    pd.testing.assert_frame_equal(resumed.index, full.index)
    for pos in ("input", "output"):
        for pooling in ("mean", "last"):
            np.testing.assert_array_equal(resumed.array(pos, pooling)[:], full.array(pos, pooling)[:])


def test_append_new_prompts_keeps_rows_aligned(tiny_model, tmp_path):
    conts = _continuations(tiny_model.tokenizer)
    first = conts[conts["prompt_id"].isin(["fox", "day"])]
    encode(tiny_model, PROMPTS, first, batch_size=2, store=tmp_path / "s")
    store = encode(tiny_model, PROMPTS, conts, batch_size=2, store=tmp_path / "s")
    assert len(store) == len(conts)
    first_keys = set(zip(first["prompt_id"], first["continuation_idx"], strict=True))
    assert set(store.index.iloc[: len(first)].itertuples(index=False, name=None)) == first_keys
    _assert_parity(tiny_model, store, conts, template=0, chat=False)


def test_store_for_other_template_or_model_is_refused(tiny_model, tiny_gemma_dir, tmp_path):
    encode(tiny_model, PROMPTS, None, template=0, store=tmp_path / "s")
    with pytest.raises(ValueError, match=r"template=0.*template=1"):
        encode(tiny_model, PROMPTS, None, template=1, store=tmp_path / "s")
    with pytest.raises(ValueError, match=r"poolings="):
        encode(tiny_model, PROMPTS, None, template=0, poolings=("last",), store=tmp_path / "s")
    gemma = load_model(tiny_gemma_dir)
    with pytest.raises(ValueError, match=r"model=.*was expected"):
        encode(gemma, PROMPTS, None, template=0, store=tmp_path / "s")


def test_input_errors(tiny_model, tmp_path):
    conts = _continuations(tiny_model.tokenizer)
    with pytest.raises(ValueError, match=r"generated with template \[0\], but template=2"):
        encode(tiny_model, PROMPTS, conts, template=2, store=tmp_path / "a")
    with pytest.raises(ValueError, match="prompt_ids absent from prompts"):
        encode(tiny_model, PROMPTS[PROMPTS["prompt_id"] != "fox"], conts, store=tmp_path / "b")
    with pytest.raises(ValueError, match="pooling must be one of"):
        encode(tiny_model, PROMPTS, conts, poolings=("median",), store=tmp_path / "c")
    with pytest.raises(ValueError, match="padding_side must be one of"):
        encode(tiny_model, PROMPTS, conts, padding_side="middle", store=tmp_path / "d")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        encode(tiny_model, PROMPTS, conts, batch_size=0, store=tmp_path / "e")
    with pytest.raises(ValueError, match="missing columns \\['token_ids'\\]"):
        encode(tiny_model, PROMPTS, conts.drop(columns="token_ids"), store=tmp_path / "f")
    with pytest.raises(TypeError, match="PromptSet or a DataFrame"):
        encode(tiny_model, ["a prompt"], None, store=tmp_path / "g")


@pytest.mark.slow
def test_smollm2_shapes_and_values(tmp_path):
    model = load_model("smollm2-135m-instruct")
    prompts = pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(6)],
            "text": [
                "You are such an idiot",
                "The weather today is",
                "I will\nfind you",
                "Thanks for the help",
                "Shut up, you",
                "Once upon a time",
            ],
        }
    )
    conts = pd.DataFrame(
        [
            {
                "prompt_id": f"p{i}",
                "continuation_idx": k,
                "template": 0,
                "token_ids": model.tokenizer(f" and then {'more ' * (i + k)}", add_special_tokens=False)[
                    "input_ids"
                ],
            }
            for i in range(6)
            for k in range(2)
        ]
    )
    store = encode(model, prompts, conts, poolings=("mean", "last"), batch_size=4, store=tmp_path / "s")
    assert store.array("input", "mean").shape == (31, 12, 576)
    assert store.array("output", "last").shape == (31, 12, 576)
    for layer in (0, 15, 30):
        for pos in ("input", "output"):
            x = store.layer(layer, pos)
            assert x.shape == (12, 576) and x.dtype == np.float32
            assert np.isfinite(x).all()
    # The last layer (before the final norm) carries the large residual norms the probes will see.
    assert (
        np.linalg.norm(store.layer(30, "output"), axis=1).min()
        > np.linalg.norm(store.layer(0, "output"), axis=1).max()
    )


def test_aggregators_by_hand():
    from aligned_probing.encoding.pooling import get_aggregator

    acts = torch.tensor([[[1.0, 10.0], [3.0, -10.0], [5.0, 0.0]]])  # [batch 1, pos 3, d_model 2]
    mask = torch.tensor([[True, True, False]])  # the span is positions 0 and 1
    assert get_aggregator("mean")(acts, mask).tolist() == [[2.0, 0.0]]
    assert get_aggregator("last")(acts, mask).tolist() == [[3.0, -10.0]]
    assert get_aggregator("max")(acts, mask).tolist() == [[3.0, 10.0]]
    # Linear poolings expose their weights, so the encoder can stack them into one matmul.
    assert get_aggregator("mean").weights(mask).tolist() == [[0.5, 0.5, 0.0]]
    assert get_aggregator("last").weights(mask).tolist() == [[0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match=r"pooling must be one of \['last', 'max', 'mean'\], got 'sum'"):
        get_aggregator("sum")


def test_truncated_prompts_are_encoded_as_generation_rendered_them(tiny_model, tmp_path):
    from aligned_probing.generation import generate_continuations

    long = pd.DataFrame({"prompt_id": ["long"], "text": ["The quick brown fox jumps over the lazy dog. " * 40]})
    budget = tiny_model.context_length - 12  # generation's rule: context_length - max_new_tokens
    conts = generate_continuations(tiny_model, long, k=1, seed=0, max_new_tokens=12)
    conts = conts.assign(token_ids=[conts["token_ids"].iloc[0][:5]])  # shorter than max_new_tokens
    rendered = render_prompt(tiny_model.tokenizer, long["text"].iloc[0], 0, max_tokens=budget)
    assert rendered.truncated  # the prompt really was cut
    store = encode(tiny_model, long, conts, store=tmp_path / "s", max_new_tokens=12)
    states = _hf_states(tiny_model.hf_model, rendered.input_ids + conts["token_ids"].iloc[0])
    a, b = rendered.prompt_start, rendered.prompt_end
    for layer in (0, tiny_model.n_layers):
        np.testing.assert_allclose(store.layer(layer, "input")[0], states[layer][a:b].mean(0), atol=TOL)
    # The old rule (room for the longest continuation only) keeps more prompt tokens: a different prompt.
    old = encode(tiny_model, long, conts, store=tmp_path / "old")
    assert np.abs(old.layer(tiny_model.n_layers, "input")[0] - store.layer(tiny_model.n_layers, "input")[0]).max() > 1e-4
