"""The Detoxify backend runs the real `Detoxify(...).predict` on a tiny local checkpoint, offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from aligned_probing.scoring import DetoxifyScorer, get_scorer

JIGSAW = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
# Detoxify "unbiased" order, identity subgroups included (they are not toxicity attributes).
UNBIASED = [
    "toxicity",
    "severe_toxicity",
    "obscene",
    "identity_attack",
    "insult",
    "threat",
    "sexual_explicit",
    "male",
    "female",
    "christian",
]
VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *"you are an idiot hello world nice day the stupid".split(),
]
TEXTS = ["You are an idiot", "hello world", "", "nice day the the the", "zzz unknown"]


def _tiny_checkpoint(root: Path, classes: list[str], *, model_type: str | None = None, extra=None) -> Path:
    """A random 1-layer BERT saved in Detoxify's checkpoint format, config and tokenizer local."""
    config_dir = root / "bert-tiny"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(config_dir / "vocab.txt")).save_pretrained(config_dir)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=len(classes),
    )
    config.save_pretrained(config_dir)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # larger weights than BERT's init, so scores differ clearly between texts
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 1.0 if "embeddings" in name or "classifier" in name else 0.4)
    checkpoint = {
        "config": {
            "arch": {
                "args": {
                    "model_type": model_type or str(config_dir),
                    "model_name": "BertForSequenceClassification",
                    "tokenizer_name": "BertTokenizer",
                    "num_classes": len(classes),
                }
            },
            "dataset": {"args": {"classes": classes}},
        },
        "state_dict": model.state_dict(),
    }
    if extra is not None:
        checkpoint["extra"] = extra
    path = root / f"tiny-{len(classes)}.ckpt"
    torch.save(checkpoint, path)  # Detoxify's (third-party) format, only in tests
    return path


def _reference(checkpoint: Path, texts: list[str]) -> np.ndarray:
    """Known answer: the same model run directly through transformers, sigmoid of the logits."""
    config_dir = checkpoint.parent / "bert-tiny"
    loaded = torch.load(checkpoint, weights_only=True)
    model = BertForSequenceClassification(BertConfig.from_pretrained(config_dir)).eval()
    model.load_state_dict(loaded["state_dict"])
    tokenizer = BertTokenizer.from_pretrained(config_dir)
    with torch.no_grad():
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=32)
        return torch.sigmoid(model(**enc).logits).numpy()


@pytest.fixture(scope="module")
def original_ckpt(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("detox_original"), JIGSAW)


def test_scores_equal_the_model_and_names_are_canonical(original_ckpt):
    scorer = DetoxifyScorer(checkpoint=original_ckpt, batch_size=2)  # several batches, one of size 1
    out = scorer.score(TEXTS)
    assert scorer.attributes == (
        "toxicity",
        "severe_toxicity",
        "profanity",
        "insult",
        "threat",
        "identity_attack",
    )
    assert list(out.columns) == list(scorer.attributes)
    ref = _reference(original_ckpt, TEXTS)
    for label, attribute in zip(
        JIGSAW,
        ["toxicity", "severe_toxicity", "profanity", "threat", "insult", "identity_attack"],
        strict=True,
    ):
        np.testing.assert_allclose(out[attribute], ref[:, JIGSAW.index(label)], atol=1e-6)
    assert out["toxicity"].std() > 0.01  # a meaningful test: scores vary between texts


def test_matches_detoxify_predict_directly(original_ckpt):
    from detoxify import Detoxify

    direct = Detoxify(checkpoint=str(original_ckpt)).predict(TEXTS[:3])
    out = DetoxifyScorer(checkpoint=original_ckpt).score(TEXTS[:3])
    np.testing.assert_allclose(out["profanity"], direct["obscene"], atol=1e-7)
    np.testing.assert_allclose(out["identity_attack"], direct["identity_attack"], atol=1e-7)


def test_unbiased_classes_map_and_subgroups_are_dropped(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path, UNBIASED)
    scorer = get_scorer("detoxify", checkpoint=ckpt)
    assert scorer.attributes == (
        "toxicity",
        "severe_toxicity",
        "profanity",
        "insult",
        "threat",
        "identity_attack",
        "sexually_explicit",
    )
    out = scorer.score(TEXTS)
    ref = _reference(ckpt, TEXTS)
    np.testing.assert_allclose(out["sexually_explicit"], ref[:, UNBIASED.index("sexual_explicit")], atol=1e-6)
    np.testing.assert_allclose(out["profanity"], ref[:, UNBIASED.index("obscene")], atol=1e-6)


def test_long_text_is_truncated_to_the_position_limit(original_ckpt):
    scorer = DetoxifyScorer(checkpoint=original_ckpt)
    long_text = "you are an idiot " * 200  # 800 tokens, the tiny model takes 32 positions
    head = "you are an idiot " * 8  # 30 tokens + [CLS] [SEP] = the first 32 positions
    out = scorer.score([long_text, head])
    np.testing.assert_allclose(out.loc[0], out.loc[1], atol=1e-6)


def test_id_includes_the_weights_hash(original_ckpt, tmp_path):
    a = DetoxifyScorer(checkpoint=original_ckpt)
    assert (
        a.id.startswith("detoxify/checkpoint/sha256:") and a.id == DetoxifyScorer(checkpoint=original_ckpt).id
    )
    other = _tiny_checkpoint(tmp_path, JIGSAW[:5])
    assert DetoxifyScorer(checkpoint=other).id != a.id


def test_hub_model_type_that_would_need_network_is_refused(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path, JIGSAW, model_type="some-org/not-cached-model-xyz")
    with pytest.raises(FileNotFoundError, match=r"'some-org/not-cached-model-xyz'.*would download"):
        DetoxifyScorer(checkpoint=ckpt)


def test_release_weights_missing_from_cache_are_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match=r"'unbiased' weights are not available offline.*toxic_debiased"
    ):
        get_scorer("detoxify-unbiased")
    with pytest.raises(ValueError, match=r"model_type must be one of \['original', 'unbiased'\]"):
        DetoxifyScorer("multilingual")


def test_checkpoint_problems_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint must be an existing file"):
        DetoxifyScorer(checkpoint=tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="needs 'config' and 'state_dict'"):
        DetoxifyScorer(checkpoint=tmp_path / "bad.ckpt")


class _NotATensor:  # a pickled class: refused unless the caller trusts the file
    pass


def test_checkpoints_needing_full_unpickling_need_trust(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path, JIGSAW, extra=_NotATensor())
    with pytest.raises(ValueError, match="trust_checkpoint=True"):
        DetoxifyScorer(checkpoint=ckpt)
    assert DetoxifyScorer(checkpoint=ckpt, trust_checkpoint=True).score(["hello"]).shape == (1, 6)


def test_none_item_raises_type_error(original_ckpt):
    with pytest.raises(TypeError, match=r"texts\[0\] must be str"):
        DetoxifyScorer(checkpoint=original_ckpt).score([None])
