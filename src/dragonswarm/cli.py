"""`dragon`: parse flags, build settings, call `run_*()`. Nothing else lives here."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, NoReturn

from pydantic import ValidationError

from dragonswarm import __version__
from dragonswarm.errors import ConfigError
from dragonswarm.settings import DEFAULT_MODEL_NAME, ModelSpec, NodeSettings


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"dragon: error: {message}\n")


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share must be in (0, 1], got {value}")
    return value


def _model(text: str) -> ModelSpec:
    try:
        return ModelSpec.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dragon", description="Py Dragon Swarm: LLM inference on many ordinary machines.")
    parser.add_argument("--version", action="version", version=f"dragon {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    node = commands.add_parser("node", help="serve models on this machine through an OpenAI-compatible API")
    node.add_argument("--model", action="append", type=_model, metavar="NAME=PATH[:tags]", dest="models",
                      help="serve a local GGUF file under NAME (repeatable)")  # fmt: skip
    node.add_argument("--no-bundled-model", dest="bundled_model", action="store_false", default=None,
                      help="do not serve the packaged gemma3-270m")  # fmt: skip
    node.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    node.add_argument("--api-port", type=int, help="port of the local API (default 8701)")
    node.add_argument("--home", help="data directory (default $DRAGON_HOME or ~/.dragonswarm)")
    node.add_argument("--local-share", type=_share, help="share of the machine for the owner's requests (0.80)")
    node.add_argument("--share", type=_share, help="share of the machine for work done for others (0.10)")
    node.add_argument("--cap-mechanism", choices=["auto", "cgroup", "duty", "none"],
                      help="how the share is enforced (default auto: cgroup quota, else affinity + duty cycle)")
    node.add_argument("--idle-unload", type=float, dest="idle_unload_s", metavar="SECONDS",
                      help="unload a model unused this long (default 600)")  # fmt: skip
    node.add_argument("--n-ctx", type=int, help="context length in tokens (default 4096)")
    node.add_argument("--max-queue", type=int, help="requests that may wait per model before 429 (default 32)")
    node.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return parser


def _settings(args: argparse.Namespace, names: list[str]) -> NodeSettings:
    given: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    try:
        return NodeSettings(**given)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        raise ConfigError(f"invalid {field}: {err['msg']}") from None


def cmd_node(args: argparse.Namespace) -> None:
    from dragonswarm.engines.models import ProgressPrinter, bundled_model, check_gguf
    from dragonswarm.node.app import run_node

    settings = _settings(args, ["models", "bundled_model", "host", "api_port", "home", "local_share", "share",
                                "cap_mechanism", "idle_unload_s", "n_ctx", "max_queue", "log_level"])  # fmt: skip
    _setup_logging(settings.log_level)
    models = [(spec, check_gguf(spec.path)) for spec in settings.models]
    names = [spec.name for spec, _ in models]
    if len(set(names)) != len(names):
        raise ConfigError("two models share one name")
    if settings.bundled_model and DEFAULT_MODEL_NAME not in names:
        label = f"writing the bundled model {DEFAULT_MODEL_NAME}"
        progress = ProgressPrinter(label, lambda line: print(line, file=sys.stderr))
        spec = bundled_model(settings.models_dir, progress)
        models.insert(0, (spec, check_gguf(spec.path)))
    if not models:
        raise ConfigError("no model to serve: give --model NAME=PATH or drop --no-bundled-model")
    base = f"http://{settings.host}:{settings.api_port}/v1"
    print(f"dragon node: serving {', '.join(s.name for s, _ in models)} at {base}", file=sys.stderr)
    print(f"  try: curl {base}/chat/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{models[0][0].name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'",
          file=sys.stderr)  # fmt: skip
    run_node(settings, models)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


COMMANDS = {"node": cmd_node}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"dragon: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
