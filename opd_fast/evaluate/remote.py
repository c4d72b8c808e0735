"""The `remote` reward: scores through an `opd-fast reward-server` (opd_fast.evaluate.server), so a reward spec can
name a reward whose models live on another machine or process, and use it like a local one:

    rewards:
      pickscore: [{name: remote, url: "http://gpu-box:8765", timeout: 120, retries: 2}]

The client is the standard library's urllib: scoring remotely needs no package beyond opd-fast's own. Environment
proxies are ignored (a reward server is on this machine or this cluster; a proxy would see the images and the token).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import time
import urllib.error
import urllib.request

import numpy as np

from opd_fast.evaluate.base import Reward, RewardError, register

PROTOCOL = 1  # opd_fast.evaluate.server.PROTOCOL; not imported: the server module wants fastapi's world, not ours
TOKEN_ENV = "OPD_FAST_REWARD_TOKEN"
RETRY_DELAY = 0.5  # seconds before the first retry, doubled for each next one (capped at 8)


class _Refused(Exception):
    """The server answered and said no (4xx): the same request again would get the same answer."""


class _Failed(Exception):
    """No answer (unreachable, timed out, connection dropped) or a server error (5xx): worth another try."""


@register("remote")
class Remote(Reward):
    """A reward served by `opd-fast reward-server` at `url`. Options: timeout (seconds without an answer, per try),
    retries (further tries after a failed one, for a dropped connection, a timeout or a 5xx), batch_size (images per
    request), token (default: $OPD_FAST_REWARD_TOKEN), encoding (png: compact, for a network; raw: uint8 pixels,
    less CPU, for the same machine). The server's reward decides how scores aggregate: a plain mean is computed
    here, anything else (GenEval's mean over tags) is asked of the server. `device` is the server's business and is
    ignored here."""

    def __init__(
        self,
        url: str | None = None,
        timeout: float = 600.0,
        retries: int = 2,
        batch_size: int = 16,
        token: str | None = None,
        encoding: str = "png",
        device: str | None = None,
    ):
        super().__init__("cpu", batch_size)  # the server holds the models: nothing of this process's device is used
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise RewardError(f"reward 'remote': option 'url' is required, as http://HOST:PORT (got {url!r})")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise RewardError(f"reward 'remote': timeout must be a positive number of seconds, got {timeout!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise RewardError(f"reward 'remote': retries must be an integer >= 0, got {retries!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise RewardError(f"reward 'remote': batch_size must be an integer >= 1, got {batch_size!r}")
        if encoding not in ("png", "raw"):
            raise RewardError(f"reward 'remote': encoding must be 'png' or 'raw', got {encoding!r}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.encoding = float(timeout), retries, encoding
        self.token = token or os.environ.get(TOKEN_ENV) or None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        info = self._call("GET", "/info", None, "at start-up")  # a wrong url or token fails here, before any scoring
        if not isinstance(info, dict) or info.get("protocol") != PROTOCOL or not isinstance(info.get("reward"), str):
            raise RewardError(
                f"reward 'remote': {self.url}/info answered {str(info)[:200]!r}, not an opd-fast reward server of "
                f"protocol {PROTOCOL}"
            )
        self.served = info["reward"]  # the name of the reward behind the url
        self.server_aggregates = info.get("aggregate") != "mean"

    def __repr__(self) -> str:
        return f"Remote({self.served!r} at {self.url})"

    # -- the two calls a reward makes --------------------------------------------------------------------------------

    def score(self, images, prompts, metadata):
        metadata = list(metadata) if metadata else [{} for _ in images]
        scores: list[float] = []
        for idx in self._batches(len(images)):
            payload = {
                "images": [self._encode(images[i]) for i in idx],
                "prompts": [prompts[i] for i in idx],
                "metadata": [metadata[i] for i in idx],
            }
            reply = self._call("POST", "/score", payload, f"scoring images {idx.start}..{idx.stop - 1}")
            values = reply.get("scores") if isinstance(reply, dict) else None
            if not isinstance(values, list) or len(values) != len(idx):
                raise RewardError(
                    f"reward 'remote' ({self.served} at {self.url}): a /score reply without {len(idx)} scores"
                )
            scores.extend(float("nan") if v is None else float(v) for v in values)
        return scores

    def aggregate(self, scores, metadata):
        if not self.server_aggregates:
            return super().aggregate(scores, metadata)
        payload = {"scores": [v if math.isfinite(v) else None for v in map(float, scores)], "metadata": list(metadata)}
        reply = self._call("POST", "/aggregate", payload, "aggregating")
        value = reply.get("value", "missing") if isinstance(reply, dict) else "missing"
        if value is not None and not isinstance(value, (int, float)):
            raise RewardError(f"reward 'remote' ({self.served} at {self.url}): an /aggregate reply without a value")
        return float("nan") if value is None else float(value)

    # -- the wire ----------------------------------------------------------------------------------------------------

    def _encode(self, image) -> dict:
        """A PIL image (or an H x W x 3 uint8 array) -> the protocol's IMAGE."""
        if isinstance(image, np.ndarray):
            pixels = image
        else:
            if self.encoding == "png":
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG", compress_level=1)  # lossless; level 1: fast
                return {"png": base64.b64encode(buffer.getvalue()).decode("ascii")}
            pixels = np.asarray(image.convert("RGB"))
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise RewardError(
                f"reward 'remote': images are PIL images or H x W x 3 uint8 arrays, got {pixels.dtype} {pixels.shape}"
            )
        if self.encoding == "png":
            from PIL import Image

            return self._encode(Image.fromarray(pixels, "RGB"))
        raw = np.ascontiguousarray(pixels).tobytes()
        return {"raw": base64.b64encode(raw).decode("ascii"), "shape": list(pixels.shape), "dtype": "uint8"}

    def _call(self, method: str, path: str, payload, doing: str):
        """One request with retries; RewardError names the url and what went wrong on the last try."""
        body = None if payload is None else json.dumps(payload).encode()
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(RETRY_DELAY * 2 ** (attempt - 1), 8.0))
            try:
                return self._once(method, path, body)
            except _Refused as e:
                raise RewardError(f"reward 'remote': {self.url} refused {method} {path} ({doing}): {e}") from None
            except _Failed as e:
                last = e
        tries = self.retries + 1
        raise RewardError(
            f"reward 'remote': {method} {self.url}{path} ({doing}) failed after {tries} tr{'y' if tries == 1 else 'ies'}: "
            f"{last}"
        )

    def _once(self, method: str, path: str, body: bytes | None):
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = _detail(e)
            if e.code == 401:
                raise _Refused(f"the token was not accepted (401: {detail})") from None
            if e.code == 404 and path == "/info":
                raise _Refused(f"404 for /info: is {self.url} an opd-fast reward-server? ({detail})") from None
            if 400 <= e.code < 500:
                raise _Refused(f"{e.code}: {detail}") from None
            raise _Failed(f"server error {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise _Failed(self._why(e)) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise _Refused(f"the reply is not JSON: {raw[:200]!r}") from None

    def _why(self, error: Exception) -> str:
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        if isinstance(reason, TimeoutError):
            return f"no answer within the timeout of {self.timeout:g} s"
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused (is the reward server running at this url?)"
        if isinstance(reason, (http.client.RemoteDisconnected, ConnectionResetError, http.client.IncompleteRead)):
            return f"the server dropped the connection before answering ({type(reason).__name__})"
        return f"{type(reason).__name__}: {reason}"


def _detail(error: urllib.error.HTTPError) -> str:
    """The server's message: FastAPI's {"detail": ...}, else the start of the body."""
    try:
        raw = error.read()
    except OSError:
        return error.reason or ""
    try:
        detail = json.loads(raw).get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail is not None else raw[:200].decode("utf-8", "replace") or str(error.reason)
