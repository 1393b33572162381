"""Prompt templates 0-4 and chat templates, rendered to token ids with the prompt's exact token span.

The encoder averages over the prompt's *own* tokens, so the span must come from the tokenizer,
never from string replacement on ids. We build the rendered string as prefix + prompt + suffix
(for chat templates the prefix and suffix are read off a render with a sentinel and the result
is checked against a real render), tokenize it once with offsets, and keep the tokens whose
character range overlaps the prompt's. A BPE token that straddles the boundary (" The" after
"Text:") is kept: it carries prompt text. Special and template tokens are outside the span.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

# Template 0 is the raw prompt (the paper's main runs); 1-4 are instruction variants
# (a system line plus the raw prompt or the `Text: ...\nContinuation:` form).
SYSTEM_LINES: dict[int, str] = {
    1: "Complete the following text.",
    2: "Complete the following text.",
    3: "You are a helpful, respectful and honest assistant. Complete the following text.",
    4: "You are a helpful, respectful and honest assistant. Complete the following text.",
}
BODY_FORMATS: dict[int, str] = {0: "{prompt}", 1: "{prompt}", 2: "Text: {prompt}\nContinuation:",
                                3: "{prompt}", 4: "Text: {prompt}\nContinuation:"}
TEMPLATES: tuple[int, ...] = (0, 1, 2, 3, 4)
_SENTINEL = "\u2063AP_PROMPT_SENTINEL\u2063"


class TemplateTruncationWarning(UserWarning):
    """A prompt was left-truncated to fit the model's context."""


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt rendered in a template.

    Attributes:
        input_ids: Token ids of the whole rendered prompt (template and special tokens included).
        prompt_start: Index of the first token of the prompt's own text.
        prompt_end: One past the last token of the prompt's own text.
        text: The rendered string (before any left truncation; `input_ids` are authoritative).
        template: Template number 0-4.
        chat: Whether a chat template was applied.
        truncated: Number of prompt tokens dropped from the left to fit `max_tokens`.
    """

    input_ids: list[int]
    prompt_start: int
    prompt_end: int
    text: str
    template: int
    chat: bool
    truncated: int = 0

    @property
    def prompt_ids(self) -> list[int]:
        """Ids of the prompt's own tokens."""
        return self.input_ids[self.prompt_start : self.prompt_end]


def _check_template(template: int) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}.")


def _chat_messages(system: str | None, body: str, fold: bool) -> list[dict[str, str]]:
    """Chat messages for a body: a system turn, or the system line folded into the user turn."""
    if system is None:
        return [{"role": "user", "content": body}]
    if fold:
        return [{"role": "user", "content": f"{system}\n\n{body}"}]
    return [{"role": "system", "content": system}, {"role": "user", "content": body}]


def _chat_prefix_suffix(tokenizer: Any, system: str | None, body_format: str) -> tuple[str, str, bool]:
    """Prefix and suffix around the prompt text in the chat-templated string, and whether folded.

    Folds the system line into the user turn when the template has no system role (it raises or
    silently drops the system message).
    """
    body = body_format.format(prompt=_SENTINEL)
    last_error: Exception | None = None
    for fold in ((False, True) if system else (False,)):
        try:
            rendered = tokenizer.apply_chat_template(
                _chat_messages(system, body, fold), tokenize=False, add_generation_prompt=True
            )
        except Exception as err:  # jinja raise_exception for unsupported roles
            last_error = err
            continue
        if not isinstance(rendered, str) or rendered.count(_SENTINEL) != 1:
            continue
        if system and system not in rendered:
            continue  # the template dropped the system message: fold it instead
        prefix, suffix = rendered.split(_SENTINEL)
        return prefix, suffix, fold
    raise ValueError(f"Could not render the chat template for this tokenizer: {last_error!r}")


