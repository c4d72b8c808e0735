"""`opd-fast reward-server`: one reward (built by name, like `opd-fast eval` builds it) served over HTTP, so that a
GPU box can hold the reward models while evaluation or training elsewhere scores through the `remote` reward kind
(opd_fast.evaluate.remote).

Protocol (JSON; protocol 1):

    GET  /health     {"status": "ok"}                                   no token: for readiness probes, names nothing
    GET  /info       {"reward", "protocol", "aggregate": "mean" | "server", "encodings": ["png", "raw"]}
    POST /score      {"images": [IMAGE, ...], "prompts": [str, ...], "metadata": [dict, ...] (optional)}
                     -> {"scores": [float | null, ...]}                 (null: a score that is not finite)
    POST /aggregate  {"scores": [...], "metadata": [...]} -> {"value": float | null}

    IMAGE = {"png": BASE64}  or  {"raw": BASE64, "shape": [H, W, 3], "dtype": "uint8"}   (RGB)

Images travel as PNG or as raw uint8 pixels, never as pickles: nothing a client sends is run as code. PNG is the only
format PIL is allowed to decode here (fewer image decoders exposed), and an image's size is checked before its
pixels are decoded. A request that does not parse is a 4xx whose detail names the problem; the server goes on.

The module imports only the standard library at load (the CLI reads its defaults when it builds its parser); numpy,
torch and fastapi load when a server starts.

Security: it binds 127.0.0.1 unless --host says otherwise; with a token (--token or OPD_FAST_REWARD_TOKEN) every
endpoint but /health wants `Authorization: Bearer TOKEN` (401 otherwise). The token travels in clear over http://:
beyond one machine, use a trusted network or an SSH tunnel.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (`request: Request`), imported
# inside create_app, when it defines them
import base64
import binascii
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import socket
import threading

log = logging.getLogger(__name__)

PROTOCOL = 1
TOKEN_ENV = "OPD_FAST_REWARD_TOKEN"
DEFAULT_PORT = 8765
MAX_PIXELS = 4096 * 4096  # per image: a 200-byte PNG can declare a 10^10-pixel canvas
INSTALL_HINT = "the reward server needs fastapi and uvicorn: pip install 'opd-fast[serve]'"


class BadRequest(ValueError):
    """A request that does not parse: the client's fault, answered with its status and this message."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def finite_or_none(value: float) -> float | None:
    """Strict JSON has no NaN or infinity: such a score travels as null (the client reads it back as NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


# -- decoding a request ---------------------------------------------------------------------------------------------


def _b64(text, where: str) -> bytes:
    if not isinstance(text, str):
        raise BadRequest(f"{where}: expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{where}: bad base64 ({e})") from None


def decode_image(entry, where: str):
    """One IMAGE of the protocol -> an RGB PIL image; BadRequest names what is wrong with it."""
    import numpy as np
    from PIL import Image

    if not isinstance(entry, dict) or len({"png", "raw"} & set(entry)) != 1:
        raise BadRequest(
            f'{where}: expected {{"png": BASE64}} or {{"raw": BASE64, "shape": [H, W, 3], "dtype": "uint8"}}'
        )
    if "png" in entry:
        data = _b64(entry["png"], f"{where}.png")
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                width, height = image.size  # the header only: nothing decoded yet
                if width * height > MAX_PIXELS:
                    raise BadRequest(f"{where}: {width}x{height} pixels, over the server's {MAX_PIXELS}", status=413)
                return image.convert("RGB")
        except BadRequest:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds (OSError, SyntaxError, zlib.error, ...)
            raise BadRequest(f"{where}.png: not a readable PNG image ({type(e).__name__}: {e})") from None
    if entry.get("dtype") != "uint8":
        raise BadRequest(f"{where}.dtype: only 'uint8' is accepted, got {entry.get('dtype')!r}")
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        or shape[2] != 3
    ):
        raise BadRequest(f"{where}.shape: expected [H, W, 3] (RGB, positive integers), got {shape!r}")
    if shape[0] * shape[1] > MAX_PIXELS:
        raise BadRequest(f"{where}: {shape[1]}x{shape[0]} pixels, over the server's {MAX_PIXELS}", status=413)
    data = _b64(entry["raw"], f"{where}.raw")
    need = shape[0] * shape[1] * shape[2]
    if len(data) != need:
        raise BadRequest(f"{where}: shape {shape} of uint8 needs {need} bytes, the raw data has {len(data)}")
    return Image.fromarray(np.frombuffer(data, dtype=np.uint8).reshape(shape), "RGB")


def _json_object(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except ValueError as e:
        raise BadRequest(f"the body is not JSON ({e})", status=400) from None
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(data).__name__}", status=400)
    return data


def _metadata(data: dict, n: int, what: str) -> list[dict]:
    metadata = data.get("metadata")
    if metadata is None:
        return [{} for _ in range(n)]
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise BadRequest("metadata: expected a list of objects")
    if len(metadata) != n:
        raise BadRequest(f"{n} {what} but {len(metadata)} metadata entries")
    return metadata


def parse_score_request(body: bytes) -> tuple[list, list[str], list[dict]]:
    """The body of POST /score -> (RGB PIL images, prompts, metadata)."""
    data = _json_object(body)
    for key in ("images", "prompts"):
        if key not in data:
            raise BadRequest(f"missing field {key!r} (a /score request has images, prompts and optional metadata)")
        if not isinstance(data[key], list):
            raise BadRequest(f"{key}: expected a list, got {type(data[key]).__name__}")
    images, prompts = data["images"], data["prompts"]
    if not all(isinstance(p, str) for p in prompts):
        raise BadRequest("prompts: expected a list of strings")
    if len(images) != len(prompts):
        raise BadRequest(f"{len(images)} images but {len(prompts)} prompts")
    metadata = _metadata(data, len(images), "images")
    return [decode_image(entry, f"images[{i}]") for i, entry in enumerate(images)], prompts, metadata


def parse_aggregate_request(body: bytes) -> tuple[list[float], list[dict]]:
    data = _json_object(body)
    scores = data.get("scores")
    if not isinstance(scores, list) or not scores:
        raise BadRequest("scores: expected a non-empty list of numbers")
    if not all(s is None or (isinstance(s, (int, float)) and not isinstance(s, bool)) for s in scores):
        raise BadRequest("scores: expected numbers (or null for a score that is not finite)")
    values = [float("nan") if s is None else float(s) for s in scores]
    return values, _metadata(data, len(values), "scores")


# -- the app --------------------------------------------------------------------------------------------------------


def reward_aggregates_itself(reward) -> bool:
    """Whether the reward's table number is more than the mean (GenEval: the mean over tags of each tag's accuracy):
    then the remote reward asks the server (/aggregate) instead of averaging itself."""
    from opd_fast.evaluate.base import Reward

    return type(reward).aggregate is not Reward.aggregate


def create_app(reward, token: str | None = None, max_request_bytes: int = 256 * 2**20):
    """The FastAPI app serving `reward`. Scoring runs in a worker thread, one request at a time (a lock): a reward
    holds one model, on one device, sized for one batch."""
    from fastapi import FastAPI, HTTPException, Request
    from starlette.concurrency import run_in_threadpool

    from opd_fast.evaluate.base import RewardError

    app = FastAPI(title=f"opd-fast reward server: {reward.name}", docs_url=None, redoc_url=None, openapi_url=None)
    one_at_a_time = threading.Lock()
    expected = f"Bearer {token}".encode() if token else None

    def authorize(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):  # constant time: the comparison leaks no prefix of the token
            raise HTTPException(
                401, "missing or wrong token (Authorization: Bearer TOKEN)", {"WWW-Authenticate": "Bearer"}
            )

    async def body_of(request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_request_bytes:
            raise HTTPException(413, f"request of {declared} bytes, over the server's {max_request_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a chunked body declares no length
            size += len(chunk)
            if size > max_request_bytes:
                raise HTTPException(413, f"request over the server's {max_request_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def run_reward(method, *args):
        with one_at_a_time:
            try:
                return method(*args)
            except RewardError as e:  # e.g. an OCR prompt without quoted text: the request's fault
                raise BadRequest(str(e)) from None

    async def answer(parse, method, body: bytes):
        try:
            parsed = await run_in_threadpool(parse, body)  # decoding a batch of PNGs is CPU work: off the event loop
            return await run_in_threadpool(run_reward, method, *parsed)
        except BadRequest as e:
            raise HTTPException(e.status, str(e)) from None
        except Exception as e:
            log.exception("reward %r failed", reward.name)
            raise HTTPException(500, f"reward {reward.name!r} failed: {type(e).__name__}: {e}") from None

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/info")
    def info(request: Request):
        authorize(request)
        return {
            "reward": reward.name,
            "protocol": PROTOCOL,
            "aggregate": "server" if reward_aggregates_itself(reward) else "mean",
            "encodings": ["png", "raw"],
        }

    @app.post("/score")
    async def score(request: Request):
        authorize(request)

        def score_all(images, prompts, metadata):
            scores = reward.score(images, prompts, metadata) if images else []
            if len(scores) != len(images):
                raise RuntimeError(f"{len(scores)} scores for {len(images)} images")
            return scores

        scores = await answer(parse_score_request, score_all, await body_of(request))
        return {"scores": [finite_or_none(s) for s in scores]}

    @app.post("/aggregate")
    async def aggregate(request: Request):
        authorize(request)
        value = await answer(parse_aggregate_request, reward.aggregate, await body_of(request))
        return {"value": finite_or_none(value)}

    return app


# -- serving --------------------------------------------------------------------------------------------------------


def parse_options(assignments: list[str]) -> dict:
    """--option KEY=VALUE pairs -> reward options; values read as YAML (numbers, booleans), like --set."""
    import yaml

    from opd_fast.evaluate.base import RewardError

    options = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key.strip():
            raise RewardError(f"--option expects KEY=VALUE, got {assignment!r}")
        options[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
    return options


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts, so that `--port 0` (any free port) can be reported."""
    from opd_fast.evaluate.base import RewardError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RewardError(f"reward-server: cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


def serve(
    reward_name: str,
    options: dict,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = None,
    max_request_mb: float = 256,
) -> None:
    """Build the reward, bind, print one line naming the URL (scripts read the port from it), serve until stopped."""
    from opd_fast.evaluate.base import RewardError
    from opd_fast.evaluate.registry import build_reward

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise RewardError(INSTALL_HINT) from None

    token = token or os.environ.get(TOKEN_ENV) or None
    reward = build_reward(reward_name, **options)  # before binding: a reward that cannot load fails at once
    if not _is_loopback(host) and token is None:
        log.warning("serving on %s without a token: anyone who can reach this port can use the reward", host)
    app = create_app(reward, token, int(max_request_mb * 2**20))
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving reward {reward_name!r} on http://{shown}:{bound} ({'token required' if token else 'no token'})",
        flush=True,
    )
    # log_config=None: uvicorn logs through the root logger opd-fast configured; no access log per request
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    server.run(sockets=[sock])
