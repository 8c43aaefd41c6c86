"""The `unmask` command: `unmask serve [MODEL_DIR] [options]`.

SIGTERM or Ctrl-C stops accepting connections, lets in-flight requests
finish (streams included) within `--shutdown-timeout`, answers those still
open then with 503 (a stream: an error event, then `[DONE]`), stops the
engine and exits with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
import sys
from dataclasses import fields

from unmask.engine.config import DUMMY_NEEDS, LOAD_FORMATS, QUANTIZATIONS, EngineConfig
from unmask.engine.method_params import METHOD_PARAMS_BY_NAME
from unmask.engine.params import (
    BLOCK_START_RULES,
    CACHE_POLICIES,
    CONFIDENCE_KINDS,
    SCHEDULES,
    UNMASK_POLICIES,
    EngineDefaults,
    ParamError,
    SamplingParams,
)
from unmask.server.model_path import MODEL_ENV, resolve_model_dir
from unmask.server.settings import ServerSettings

API_KEY_ENV = "UNMASK_API_KEY"
# After the shutdown timeout the engine ends every open request; the handlers then need a
# moment to write their 503s before uvicorn cancels what is left (such as a stalled upload).
_ANSWER_GRACE_SECONDS = 3.0
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from '536870912', '512MiB', '512M', '2GB' or '1.5G' (binary units throughout)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 512MiB, 2G, 1073741824)")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** "_KMGT".index(unit or "_"))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the None/False ones whose help already says what unset means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unmask", description="Unmask: an OpenAI-compatible server for diffusion LMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over HTTP", formatter_class=_HelpFormatter)
    serve.add_argument(
        "model_dir", nargs="?", help=f"checkpoint directory (default: ${MODEL_ENV}, else the bundled model)"
    )

    http = serve.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    http.add_argument("--port", type=int, default=8000, help="port to bind (0 picks a free one)")
    http.add_argument("--api-key", default=None, help=f"require this Bearer token on /v1/* (or ${API_KEY_ENV})")
    http.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="name(s) clients use in `model` (default: the directory name)",
    )
    http.add_argument("--max-request-bytes", type=parse_size, default=4 * 2**20, help="larger request bodies get 413")
    http.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    http.add_argument(
        "--shutdown-timeout",
        type=float,
        default=60.0,
        help="on SIGTERM, seconds in-flight requests get to finish before the rest are cut off "
        "(so a stalled client cannot hold up the exit)",
    )

    eng = serve.add_argument_group("engine")
    eng.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    eng.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    eng.add_argument("--max-num-seqs", type=int, default=64, help="most requests denoised together")
    eng.add_argument("--max-waiting", type=int, default=256, help="most requests queued; beyond it clients get 429")
    eng.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        default=None,
        help="KV pool size (per GPU), e.g. 2GiB (default: 512MiB on CPU, most free GPU memory)",
    )
    eng.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    eng.add_argument("--max-num-batched-tokens", type=int, default=16384, help="most positions recomputed in one step")
    eng.add_argument(
        "--max-score-tokens",
        type=int,
        default=1024,
        help="longest prompt scored for echo + logprobs (scoring costs one forward pass per prompt token)",
    )
    eng.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="split the model over this many GPUs of the host (cuda:0..N-1; one process each)",
    )

    eng.add_argument(
        "--load-format",
        default="auto",
        choices=LOAD_FORMATS,
        help="auto: the checkpoint's weights; dummy: only config.json and the tokenizer are read and the weights "
        "are random (N(0, 0.02), drawn on the device), to load-test a model's shapes without its weights "
        "(the text is meaningless)",
    )
    eng.add_argument(
        "--quantization",
        default="none",
        choices=QUANTIZATIONS,
        help="fp8: the projections' weights in FP8 (e4m3, a scale per output channel) and FP8 products with "
        "per-token activation scales; needs a bf16/fp16 model on a GPU of compute capability 8.9+ (Ada, Hopper)",
    )
    eng.add_argument(
        "--feature-cache", action="store_true", help="add feature pages to the KV pool (needed by cache=dllm-cache)"
    )
    eng.add_argument(
        "--guide-model",
        default=None,
        help="directory of the small causal LM behind unmask=guided (default: the bundled guide, if it fits)",
    )

    den = serve.add_argument_group("denoising defaults (each request may override them)")
    for f in fields(EngineDefaults):
        _add_default_option(den, f.name, getattr(EngineDefaults(), f.name))
    return parser


_CHOICES = {
    "cache": CACHE_POLICIES,
    "unmask": UNMASK_POLICIES,
    "confidence": CONFIDENCE_KINDS,
    "schedule": SCHEDULES,
    "block_start": BLOCK_START_RULES,
}
_HELP = {
    "cache": "cache policy: which positions each step recomputes",
    "unmask": "unmask policy: how many tokens each step commits",
    "confidence": "how a masked position's confidence is measured",
    "block_length": "tokens per block",
    "steps": "steps per block for the fixed-step unmask policies (default: one token per step)",
    "schedule": "tokens per step of the fixed-step policies: llada (even), dream (Dream's timesteps); "
    "auto: the checkpoint's family",
    "block_start": "first: commit a block's first position alone at its first step (Fast-dLLM's Dream rule); "
    "confidence: the unmask policy chooses; auto: first for Dream with cache prefix/dual and unmask=threshold",
}


def _add_default_option(group, name: str, default) -> None:
    """`--NAME` for one `EngineDefaults` field (so every engine default is settable from the CLI).

    A method parameter's help comes from its declaration (`engine.method_params`).
    """
    param = METHOD_PARAMS_BY_NAME.get(name)
    help_text = f"{param.help} (for {param.applies_to})" if param else _HELP.get(name, "")
    kind = int if default is None or isinstance(default, int) else type(default)
    group.add_argument(
        f"--{name.replace('_', '-')}", dest=name, type=kind, default=default, choices=_CHOICES.get(name), help=help_text
    )


def engine_defaults(args: argparse.Namespace) -> EngineDefaults:
    """The denoising defaults from the command line, validated as a request would be."""
    defaults = EngineDefaults(**{f.name: getattr(args, f.name) for f in fields(EngineDefaults)})
    SamplingParams(max_tokens=defaults.block_length).resolve(defaults)  # raises ParamError naming the option
    return defaults


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args, parser)
    parser.error(f"unknown command {args.command}")
    return 2


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine configuration that `unmask serve` with these options runs (the offline engine can
    take the same, so the two are compared like with like).

    Raises FileNotFoundError (no model directory), ParamError (a denoising default) or ValueError (an engine option).
    """
    return EngineConfig(
        model_dir=str(resolve_model_dir(args.model_dir)),
        dtype=args.dtype,
        device=args.device,
        page_size=args.page_size,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_score_tokens=args.max_score_tokens,
        max_waiting=args.max_waiting,
        feature_cache=args.feature_cache,
        guide_model=args.guide_model,
        tensor_parallel_size=args.tensor_parallel_size,
        load_format=args.load_format,
        quantization=args.quantization,
        defaults=engine_defaults(args),
    )


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        config = engine_config(args)
        # Imported here: the check reads the device, which needs torch (`unmask --help` must not import it).
        from unmask.engine.models.loader import check_engine_quantization

        check_engine_quantization(config)  # a one-line refusal now, not a failed startup later
    except FileNotFoundError as exc:
        parser.error(f"{exc}. {DUMMY_NEEDS}" if args.load_format == "dummy" else str(exc))
    except ParamError as exc:
        parser.error(f"--{exc.param.replace('_', '-')}: {exc.message}")
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Imported late so `unmask --help` stays fast (the engine pulls in torch).
    from unmask.engine.async_engine import AsyncEngine
    from unmask.server.app import create_app

    settings = ServerSettings(
        served_model_names=args.served_model_name or [],
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_request_bytes=args.max_request_bytes,
        defaults=config.defaults,
    )
    app = create_app(AsyncEngine(config), settings)
    sock = _bind(args.host, args.port)
    return asyncio.run(_run(app, sock, args.log_level, args.shutdown_timeout))


def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a busy port fails fast and `--port 0` learns its port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sys.exit(f"unmask: cannot bind {host}:{port}: {exc.strerror}")
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host == "0.0.0.0" else (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}"


async def _run(app, sock: socket.socket, log_level: str, shutdown_timeout: float | None = None) -> int:
    import uvicorn

    from unmask.server.draining import DrainingServer

    grace = None if shutdown_timeout is None else shutdown_timeout + _ANSWER_GRACE_SECONDS
    config = uvicorn.Config(
        app, log_level=log_level, lifespan="on", timeout_keep_alive=5, timeout_graceful_shutdown=grace
    )
    server = DrainingServer(config, app.state.unmask.engine, shutdown_timeout)
    # uvicorn re-raises the signal it shut down for once it is done; a no-op handler
    # underneath makes that a clean exit (status 0) after the drain.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        url = _url(sock)
        name = app.state.unmask.model_name
        print(f"Unmask is serving {name} at {url}/v1 (health: {url}/health, metrics: {url}/metrics)", flush=True)
    await serving
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