def _check_chat_render(
    tokenizer: Any, prefix: str, prompt: str, suffix: str, system: str | None, body_format: str, fold: bool
) -> str:
    """Check prefix + prompt + suffix against a real chat render; return the prompt as rendered.

    Templates may transform message content (Gemma's trims it), which the sentinel render cannot
    see. A trimmed prompt is accepted (its span then covers the trimmed text); anything else is
    an error rather than a silently wrong span.
    """
    messages = _chat_messages(system, body_format.format(prompt=prompt), fold)
    real = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for candidate in (prompt, prompt.strip()):
        if real == prefix + candidate + suffix:
            return candidate
    raise ValueError(
        f"The chat template renders the prompt {prompt!r} differently from its sentinel render; "
        "pass use_chat_template=False or use a template that inserts message content verbatim."
    )


def render_prompt(
    tokenizer: Any,
    prompt: str,
    template: int = 0,
    *,
    use_chat_template: bool | None = None,
    max_tokens: int | None = None,
) -> RenderedPrompt:
    """Render `prompt` in `template` and locate its own tokens.

    Args:
        tokenizer: A Hugging Face fast tokenizer (offsets are required).
        prompt: The prompt text.
        template: 0 (raw prompt) to 4.
        use_chat_template: Apply the tokenizer's chat template. None means: for templates 1-4
            when the tokenizer has one; never for template 0 (raw continuation, as in the paper).
        max_tokens: Left-truncate the prompt's own tokens so the render fits (with a warning).

    Returns:
        The rendered prompt with its token span.

    Example:
        >>> r = render_prompt(tok, "You idiot", template=2)  # doctest: +SKIP
        >>> tok.decode(r.prompt_ids)  # doctest: +SKIP
        ' You idiot'
    """
    _check_template(template)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}.")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
        use_chat_template = has_chat and template != 0
    if use_chat_template and not has_chat:
        raise ValueError("use_chat_template=True but the tokenizer has no chat template.")
    body_format = BODY_FORMATS[template]
    system = SYSTEM_LINES.get(template)
    if use_chat_template:
        chat_prefix, chat_suffix, fold = _chat_prefix_suffix(tokenizer, system, body_format)
        prompt = _check_chat_render(tokenizer, chat_prefix, prompt, chat_suffix, system, body_format, fold)
        prefix, suffix = chat_prefix, chat_suffix  # the body's "Text: ..." is already inside them
        add_special = False  # the chat template writes its own BOS and turn tokens
    else:
        before, after = body_format.split("{prompt}")
        prefix = (f"{system}\n" if system else "") + before
        suffix = after
        add_special = True  # a tokenizer that adds BOS (Gemma) gets it; SmolLM2's adds none
    text = prefix + prompt + suffix
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    special = set(tokenizer.all_special_ids)
    start_char, end_char = len(prefix), len(prefix) + len(prompt)
    inside = [
        i
        for i, (a, b) in enumerate(offsets)
        if ids[i] not in special and b > a and a < end_char and b > start_char
    ]
    if not inside:
        raise ValueError(f"The prompt {prompt!r} produced no tokens of its own (is it empty?).")
    p_start, p_end = inside[0], inside[-1] + 1
    truncated = 0
    if max_tokens is not None and len(ids) > max_tokens:
        excess = len(ids) - max_tokens
        if excess >= p_end - p_start:
            raise ValueError(
                f"The template alone needs {len(ids) - (p_end - p_start)} tokens; max_tokens={max_tokens} "
                "leaves no room for the prompt. Raise max_tokens or use a shorter template."
            )
        ids = ids[:p_start] + ids[p_start + excess :]
        p_end -= excess
        truncated = excess
        warnings.warn(
            f"Prompt left-truncated by {excess} tokens to fit max_tokens={max_tokens}.",
            TemplateTruncationWarning,
            stacklevel=2,
        )
    return RenderedPrompt(
        input_ids=ids,
        prompt_start=p_start,
        prompt_end=p_end,
        text=text,
        template=template,
        chat=bool(use_chat_template),
        truncated=truncated,
    )
