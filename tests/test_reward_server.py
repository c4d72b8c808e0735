"""`opd-fast reward-server` and the `remote` reward, over loopback: each server is a real subprocess started through
the command line on a port the OS picks (`--port 0`, the port read from the line it prints), serving `clipscore` on
a tiny random CLIP (tests/tiny_pipeline.py), or a test reward that holds a request until the test lets it go.

Nothing here waits on a clock to decide an outcome: a request is known to be in flight when the test reward has
touched a file on receipt, and a timeout is provoked by a server whose one scoring slot is taken."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipeline import one_thread, write_tiny_clip  # noqa: F401  (one_thread: autouse)

from opd_fast.evaluate.base import RewardError
from opd_fast.evaluate.registry import build_reward
from opd_fast.evaluate.server import TOKEN_ENV

pytest.importorskip("fastapi", reason="the reward server needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the reward server needs the serve extra: pip install -e '.[serve]'")

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-for-tests"
START_TIMEOUT = 180  # seconds for a server to import torch and load its reward: a bound, not an expectation
PROMPTS = ["a photo of the cat", "a red dog", 'a sign that says "hi"']

# A reward for the stall tests, defined in the server process before the CLI runs (a reward registered in this test
# module would not exist there). score() touches DIR/received-PROMPT, then holds the request until DIR/release-PROMPT
# exists; it holds the server's one scoring slot meanwhile.
HOLDING_SERVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from opd_fast.evaluate.base import Reward, register

    @register("hold")
    class Hold(Reward):
        def __init__(self, dir=None, device=None, batch_size=16):
            super().__init__("cpu", batch_size)
            self.dir = Path(dir)

        def score(self, images, prompts, metadata):
            (self.dir / f"received-{prompts[0]}").touch()
            while not (self.dir / f"release-{prompts[0]}").exists():
                time.sleep(0.01)
            return [1.0] * len(images)

    from opd_fast.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


class Server:
    """A running reward server: its process and url; stop() ends it (terminate, then kill)."""

    def __init__(self, args: list[str], log: Path, token: str | None = None, script: str | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop(TOKEN_ENV, None)
        if token:
            env[TOKEN_ENV] = token  # the variable, not --token: a command line is visible to every user
        entry = ["-c", script] if script else ["-m", "opd_fast.cli"]
        self.log = log
        with open(log, "w") as stderr:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, *entry, "reward-server", "--port", "0", *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        first_line: list[str] = []
        reader = threading.Thread(target=lambda: first_line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        match = re.search(r"on (http://\S+) ", first_line[0]) if first_line else None
        if match is None:
            self.stop()
            pytest.fail(f"the reward server did not start: {first_line}\n{log.read_text()[-3000:]}")
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + START_TIMEOUT
        while get(self.url + "/health")[0] != 200:  # the socket listens before uvicorn serves: wait for it
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the reward server never answered /health\n{log.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()


DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def call(url: str, body: bytes | None = None, token: str | None = TOKEN, timeout: float = 120) -> tuple[int, dict]:
    """(status, JSON reply) of a GET (no body) or POST; a connection error is status 0."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=body, headers=headers, method="GET" if body is None else "POST")
    try:
        with DIRECT.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except (urllib.error.URLError, ConnectionError):
        return 0, {}


def get(url: str, token: str | None = None) -> tuple[int, dict]:
    return call(url, None, token, timeout=10)


def post(url: str, payload, token: str | None = TOKEN) -> tuple[int, dict]:
    return call(url, payload if isinstance(payload, bytes) else json.dumps(payload).encode(), token)


def random_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def raw(array: np.ndarray) -> dict:
    return {"raw": base64.b64encode(array.tobytes()).decode(), "shape": list(array.shape), "dtype": str(array.dtype)}


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("reward_server") / "clip")


@pytest.fixture(scope="module")
def server(clip, tmp_path_factory):
    """clipscore on the tiny CLIP, token required, host left to its default."""
    log = tmp_path_factory.mktemp("reward_server_log") / "server.log"
    running = Server(["--reward", "clipscore", "--option", f"model={clip}", "--option", "device=cpu"], log, TOKEN)
    yield running
    running.stop()


# -- scores -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_remote_scores_are_the_local_reward_scores(server, clip, encoding):
    images = random_images([(48, 48), (40, 56), (48, 48)])
    local = build_reward("clipscore", model=str(clip), device="cpu").score(images, PROMPTS, [])
    remote = build_reward("remote", url=server.url, token=TOKEN, encoding=encoding, batch_size=2)
    assert remote.served == "clipscore" and not remote.server_aggregates  # a plain mean: computed here
    scores = remote.score(images, PROMPTS, [])  # two requests: batch_size 2
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(local), rtol=1e-5, atol=1e-4)
    arrays = [np.asarray(image) for image in images]  # arrays as well as PIL images
    torch.testing.assert_close(torch.tensor(remote.score(arrays, PROMPTS, [{}, {}, {}])), torch.tensor(scores))
    assert remote.score([], [], []) == []
    assert remote.aggregate(scores, [{}] * 3) == pytest.approx(sum(scores) / 3)


