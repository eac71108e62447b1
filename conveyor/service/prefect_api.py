"""A tiny JSON client for Prefect's REST API (urllib only): `conveyor up` keeps its watch run alive with it across
a restart of the server (it retries refused connections while the server comes back), and the tests use it to
look at what the server holds. Everything else talks to Prefect through Prefect's own client."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

RETRY_STATUS = (429, 502, 503, 504)  # what a busy server (SQLite lock timeouts) answers; Prefect's client retries these too


def api(api_url: str, method: str, path: str, body: dict | None = None, timeout: float = 30,
        attempts: int = 6) -> tuple[int, dict]:
    """Tiny JSON client for the Prefect REST API; returns (HTTP status, decoded body or {}).

    Busy-server answers and refused connections are retried with backoff (1, 2, 4, 8, 8 s), so callers
    creating objects should make that safe (idempotency key, or tolerate 409).
    """
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(attempts):
        req = urllib.request.Request(api_url.rstrip("/") + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        last = attempt == attempts - 1
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else {})
        except urllib.error.HTTPError as e:
            raw = e.read()
            if e.code in RETRY_STATUS and not last:
                time.sleep(min(8, 2 ** attempt))
                continue
            try:
                return e.code, json.loads(raw) if raw else {}
            except json.JSONDecodeError:
                return e.code, {"detail": raw.decode(errors="replace")}
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if last:
                raise
            time.sleep(min(8, 2 ** attempt))
    raise AssertionError("unreachable")
