"""Templates 0-4 and chat templates: rendered ids and the prompt's exact token span.

Expected token strings are written by hand from the tiny byte-level BPE of tests/_tiny.py
(`Ġ` is a leading space, `Ċ` a newline); every render is also checked against the tokenizer
itself (plain call or `apply_chat_template`).
"""

from __future__ import annotations

import pytest

from aligned_probing.data.templates import (
    SYSTEM_LINES,
    TEMPLATES,
    TemplateTruncationWarning,
    render_prompt,
)
from tests._tiny import CHATML_TEMPLATE, NO_SYSTEM_TEMPLATE, build_tokenizer

PROMPT = "You idiot\nhello world"  # contains a newline: the span must cross it


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return build_tokenizer(CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def nosys_tok():
    return build_tokenizer(NO_SYSTEM_TEMPLATE)


def _tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def test_template0_is_the_raw_prompt_with_a_newline(tok):
    r = render_prompt(tok, PROMPT, 0)
    assert r.text == PROMPT
    assert r.input_ids == tok(PROMPT)["input_ids"]
    #                                   You     ' idiot'  \n    he    llo   ' wor'  ld
    assert _tokens(tok, r.input_ids) == ["You", "Ġidiot", "Ċ", "he", "llo", "Ġwor", "ld"]
    assert (r.prompt_start, r.prompt_end) == (0, 7)
    assert tok.decode(r.prompt_ids) == PROMPT
    assert not r.chat and r.truncated == 0


def test_template2_text_form_span(tok):
    r = render_prompt(tok, PROMPT, 2)
    assert r.text == f"{SYSTEM_LINES[2]}\nText: {PROMPT}\nContinuation:"
    assert r.input_ids == tok(r.text)["input_ids"]
    tokens = _tokens(tok, r.input_ids)
    # prefix "Complete the following text.\nText: " | prompt | "\nContinuation:"
    assert tokens[: r.prompt_start] == [
        "Comp",
        "lete",
        "Ġthe",
        "Ġfollo",
        "wing",
        "Ġtext",
        ".",
        "Ċ",
        "Text",
        ":",
        "Ġ",
    ]
    assert tokens[r.prompt_start : r.prompt_end] == ["You", "Ġidiot", "Ċ", "he", "llo", "Ġwor", "ld"]
    assert tokens[r.prompt_end :] == ["Ċ", "Cont", "inuat", "ion", ":"]
    assert tok.decode(r.prompt_ids) == PROMPT


def test_straddling_token_is_inside_the_span(tok):
    # In "Text: quick brown fox" BPE merges the template's space into " quick": that token carries
    # prompt text, so it is inside the span (the template part before it ends with ":").
    r = render_prompt(tok, "quick brown fox", 2)
    tokens = _tokens(tok, r.input_ids)
    assert tokens[r.prompt_start - 2 : r.prompt_end + 1] == ["Text", ":", "Ġquick", "Ġbrown", "Ġfox", "Ċ"]
    assert tok.decode(r.prompt_ids) == " quick brown fox"


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_template_span_decodes_to_the_prompt(tok, template):
    r = render_prompt(tok, PROMPT, template)
    assert r.input_ids == tok(r.text)["input_ids"]
    assert tok.decode(r.prompt_ids).strip() == PROMPT
    outside = r.input_ids[: r.prompt_start] + r.input_ids[r.prompt_end :]
    assert PROMPT not in tok.decode(outside)


def test_chat_template_with_system_role(chat_tok):
    r = render_prompt(chat_tok, PROMPT, 1)
    assert r.chat
    messages = [{"role": "system", "content": SYSTEM_LINES[1]}, {"role": "user", "content": PROMPT}]
    expected_text = chat_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected_ids = chat_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)[
        "input_ids"
    ]
    assert r.text == expected_text
    assert r.input_ids == list(expected_ids)
    tokens = _tokens(chat_tok, r.input_ids)
    assert tokens[r.prompt_start - 2 : r.prompt_start] == ["er", "Ċ"]  # "<|im_start|>user\n"
    assert tokens[r.prompt_start : r.prompt_end] == ["You", "Ġidiot", "Ċ", "he", "llo", "Ġwor", "ld"]
    assert tokens[r.prompt_end] == "<|im_end|>"  # the special token is outside the span
    special = set(chat_tok.all_special_ids)
    assert not special & set(r.prompt_ids)


def test_chat_template_without_system_role_folds_the_system_line(nosys_tok):
    r = render_prompt(nosys_tok, "You idiot", 2)
    body = f"{SYSTEM_LINES[2]}\n\nText: You idiot\nContinuation:"
    expected = nosys_tok.apply_chat_template(
        [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
    )
    assert r.text == expected  # "Text: " appears once (the body is not wrapped twice)
    assert r.text.count("Text: ") == 1
    assert _tokens(nosys_tok, r.prompt_ids) == ["You", "Ġidiot"]


def test_template0_never_uses_the_chat_template(chat_tok):
    r = render_prompt(chat_tok, PROMPT, 0)
    assert not r.chat and r.text == PROMPT


def test_trimming_chat_template_spans_the_trimmed_prompt():
    trimming = CHATML_TEMPLATE.replace("{{ message['content'] }}", "{{ message['content'] | trim }}")
    tk = build_tokenizer(trimming)
    r = render_prompt(tk, "  You idiot \n", 1)
    assert "<|im_start|>user\nYou idiot<|im_end|>" in r.text
    assert _tokens(tk, r.prompt_ids) == ["You", "Ġidiot"]


def test_left_truncation_keeps_the_rightmost_prompt_tokens(tok):
    full = render_prompt(tok, PROMPT, 2)
    with pytest.warns(TemplateTruncationWarning, match="left-truncated by 3 tokens"):
        r = render_prompt(tok, PROMPT, 2, max_tokens=len(full.input_ids) - 3)
    assert r.truncated == 3
    assert len(r.input_ids) == len(full.input_ids) - 3
    assert r.prompt_ids == full.prompt_ids[3:]
    assert r.input_ids[: r.prompt_start] == full.input_ids[: full.prompt_start]  # template kept whole
    assert r.input_ids[r.prompt_end :] == full.input_ids[full.prompt_end :]


def test_bad_input_errors(tok):
    with pytest.raises(ValueError, match=r"template must be one of \(0, 1, 2, 3, 4\), got 5"):
        render_prompt(tok, "hi", 5)
    with pytest.raises(TypeError, match="prompt must be a str, got int"):
        render_prompt(tok, 3, 0)
    with pytest.raises(ValueError, match="no tokens of its own"):
        render_prompt(tok, "", 0)
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(tok, "hi", 1, use_chat_template=True)
    with pytest.raises(ValueError, match="leaves no room for the prompt"):
        render_prompt(tok, PROMPT, 2, max_tokens=5)
