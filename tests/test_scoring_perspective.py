"""The Perspective client against a real local HTTP server on 127.0.0.1 (no network)."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from aligned_probing.scoring import ATTRIBUTES, PerspectiveScorer, ScoringWarning, get_scorer
from aligned_probing.scoring.perspective import MAX_TEXT_BYTES, _RateLimiter

KEY = "test-key-S3CR3T-0123456789"


def _ok(text: str, attributes: list[str]) -> tuple[int, bytes]:
    """A well-formed answer whose scores are a known function of the text."""
    base = min(len(text), 50) / 100
    scores = {
        a: {"summaryScore": {"value": round(base + 0.01 * i, 4), "type": "PROBABILITY"}}
        for i, a in enumerate(attributes)
    }
    return 200, json.dumps({"attributeScores": scores, "languages": ["en"]}).encode()


def expected_scores(text: str) -> list[float]:
    return [round(min(len(text), 50) / 100 + 0.01 * i, 4) for i in range(len(ATTRIBUTES))]


class FakePerspective(ThreadingHTTPServer):
    """Records every request; `script[text]` lists (status, body, headers) answers to give in turn."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.script: dict[str, list[tuple[int, bytes, dict]]] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1alpha1"


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server: FakePerspective = self.server  # type: ignore[assignment]
        text = body["comment"]["text"]
        server.requests.append(
            {
                "t": time.monotonic(),
                "path": self.path,
                "body": body,
                "key": self.headers.get("X-Goog-Api-Key"),
            }
        )
        queue = server.script.get(text)
        if queue:
            status, payload, headers = queue.pop(0)
        else:
            status, payload = _ok(text, list(body["requestedAttributes"]))
            headers = {}
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    srv = FakePerspective()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def scorer(server, monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)
    return PerspectiveScorer(base_url=server.base_url, qps=1000, max_retries=2, backoff=0.01, timeout=5)


def test_scores_all_attributes_in_one_request_per_text(scorer, server):
    texts = ["hello", "you are an idiot"]
    out = scorer.score(texts)
    assert list(out.columns) == list(ATTRIBUTES) and scorer.attributes == ATTRIBUTES
    np.testing.assert_allclose(out.to_numpy(), [expected_scores(t) for t in texts])
    assert out.attrs["errors"] == {}
    assert len(server.requests) == 2
    first = server.requests[0]
    assert first["path"] == "/v1alpha1/comments:analyze"  # the key is not in the URL
    assert first["key"] == KEY
    assert set(first["body"]["requestedAttributes"]) == {a.upper() for a in ATTRIBUTES}
    assert first["body"]["doNotStore"] is True and first["body"]["languages"] == ["en"]


def test_rate_limiter_spaces_calls_by_one_over_qps():
    now = [0.0]
    limiter = _RateLimiter(qps=2.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    times = []
    for pause in (0.0, 0.0, 0.1, 2.0, 0.0):  # caller's own work between calls
        now[0] += pause
        limiter.wait()
        times.append(now[0])
    # 0.5 s apart unless the caller was slower anyway (the 2 s pause resets the schedule)
    np.testing.assert_allclose(times, [0.0, 0.5, 1.0, 3.0, 3.5])


def test_qps_limits_requests_to_the_server(server, monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)
    scorer = PerspectiveScorer(["toxicity"], base_url=server.base_url, qps=20)
    start = time.monotonic()
    scorer.score([f"text {i}" for i in range(6)])
    assert time.monotonic() - start >= 5 / 20  # six requests need five 1/20 s gaps
    assert len(server.requests) == 6


def test_429_then_success_is_retried(scorer, server):
    server.script["busy"] = [(429, b'{"error": "quota"}', {"Retry-After": "0"})]
    out = scorer.score(["busy"])
    np.testing.assert_allclose(out.to_numpy()[0], expected_scores("busy"))
    assert [r["body"]["comment"]["text"] for r in server.requests] == ["busy", "busy"]


def test_500_exhausting_retries_gives_nan_with_error(scorer, server):
    server.script["broken"] = [(500, b"oops", {})] * 3  # 1 attempt + max_retries=2
    with pytest.warns(ScoringWarning, match=r"1 of 3 texts could not be scored"):
        out = scorer.score(["fine", "broken", "also fine"])
    assert out.loc[1].isna().all()
    assert out.drop(index=1).notna().all().all()
    assert "gave up after 3 attempts (last: HTTP 500)" in out.attrs["errors"][1]
    assert set(out.attrs["errors"]) == {1}
    assert sum(r["body"]["comment"]["text"] == "broken" for r in server.requests) == 3


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed response (JSONDecodeError"),
        (
            json.dumps({"attributeScores": {"TOXICITY": {"summaryScore": {"value": 0.5}}}}).encode(),
            "malformed response (KeyError",
        ),
        (
            json.dumps(
                {"attributeScores": {a.upper(): {"summaryScore": {"value": 7}} for a in ATTRIBUTES}}
            ).encode(),
            "outside [0, 1]",
        ),
    ],
)
def test_malformed_answers_give_nan_with_error(scorer, server, payload, reason):
    server.script["weird"] = [(200, payload, {})]
    with pytest.warns(ScoringWarning):
        out = scorer.score(["weird"])
    assert out.loc[0].isna().all()
    assert reason in out.attrs["errors"][0]
    assert len(server.requests) == 1  # a malformed 200 is not retried


