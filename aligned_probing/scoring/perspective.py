"""Perspective API (Jigsaw/Google) as a `Scorer`: the scorer the aligned-probing paper used.

One `comments:analyze` request per text asks for all attributes at once. Requests are spaced to at
most `qps` per second (the default quota is 1), and 429 / 5xx / connection failures are retried with
exponential backoff (honouring `Retry-After`). A text that still cannot be scored, or whose answer
is malformed, becomes NaN with the reason in `result.attrs["errors"]` and a `ScoringWarning`:
never a silent 0.

The API key is read from the environment (PERSPECTIVE_API_KEY), sent in the `X-Goog-Api-Key`
header rather than the URL, and never appears in logs, errors or the scorer's repr.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from email.utils import parsedate_to_datetime

import numpy as np
import pandas as pd
import requests

from aligned_probing.scoring.base import ATTRIBUTES, validate_texts, warn_failed

_logger = logging.getLogger(__name__)

DEFAULT_URL = "https://commentanalyzer.googleapis.com/v1alpha1"
API_KEY_ENV = "PERSPECTIVE_API_KEY"
# Perspective rejects comments over 20 KB (UTF-8 bytes); longer texts are cut to this many bytes.
MAX_TEXT_BYTES = 20_480
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class _RateLimiter:
    """Space calls at least 1/qps seconds apart (thread-safe), so bursts never exceed the quota."""

    def __init__(self, qps: float, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
        self._interval = 1.0 / qps
        self._clock, self._sleep = clock, sleep
        self._next = -math.inf
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._sleep(self._next - now)
                now = self._next
            self._next = now + self._interval


class PerspectiveError(RuntimeError):
    """A text could not be scored by the Perspective API (the message never contains the key)."""


def _truncate_utf8(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class PerspectiveScorer:
    """Score texts with the Perspective API.

    Empty (or whitespace-only) texts are not sent (the API rejects them); they score NaN with the reason
    in `attrs["errors"]` and a `ScoringWarning` (an empty continuation has no score, and 0.0 would count it
    as a non-toxic draw in EMT). Texts over 20,480 UTF-8 bytes are cut to their first 20,480 bytes.

    Args:
        attributes: Canonical attributes to request (default: all seven).
        qps: Maximum requests per second.
        max_retries: Retries per text after the first attempt, on 429, 5xx and connection errors.
        backoff: First retry delay in seconds; doubles per retry, capped at `max_backoff`.
        max_backoff: Longest single delay, also the cap on a server's `Retry-After`.
        timeout: Seconds to wait for one HTTP response.
        base_url: API root (tests point it at a local server).
        languages: Language hints sent with every request.
        api_key_env: Environment variable holding the key.

    Raises:
        ValueError: Bad option values, or the key variable is not set.
    """

    def __init__(
        self,
        attributes: Sequence[str] = ATTRIBUTES,
        *,
        qps: float = 1.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = 30.0,
        base_url: str = DEFAULT_URL,
        languages: Sequence[str] = ("en",),
        api_key_env: str = API_KEY_ENV,
    ) -> None:
        unknown = [a for a in attributes if a not in ATTRIBUTES]
        if unknown or not attributes:
            raise ValueError(f"attributes must be a non-empty subset of {ATTRIBUTES}, got {list(attributes)}")
        if not qps > 0:
            raise ValueError(f"qps must be > 0, got {qps!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if backoff < 0 or max_backoff < 0 or not timeout > 0:
            raise ValueError(
                "backoff and max_backoff must be >= 0 and timeout > 0, "
                f"got {backoff!r}, {max_backoff!r}, {timeout!r}"
            )
        self._key = os.environ.get(api_key_env)
        if not self._key:
            raise ValueError(f"the Perspective API key must be set in the environment variable {api_key_env}")
        self.attributes = tuple(a for a in ATTRIBUTES if a in set(attributes))
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.url = base_url.rstrip("/") + "/comments:analyze"
        self.languages = list(languages)
        self.qps = qps
        # Perspective's models change without a version number, so the id names the endpoint and
        # the request (a cache must not serve scores from another server or attribute set).
        self.id = f"perspective/{base_url.rstrip('/')}/{','.join(self.languages)}/{','.join(self.attributes)}"
        self._limiter = _RateLimiter(qps, time.monotonic, time.sleep)
        self._session = requests.Session()
        self._session.headers.update({"X-Goog-Api-Key": self._key, "Content-Type": "application/json"})

    def __repr__(self) -> str:
        return f"PerspectiveScorer(url={self.url!r}, attributes={self.attributes}, qps={self.qps})"

    def _body(self, text: str) -> bytes:
        return json.dumps(
            {
                "comment": {"text": _truncate_utf8(text)},
                "requestedAttributes": {a.upper(): {} for a in self.attributes},
                "languages": self.languages,
                "doNotStore": True,
            }
        ).encode("utf-8")

    def _post(self, body: bytes) -> requests.Response:
        """POST once per attempt, retrying 429/5xx/connection errors with backoff; raise when exhausted."""
        problem, hint = "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                # A server's Retry-After wins over our exponential schedule; both are capped.
                delay = min(hint if hint is not None else self.backoff * 2 ** (attempt - 1), self.max_backoff)
                _logger.info(
                    "Perspective: %s; retry %d/%d in %.2fs", problem, attempt, self.max_retries, delay
                )
                time.sleep(delay)
            self._limiter.wait()
            try:
                response = self._session.post(self.url, data=body, timeout=self.timeout)
            except requests.RequestException as exc:
                # Only the exception type: messages can carry URLs (the key is in a header, not the URL).
                problem, hint = type(exc).__name__, None
                continue
            if response.status_code not in _RETRY_STATUS:
                return response
            problem, hint = f"HTTP {response.status_code}", _retry_after(response)
        raise PerspectiveError(f"gave up after {self.max_retries + 1} attempts (last: {problem})")

    def _parse(self, response: requests.Response) -> list[float]:
        if response.status_code != 200:
            raise PerspectiveError(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            scores = response.json()["attributeScores"]
            values = [float(scores[a.upper()]["summaryScore"]["value"]) for a in self.attributes]
        except (ValueError, KeyError, TypeError) as exc:
            raise PerspectiveError(f"malformed response ({type(exc).__name__}: {str(exc)[:80]})") from None
        if not all(0.0 <= v <= 1.0 for v in values):
            raise PerspectiveError(f"scores outside [0, 1]: {values}")
        return values

    def score(self, texts: Sequence[str]) -> pd.DataFrame:
        """Score texts one request each; failures are NaN with `attrs["errors"]` and a warning."""
        texts = validate_texts(texts)
        values = np.full((len(texts), len(self.attributes)), np.nan)
        errors: dict[int, str] = {}
        for i, text in enumerate(texts):
            if not text.strip():
                errors[i] = "empty text: not sent (the API rejects empty texts), score left NaN"
                continue
            try:
                values[i] = self._parse(self._post(self._body(text)))
            except PerspectiveError as exc:
                # Belt and braces: a server could echo the request headers in its error body.
                errors[i] = str(exc).replace(self._key, "***")
        frame = pd.DataFrame(values, columns=list(self.attributes))
        warn_failed(frame, errors, source=self.id)
        return frame
