"""Settings: API.md's defaults, PATCHPACK_* env vars, invariants, and `serve` refusing bad ones."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from app import cli
from app.settings import Settings


@pytest.fixture(autouse=True)
def _no_patchpack_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("PATCHPACK_") and key != "PATCHPACK_TEST_SEED":
            monkeypatch.delenv(key)


def test_defaults_are_those_of_the_api_table() -> None:
    s = Settings()
    assert s.model == "demo:base"
    assert s.device == "auto"
    assert s.dtype == "auto"
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.max_wait_ms == 5
    assert s.default_token_budget == 256
    assert s.max_token_budget == 4096
    assert s.max_images_per_request == 64
    assert s.max_request_bytes == 67108864
    assert s.max_image_pixels == 100000000
    assert s.request_timeout_s == 60
    assert s.api_keys == ""
    assert s.api_key_list == ()
    assert s.allow_urls is False
    # Device-dependent until resolved.
    assert s.max_batch_tokens is None
    assert s.max_queue_tokens is None
    with pytest.raises(RuntimeError):
        _ = s.batch_tokens


@pytest.mark.parametrize(("cuda", "batch"), [(False, 4096), (True, 16384)])
def test_resolve_fills_device_defaults(cuda: bool, batch: int) -> None:
    s = Settings().resolve(cuda=cuda)
    assert s.max_batch_tokens == s.batch_tokens == batch
    assert s.max_queue_tokens == s.queue_tokens == 8 * batch


def test_resolve_keeps_explicit_values() -> None:
    s = Settings(max_batch_tokens=2048, max_token_budget=1024, max_queue_tokens=5000)
    r = s.resolve(cuda=True)
    assert (r.batch_tokens, r.queue_tokens) == (2048, 5000)
    only_batch = Settings(max_batch_tokens=2048, max_token_budget=2048).resolve(cuda=False)
    assert only_batch.queue_tokens == 8 * 2048


def test_env_vars_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHPACK_MODEL", "demo:tiny")
    monkeypatch.setenv("PATCHPACK_DEVICE", "cpu")
    monkeypatch.setenv("PATCHPACK_MAX_BATCH_TOKENS", "2048")
    monkeypatch.setenv("PATCHPACK_MAX_TOKEN_BUDGET", "1024")
    monkeypatch.setenv("PATCHPACK_MAX_WAIT_MS", "12.5")
    monkeypatch.setenv("PATCHPACK_API_KEYS", "k1,k2")
    monkeypatch.setenv("PATCHPACK_ALLOW_URLS", "true")
    monkeypatch.setenv("PATCHPACK_REQUEST_TIMEOUT_S", "3")
    s = Settings()
    assert s.model == "demo:tiny"
    assert s.device == "cpu"
    assert s.max_batch_tokens == 2048
    assert s.max_token_budget == 1024
    assert s.max_wait_ms == 12.5
    assert s.api_key_list == ("k1", "k2")
    assert s.allow_urls is True
    assert s.request_timeout_s == 3
    assert s.resolve(cuda=True).queue_tokens == 8 * 2048


def test_explicit_arguments_beat_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHPACK_MAX_WAIT_MS", "99")
    assert Settings(max_wait_ms=1).max_wait_ms == 1


def test_resolve_does_not_reread_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(max_wait_ms=7)
    monkeypatch.setenv("PATCHPACK_MAX_WAIT_MS", "99")
    monkeypatch.setenv("PATCHPACK_MODEL", "demo:so400m")
    r = s.resolve(cuda=False)
    assert r.max_wait_ms == 7
    assert r.model == "demo:base"


def test_bad_env_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHPACK_MAX_BATCH_TOKENS", "lots")
    with pytest.raises(ValidationError, match="max_batch_tokens"):
        Settings()


def test_max_token_budget_above_max_batch_tokens_is_refused() -> None:
    with pytest.raises(ValidationError, match="MAX_TOKEN_BUDGET"):
        Settings(max_batch_tokens=1024, max_token_budget=2048)


def test_max_token_budget_above_the_device_default_is_refused_at_resolve() -> None:
    s = Settings(max_token_budget=9000)  # fine until the device is known
    assert s.resolve(cuda=True).max_token_budget == 9000
    with pytest.raises(ValidationError, match=r"MAX_TOKEN_BUDGET \(9000\) exceeds"):
        s.resolve(cuda=False)
    with pytest.raises(ValidationError, match="MAX_TOKEN_BUDGET"):
        Settings(max_token_budget=20000).resolve(cuda=True)


def test_default_budget_above_max_budget_is_refused() -> None:
    with pytest.raises(ValidationError, match="DEFAULT_TOKEN_BUDGET"):
        Settings(default_token_budget=512, max_token_budget=256)


def test_queue_smaller_than_a_batch_is_refused() -> None:
    with pytest.raises(ValidationError, match="MAX_QUEUE_TOKENS"):
        Settings(max_batch_tokens=1024, max_token_budget=1024, max_queue_tokens=512)


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12", "auto"])
def test_good_device_strings(device: str) -> None:
    assert Settings(device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU ", "mps", "", "cuda:0,1"])
def test_bad_device_strings_are_refused(device: str) -> None:
    with pytest.raises(ValidationError, match="DEVICE"):
        Settings(device=device)


@pytest.mark.parametrize(
    ("raw", "keys"),
    [
        ("", ()),
        ("one", ("one",)),
        ("a,b", ("a", "b")),
        (" a , b ,, c ,", ("a", "b", "c")),
        (",,", ()),
    ],
)
def test_api_key_list_parsing(raw: str, keys: tuple[str, ...]) -> None:
    assert Settings(api_keys=raw).api_key_list == keys


# -- `patchpack serve` refusing bad settings ------------------------------------------------


def _serve_args(*flags: str) -> object:
    return cli.build_parser().parse_args(["serve", *flags])


def test_serve_flags_become_settings() -> None:
    s = cli._settings_from(
        cli.build_parser().parse_args(
            ["serve", "--model", "demo:tiny", "--max-wait-ms", "7", "--allow-urls", "--port", "0"]
        )
    )
    assert (s.model, s.max_wait_ms, s.allow_urls, s.port) == ("demo:tiny", 7, True, 0)


def test_serve_flags_beat_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHPACK_MAX_WAIT_MS", "99")
    monkeypatch.setenv("PATCHPACK_DEFAULT_TOKEN_BUDGET", "128")
    s = cli._settings_from(cli.build_parser().parse_args(["serve", "--max-wait-ms", "3"]))
    assert s.max_wait_ms == 3
    assert s.default_token_budget == 128


def test_serve_refuses_an_invariant_violation_with_a_clear_message() -> None:
    with pytest.raises(SystemExit) as info:
        cli._settings_from(
            cli.build_parser().parse_args(
                ["serve", "--max-batch-tokens", "1024", "--max-token-budget", "2048"]
            )
        )
    message = str(info.value.code)
    assert message.startswith("patchpack: invalid settings")
    assert "MAX_TOKEN_BUDGET (2048) exceeds MAX_BATCH_TOKENS (1024)" in message


def test_serve_refuses_a_bad_value_with_the_field_name() -> None:
    with pytest.raises(SystemExit) as info:
        cli._settings_from(cli.build_parser().parse_args(["serve", "--device", "gpu"]))
    assert "device" in str(info.value.code)
    assert "Traceback" not in str(info.value.code)


def test_serve_refuses_a_budget_over_the_cpu_batch_default_before_starting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # MAX_BATCH_TOKENS is only known once the device is: 4096 on CPU < 9000.
    started: list[object] = []
    monkeypatch.setattr("uvicorn.Server.run", lambda self, *a, **k: started.append(self))
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--device", "cpu", "--model", "demo:tiny", "--max-token-budget", "9000"])
    message = str(info.value.code)
    assert "MAX_TOKEN_BUDGET (9000) exceeds MAX_BATCH_TOKENS (4096)" in message
    assert message.startswith("patchpack: invalid settings")
    assert not started
