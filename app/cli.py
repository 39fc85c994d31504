"""`patchpack serve | encode | plan`: the console script."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.settings import Settings

log = logging.getLogger("patchpack")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per Settings field; unset flags fall back to env vars, then defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default
        help_text = f"{field.description or name} (env PATCHPACK_{name.upper()}, default {default})"
        if field.annotation is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, default=None, help=help_text)


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(args, name)
        for name in Settings.model_fields
        if getattr(args, name, None) is not None
    }
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SystemExit(_invalid_settings(exc)) from exc


def _invalid_settings(exc: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
    )
    return f"patchpack: invalid settings: {problems}"


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    settings = _settings_from(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = create_app(settings)
    except ValidationError as exc:
        # Device-dependent defaults (MAX_BATCH_TOKENS) are only checked once the device is known.
        raise SystemExit(_invalid_settings(exc)) from exc
    service = app.state.service
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Readiness must drop the moment SIGTERM arrives, before connections drain.
            service.begin_drain()
            super().handle_exit(sig, frame)

    server = Server(config)
    failure: list[BaseException] = []

    def fatal(error: BaseException) -> None:
        failure.append(error)
        server.should_exit = True

    service.on_fatal = fatal
    # uvicorn re-raises a SIGTERM it handled once its graceful shutdown is over, which would
    # end a cleanly drained server by the signal (exit 143); orchestrators expect 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server.run()
    if failure:
        print(f"patchpack: could not start: {failure[0]}", file=sys.stderr)
        return 1
    return 0


def encode(args: argparse.Namespace) -> int:
    import httpx

    images: list[Any] = []
    for item in args.files:
        if args.url:
            images.append({"url": item})
        else:
            images.append(base64.b64encode(Path(item).read_bytes()).decode("ascii"))
    body: dict[str, Any] = {"images": images, "strategy": args.strategy}
    for key in ("token_budget", "min_pixels", "max_pixels"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        response = httpx.post(
            args.server.rstrip("/") + "/encode", json=body, headers=headers, timeout=args.timeout
        )
    except httpx.HTTPError as exc:
        print(f"patchpack: cannot reach {args.server}: {exc}", file=sys.stderr)
        return 2
    payload = response.json()
    if args.json or response.status_code != 200:
        print(json.dumps(payload, indent=2))
        return 0 if response.status_code == 200 else 1
    print(
        f"model {payload['model']}  {payload['usage']['tokens']} tokens  "
        f"{payload['timings_ms']['total']:.1f} ms"
    )
    for item in payload["data"]:
        vector = item["embedding"]
        norm = sum(v * v for v in vector) ** 0.5
        name = args.files[item["index"]]
        print(
            f"  {name}: {item['original_size'][0]}x{item['original_size'][1]} -> "
            f"{item['size'][0]}x{item['size'][1]}, grid {item['grid'][0]}x{item['grid'][1]}, "
            f"{item['tokens']} tokens, dim {len(vector)}, norm {norm:.4f}"
        )
    return 0


def plan(args: argparse.Namespace) -> int:
    from app.imaging.sizing import SizeRequest, SizingError, Strategy, plan_image

    try:
        result = plan_image(
            SizeRequest(
                args.height,
                args.width,
                args.token_budget,
                args.min_pixels,
                args.max_pixels,
                Strategy(args.strategy),
                args.max_tiles,
            ),
            args.patch_size,
        )
    except SizingError as exc:
        print(f"patchpack: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "strategy": result.strategy.value,
                "original_size": result.original_size,
                "size": result.size,
                "grids": [[g.rows, g.cols] for g in result.grids],
                "tiles": result.tiles,
                "tokens": result.tokens,
            }
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchpack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="start the HTTP server")
    _add_settings_flags(p_serve)
    p_serve.set_defaults(func=serve)

    p_enc = sub.add_parser("encode", help="encode files (or URLs) with a running server")
    p_enc.add_argument("files", nargs="+", help="image files, or URLs with --url")
    p_enc.add_argument("--url", action="store_true", help="arguments are URLs for the server")
    p_enc.add_argument("--server", default="http://127.0.0.1:8000")
    p_enc.add_argument("--token-budget", type=int)
    p_enc.add_argument("--min-pixels", type=int)
    p_enc.add_argument("--max-pixels", type=int)
    p_enc.add_argument("--strategy", default="naflex", choices=["naflex", "square", "anyres"])
    p_enc.add_argument("--api-key", help="bearer key, when the server requires one")
    p_enc.add_argument("--timeout", type=float, default=120.0)
    p_enc.add_argument("--json", action="store_true", help="print the raw JSON response")
    p_enc.set_defaults(func=encode)

    p_plan = sub.add_parser("plan", help="show how an image of HxW would be sized")
    p_plan.add_argument("height", type=int)
    p_plan.add_argument("width", type=int)
    p_plan.add_argument("--token-budget", type=int, default=256)
    p_plan.add_argument("--min-pixels", type=int)
    p_plan.add_argument("--max-pixels", type=int)
    p_plan.add_argument("--strategy", default="naflex", choices=["naflex", "square", "anyres"])
    p_plan.add_argument("--max-tiles", type=int, default=4)
    p_plan.add_argument("--patch-size", type=int, default=16)
    p_plan.set_defaults(func=plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