def test_the_server_aggregates_for_a_reward_whose_number_is_not_the_mean(server):
    """GenEval's aggregate is not the mean: the client then asks /aggregate, which answers with the reward's own."""
    remote = build_reward("remote", url=server.url, token=TOKEN)
    remote.server_aggregates = True  # what /info says for geneval; clipscore's aggregate is the mean
    assert remote.aggregate([1.0, 2.0, 6.0], [{}, {}, {}]) == pytest.approx(3.0)
    assert math.isnan(remote.aggregate([1.0, float("nan")], [{}, {}]))  # NaN travels as null, both ways
    assert post(server.url + "/aggregate", {"scores": [1, 2], "metadata": [{}]}) == (
        422,
        {"detail": "2 scores but 1 metadata entries"},
    )


def test_opd_fast_eval_scores_through_a_remote_reward(server, clip, tmp_path):
    """`opd-fast eval`'s scoring (evaluate_folders) with a remote reward beside the same reward run locally."""
    from opd_fast.evaluate.eval import evaluate_folders

    folder = tmp_path / "samples"
    (folder / "images").mkdir(parents=True)
    records = []
    for i, (image, prompt) in enumerate(zip(random_images([(48, 48)] * 3, seed=1), PROMPTS)):
        image.save(folder / "images" / f"{i:05d}.png")
        records.append({"index": i, "prompt": prompt, "file": f"images/{i:05d}.png", "metadata": {}})
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "sample.json").write_text(json.dumps({"task": "pick", "model": "student"}))
    spec = {"*": [{"name": "clipscore", "model": str(clip)}, {"name": "remote", "url": server.url, "token": TOKEN}]}
    report = evaluate_folders([folder], spec, tmp_path / "out", device="cpu", batch_size=2)
    row = report["results"]["student"]
    assert row["pick/remote"]["n"] == 3
    assert row["pick/remote"]["score"] == pytest.approx(row["pick/clipscore"]["score"], rel=1e-5, abs=1e-4)


# -- what the server refuses ------------------------------------------------------------------------------------------


def test_a_malformed_request_is_a_4xx_naming_the_problem_and_the_server_goes_on(server):
    image = random_images([(8, 8)])[0]
    pixels = np.asarray(image)
    huge = io.BytesIO()
    Image.new("L", (5000, 5000)).save(huge, format="PNG")  # 25 M pixels in a few kB
    bad = [
        (b"{not json", 400, "the body is not JSON"),
        (b"[1, 2]", 400, "must be a JSON object, got list"),
        ({"prompts": ["a"]}, 422, "missing field 'images'"),
        ({"images": [{"png": png(image)}] * 2, "prompts": ["a"]}, 422, "2 images but 1 prompts"),
        ({"images": [{"png": png(image)}], "prompts": ["a"], "metadata": [{}, {}]}, 422, "1 images but 2 metadata"),
        ({"images": [{"png": "%%%not base64"}], "prompts": ["a"]}, 422, "images[0].png: bad base64"),
        ({"images": [{"png": base64.b64encode(b"GIF89a...").decode()}], "prompts": ["a"]}, 422, "not a readable PNG"),
        ({"images": [{"jpeg": png(image)}], "prompts": ["a"]}, 422, 'images[0]: expected {"png": BASE64}'),
        ({"images": [{**raw(pixels), "shape": [8, 9, 3]}], "prompts": ["a"]}, 422, "needs 216 bytes, the raw data"),
        ({"images": [raw(pixels.astype(np.float32))], "prompts": ["a"]}, 422, "only 'uint8' is accepted, got 'float"),
        ({"images": [{**raw(pixels), "shape": [8, 24]}], "prompts": ["a"]}, 422, "images[0].shape: expected [H, W, 3]"),
        ({"images": [{"png": png(image)}], "prompts": [3]}, 422, "prompts: expected a list of strings"),
        ({"images": [{"png": base64.b64encode(huge.getvalue()).decode()}], "prompts": ["a"]}, 413, "5000x5000"),
    ]
    for payload, status, message in bad:
        code, reply = post(server.url + "/score", payload)
        assert (code, message in reply.get("detail", "")) == (status, True), (payload, code, reply)
    code, reply = post(server.url + "/score", {"images": [{"png": png(image)}, raw(pixels)], "prompts": ["a", "b"]})
    assert code == 200 and len(reply["scores"]) == 2 and reply["scores"][0] == pytest.approx(reply["scores"][1])
    with pytest.raises(RewardError, match="PIL images or H x W x 3 uint8 arrays, got uint8 \\(4, 4\\)"):
        build_reward("remote", url=server.url, token=TOKEN, encoding="raw").score(
            [np.zeros((4, 4), np.uint8)], ["a"], []
        )


