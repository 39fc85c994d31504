"""A real `patchpack serve` process: real HTTP, real Prometheus text, SIGTERM drain, bad settings.

Each test starts `python -m app.cli serve --model demo:tiny` on a free loopback port, waits
for /readyz (deadline, not a sleep) and always kills the process in a `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.imaging.sizing import SizeRequest, plan_image
from tests.api.helpers import API_METRICS, Scrape, b64, clear_patchpack_env, floats, png, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
READY_S = 60.0
EXIT_S = 60.0


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self) -> httpx.AsyncClient:
        # trust_env=False: loopback traffic must never go to a proxy from the environment.
        return httpx.AsyncClient(base_url=self.url, timeout=60, trust_env=False)

    async def wait_ready(self) -> None:
        async with self.client() as client:

            async def ready() -> bool:
                if self.process.poll() is not None:
                    raise AssertionError(f"server exited early:\n{self.output()}")
                try:
                    return (await client.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, READY_S, "the server's /readyz", interval=0.1)

    def wait_exit(self) -> int:
        try:
            return self.process.wait(EXIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server did not exit:\n{self.output()}") from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**settings: str) -> dict[str, str]:
    env = clear_patchpack_env()
    env.update({f"PATCHPACK_{k.upper()}": v for k, v in settings.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def run_server(tmp_path: Path, **settings: str) -> Iterator[Server]:
    port = _free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "app.cli", "serve", "--model", "demo:tiny", "--device", "cpu"]
    cmd += ["--port", str(port), "--torch-threads", "1"]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(**settings), stdout=sink, stderr=subprocess.STDOUT
        )
        try:
            yield Server(process, f"http://127.0.0.1:{port}", log)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(30)


@pytest.fixture
def rng_images(rng: np.random.Generator) -> Callable[[int, int], bytes]:
    return lambda h, w: png(h, w, rng)


async def test_serves_real_http_and_prometheus_metrics(
    tmp_path: Path, rng_images: Callable[[int, int], bytes]
) -> None:
    with run_server(tmp_path, max_wait_ms="50") as server:
        await server.wait_ready()
        shapes = [(120, 90), (40, 300), (256, 256), (77, 77), (500, 200), (64, 32)]
        pngs = [rng_images(h, w) for h, w in shapes]
        async with server.client() as client:
            alone = []
            for data in pngs:
                response = await client.post(
                    "/encode", json={"images": [b64(data)], "token_budget": 64}
                )
                assert response.status_code == 200, response.text
                alone.append(response.json()["data"][0])

            # The same images again, concurrently: packed together, same answers.
            async def one(data: bytes) -> httpx.Response:
                return await client.post(
                    "/encode", json={"images": [b64(data)], "token_budget": 64}
                )

            burst = await asyncio.wait_for(asyncio.gather(*(one(d) for d in pngs)), 60)
            for lone, response in zip(alone, burst, strict=True):
                assert response.status_code == 200, response.text
                item = response.json()["data"][0]
                assert (item["tokens"], item["size"]) == (lone["tokens"], lone["size"])
                np.testing.assert_allclose(
                    floats(item["embedding"]), floats(lone["embedding"]), atol=1e-5
                )

            multipart = await client.post(
                "/encode",
                files=[("image", ("a.png", pngs[0], "image/png"))],
                data={"token_budget": "64"},
            )
            assert multipart.status_code == 200
            np.testing.assert_allclose(
                floats(multipart.json()["data"][0]["embedding"]),
                floats(alone[0]["embedding"]),
                atol=1e-5,
            )
            bad = await client.post("/encode", json={"images": ["QUJD"]})
            assert bad.status_code == 400
            assert bad.json()["error"] == {
                "type": "invalid_image",
                "message": bad.json()["error"]["message"],
                "index": 0,
            }

            info = (await client.get("/info")).json()
            assert info["model"] == "demo:tiny"
            assert (info["weights"], info["device"]) == ("random", "cpu")

            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            assert metrics.headers["content-type"].startswith("text/plain")
            scrape = Scrape.parse(metrics.text)
            assert not [name for name in API_METRICS if name not in scrape.names()]
            sent_tokens = 2 * sum(item["tokens"] for item in alone) + alone[0]["tokens"]
            assert scrape.value("patchpack_tokens_total") == sent_tokens
            assert scrape.value("patchpack_images_total", strategy="naflex") == 13
            assert scrape.value("patchpack_requests_total", endpoint="/encode", status="200") == 13
            assert scrape.value("patchpack_requests_total", endpoint="/encode", status="400") == 1
            assert scrape.value("patchpack_ready") == 1

        server.process.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.output()
        assert "Traceback" not in server.output()


async def test_sigterm_drains_in_flight_requests_and_exits_zero(
    tmp_path: Path, rng_images: Callable[[int, int], bytes]
) -> None:
    # Batches wait up to 3 s for company, so the requests are still in flight at SIGTERM.
    with run_server(tmp_path, max_wait_ms="3000") as server:
        await server.wait_ready()
        shapes = [(100, 100), (50, 200), (300, 120), (64, 64), (90, 160)]
        bodies = [{"images": [b64(rng_images(h, w))] * 2, "token_budget": 64} for h, w in shapes]
        tokens = [plan_image(SizeRequest(h, w, 64), 16).tokens for h, w in shapes]
        served_tokens = 0
        async with server.client() as client, server.client() as watcher:
            in_flight = [asyncio.ensure_future(client.post("/encode", json=b)) for b in bodies]

            async def all_admitted() -> bool:
                scrape = Scrape.parse((await watcher.get("/metrics")).text)
                return scrape.value("patchpack_queue_tokens") == 2 * sum(tokens)

            await wait_for(all_admitted, 30, "every request to be admitted", interval=0.05)
            server.process.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                async with server.client() as fresh:
                    try:
                        return (await fresh.get("/readyz")).status_code != 200
                    except httpx.TransportError:
                        return True  # the listener is already closed

            await wait_for(not_ready, 10, "/readyz to stop answering 200")
            async with server.client() as late:
                try:
                    refused = await late.post("/encode", json=bodies[0])
                    assert refused.status_code == 503, refused.text
                    assert refused.json()["error"]["type"] == "not_ready"
                except httpx.TransportError:
                    pass  # or not accepted at all: both are a clean refusal

            responses = await asyncio.wait_for(asyncio.gather(*in_flight), 60)
            for response, n in zip(responses, tokens, strict=True):
                assert response.status_code == 200, response.text
                payload = response.json()
                assert [d["tokens"] for d in payload["data"]] == [n, n]
                assert len(floats(payload["data"][1]["embedding"])) == 64
                served_tokens += payload["usage"]["tokens"]
        assert served_tokens == 2 * sum(tokens)
        assert server.wait_exit() == 0, server.output()
        output = server.output()
        assert "Traceback" not in output
        assert "draining" in output  # the service logged its drain


@pytest.mark.parametrize(
    ("flags", "env", "needle"),
    [
        (["--max-token-budget", "999999"], {}, "MAX_TOKEN_BUDGET (999999) exceeds"),
        ([], {"max_token_budget": "999999"}, "MAX_TOKEN_BUDGET (999999) exceeds"),
        (["--device", "gpu"], {}, "DEVICE must be"),
    ],
)
def test_invalid_settings_refuse_to_start(
    flags: list[str], env: dict[str, str], needle: str
) -> None:
    cmd = [sys.executable, "-m", "app.cli", "serve", "--model", "demo:tiny", "--port", "0"]
    result = subprocess.run(
        [*cmd, *(flags or ["--device", "cpu"])],
        cwd=ROOT,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "patchpack: invalid settings" in result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert "Uvicorn running" not in result.stdout + result.stderr


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("patchpack")
    if not script.exists():
        pytest.skip("patchpack console script not installed in this environment")
    result = subprocess.run(
        [str(script), "plan", "480", "640", "--token-budget", "256"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    assert '"tokens": 252' in result.stdout


async def test_encode_client_prints_a_summary_and_the_json(
    tmp_path: Path, rng_images: Callable[[int, int], bytes]
) -> None:
    """`patchpack encode FILE...` against a real server: readable lines, or the raw JSON."""
    files = []
    for i, (h, w) in enumerate([(120, 90), (40, 300)]):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(rng_images(h, w))
        files.append(str(path))
    with run_server(tmp_path) as server:
        await server.wait_ready()
        client = [sys.executable, "-m", "app.cli", "encode", *files, "--server", server.url]
        summary = await asyncio.to_thread(
            subprocess.run,
            [*client, "--token-budget", "64"],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        )
        assert summary.returncode == 0, summary.stderr
        lines = summary.stdout.strip().splitlines()
        assert len(lines) == 1 + len(files)
        assert "120x90 ->" in lines[1] and "norm 1.0000" in lines[1]
        assert files[1] in lines[2] and "40x300" in lines[2]
        raw = await asyncio.to_thread(
            subprocess.run,
            [*client, "--json", "--strategy", "square"],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        )
        assert raw.returncode == 0, raw.stderr
        body = json.loads(raw.stdout)
        assert [item["size"] for item in body["data"]] == [[256, 256], [256, 256]]
    # A server that is not there: a clear message and a non-zero exit, not a traceback.
    gone = subprocess.run(
        [sys.executable, "-m", "app.cli", "encode", files[0], "--server", server.url],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert gone.returncode == 2
    assert "cannot reach" in gone.stderr and "Traceback" not in gone.stderr


def test_plan_prints_the_sizing_decision() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "plan", "480", "640", "--token-budget", "256"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "strategy": "naflex",
        "original_size": [480, 640],
        "size": [224, 288],
        "grids": [[14, 18]],
        "tiles": None,
        "tokens": 252,
    }