def test_unreachable_server_is_bounded_and_recorded(monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)
    srv = FakePerspective()
    url = srv.base_url
    srv.server_close()  # nothing listens on that port any more
    scorer = PerspectiveScorer(["toxicity"], base_url=url, max_retries=1, backoff=0.01, timeout=2)
    with pytest.warns(ScoringWarning):
        out = scorer.score(["hello"])
    assert np.isnan(out.loc[0, "toxicity"])
    assert "ConnectionError" in out.attrs["errors"][0]


def test_key_never_appears_in_logs_errors_or_repr(scorer, server, caplog):
    echo = json.dumps({"error": f"bad request from key {KEY}"}).encode()
    server.script["echo"] = [(400, echo, {})]
    server.script["flaky"] = [(503, f"key={KEY}".encode(), {})] * 3
    caplog.set_level(logging.DEBUG)
    with pytest.warns(ScoringWarning) as record:
        out = scorer.score(["echo", "flaky"])
    assert "HTTP 400" in out.attrs["errors"][0] and "***" in out.attrs["errors"][0]
    assert "retry 1/2" in caplog.text  # retries are logged ...
    everything = caplog.text + repr(scorer) + repr(out.attrs) + " ".join(str(w.message) for w in record)
    assert KEY not in everything  # ... but never the key


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="environment variable PERSPECTIVE_API_KEY"):
        PerspectiveScorer()


def test_empty_text_is_nan_with_a_reason_without_a_request(scorer, server):
    # An empty continuation has no score: 0.0 would count as a non-toxic draw in EMT.
    with pytest.warns(ScoringWarning, match="2 of 3 texts could not be scored"):
        out = scorer.score(["", "   ", "hello"])
    assert np.isnan(out.to_numpy()[:2]).all() and np.isfinite(out.to_numpy()[2]).all()
    assert set(out.attrs["errors"]) == {0, 1} and "empty text" in out.attrs["errors"][0]
    assert len(server.requests) == 1


def test_long_text_is_cut_to_the_api_limit(scorer, server):
    text = "é" * MAX_TEXT_BYTES  # 2 bytes per character: twice the limit
    scorer.score([text])
    sent = server.requests[0]["body"]["comment"]["text"]
    assert sent == "é" * (MAX_TEXT_BYTES // 2)
    assert len(sent.encode()) == MAX_TEXT_BYTES


def test_options_are_validated(monkeypatch, server):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)
    with pytest.raises(ValueError, match="qps must be > 0, got 0"):
        PerspectiveScorer(qps=0)
    with pytest.raises(ValueError, match=r"attributes must be a non-empty subset .* got \['toxic'\]"):
        PerspectiveScorer(["toxic"])
    scorer = get_scorer("perspective", attributes=["threat", "toxicity"], base_url=server.base_url, qps=100)
    assert scorer.attributes == ("toxicity", "threat")


def test_retry_after_is_honoured_and_capped(scorer, server):
    server.script["slow down"] = [(429, b"{}", {"Retry-After": "0.3"})]
    start = time.monotonic()
    scorer.score(["slow down"])
    assert time.monotonic() - start >= 0.3  # the server's hint, not our 0.01 s backoff
    scorer.max_backoff = 0.05
    server.script["later"] = [(503, b"{}", {"Retry-After": "3600"})]
    start = time.monotonic()
    out = scorer.score(["later"])
    assert time.monotonic() - start < 5 and out.notna().all().all()  # capped at max_backoff