def test_the_token_is_enforced(server, monkeypatch):
    assert get(server.url + "/health") == (200, {"status": "ok"})  # the readiness probe names nothing
    assert get(server.url + "/info")[0] == 401
    assert get(server.url + "/info", token="wrong")[0] == 401
    assert post(server.url + "/score", {"images": [], "prompts": []}, token="wrong")[0] == 401
    assert post(server.url + "/score", {"images": [], "prompts": []}, token=None)[0] == 401
    assert get(server.url + "/info", token=TOKEN)[1]["reward"] == "clipscore"
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(RewardError, match=rf"{re.escape(server.url)} refused GET /info .*token was not accepted \(401"):
        build_reward("remote", url=server.url)
    with pytest.raises(RewardError, match="token was not accepted"):
        build_reward("remote", url=server.url, token="wrong")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # the token from the environment, not the reward spec
    assert build_reward("remote", url=server.url).served == "clipscore"


def test_the_server_binds_127_0_0_1_by_default(server):
    from opd_fast.cli import build_parser

    assert build_parser().parse_args(["reward-server", "--reward", "x"]).host == "127.0.0.1"
    assert server.url.startswith("http://127.0.0.1:")
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # the kernel's socket tables: local address, port, state
        if not Path(table).is_file():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if int(port, 16) == server.port and fields[3] == "0A":  # 0A: LISTEN
                listening.add(address)
    if not listening:
        pytest.skip("no /proc/net/tcp here to read the bound address from")
    assert listening == {"0100007F"}  # 127.0.0.1, and nothing else (not 0.0.0.0)


# -- a server that is not there, stalls, or dies --------------------------------------------------------------------


def test_a_wrong_url_fails_when_the_reward_is_built(server):
    with pytest.raises(RewardError, match=r"option 'url' is required, as http://HOST:PORT \(got 'localhost:8765'\)"):
        build_reward("remote", url="localhost:8765")
    with pytest.raises(RewardError, match="option 'url' is required"):
        build_reward("remote")
    with pytest.raises(RewardError, match=r"404 for /info: is .*/nothing an opd-fast reward-server\?"):
        build_reward("remote", url=server.url + "/nothing", token=TOKEN)
    import socket

    with socket.socket() as unused:  # bound and not listening: connections to it are refused, and no one can take it
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}"
        with pytest.raises(
            RewardError, match=rf"GET {url}/info \(at start-up\) failed after 2 tries: connection refused"
        ):
            build_reward("remote", url=url, retries=1)


def test_a_stalled_or_killed_server_gives_a_clear_reward_error_naming_the_url(tmp_path):
    hold = tmp_path / "hold"
    hold.mkdir()
    server = Server(["--reward", "hold", "--option", f"dir={hold}"], tmp_path / "server.log", script=HOLDING_SERVER)
    try:
        image = random_images([(8, 8)])

        def wait_for(name: str) -> bool:
            deadline = time.monotonic() + START_TIMEOUT
            while not (hold / name).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            return (hold / name).exists()

        # 1. a timeout: request "a" holds the server's one scoring slot, so request "c" certainly gets no answer
        (hold / "release-c").touch()  # "c" may reach the reward after "a" is let go: it must not hold anything then
        first: list = []
        holder = threading.Thread(
            target=lambda: first.append(build_reward("remote", url=server.url, retries=0).score(image, ["a"], []))
        )
        holder.start()
        assert wait_for("received-a")
        impatient = build_reward("remote", url=server.url, retries=0)
        impatient.timeout = 0.5  # after start-up: /info, outside the scoring slot, answers whatever the load
        with pytest.raises(RewardError, match=rf"POST {server.url}/score .* failed after 1 try: no answer within"):
            impatient.score(image, ["c"], [])
        (hold / "release-a").touch()
        holder.join()
        assert first == [[1.0]]  # the server went on after a client gave up

        # 2. the server dies (SIGKILL) while request "b" is in flight: no answer, then nobody at the url
        killed = []

        def kill_once_received():
            killed.append(wait_for("received-b"))
            os.kill(server.process.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_once_received)
        killer.start()
        remote = build_reward("remote", url=server.url, timeout=START_TIMEOUT, retries=1)
        with pytest.raises(
            RewardError,
            # the second try finds the port closed; were the kernel still closing the dead server's sockets, the
            # connection would be dropped instead: either way the url and the tries are named
            match=rf"POST {server.url}/score \(scoring images 0..0\) failed after 2 tries: "
            "(connection refused|the server dropped the connection)",
        ):
            remote.score(image, ["b"], [])
        killer.join()
        assert killed == [True] and server.process.wait(30) == -signal.SIGKILL
        with pytest.raises(RewardError, match=rf"GET {server.url}/info \(at start-up\) failed after 1 try"):
            build_reward("remote", url=server.url, retries=0)
    finally:
        for name in ("a", "b"):  # whatever failed above, nothing is left holding the server
            (hold / f"release-{name}").touch()
        server.stop()


def test_reward_server_command_errors(capsys):
    from opd_fast.cli import main

    assert main(["reward-server", "--reward", "nope", "--port", "0"]) == 2
    assert "opd-fast: error: unknown reward 'nope'" in capsys.readouterr().err
    assert main(["reward-server", "--reward", "clipscore", "--option", "model"]) == 2
    assert "--option expects KEY=VALUE, got 'model'" in capsys.readouterr().err
