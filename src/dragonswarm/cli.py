"""`dragon`: parse flags, build settings, call `run_*()`. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from dragonswarm import __version__
from dragonswarm.errors import ConfigError
from dragonswarm.settings import (
    CODER_MODEL_NAME,
    SMALL_MODEL_NAME,
    ModelSpec,
    NodeSettings,
    OrchestratorSettings,
    default_home,
)
from dragonswarm.store.base import ROLES, Store


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


def _gpu_share(text: str) -> float:
    """Like a CPU share, but 0 is allowed: it keeps every model on the CPU."""
    if text.strip() in ("0", "0.0"):
        return 0.0
    return _share(text)


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    if unit not in units or not number.replace(".", "", 1).isdigit() or float(number) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 90m, 12h or 30d, got {text!r}")
    return float(number) * units[unit]


def _model(text: str) -> ModelSpec:
    try:
        return ModelSpec.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _timeouts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stall-timeout", type=float, dest="stall_timeout_s", metavar="SECONDS",
                        help="a worker that makes no progress this long (no token, no prompt batch) is given up on "
                        "and its work moves (default 30)")  # fmt: skip
    parser.add_argument("--request-timeout", "--fragment-timeout", type=float, dest="request_timeout_s",
                        metavar="SECONDS", help="a request still running after this long, waiting included, ends "
                        "with 504 however fast it goes (default 1800)")  # fmt: skip


def _redis(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--redis", metavar="URL", help=f"{what}: redis://:PASSWORD@HOST:PORT/0 (better: DRAGON_REDIS "
                        "or [orchestrator] redis in config.toml, which keep the password off the command line)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dragon", description="Py Dragon Swarm: LLM inference on many ordinary machines.")
    parser.add_argument("--version", action="version", version=f"dragon {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    node = commands.add_parser("node", help="serve models on this machine through an OpenAI-compatible API")
    node.add_argument("--model", action="append", type=_model, metavar="NAME=PATH[:tags]", dest="models",
                      help="serve a local GGUF file under NAME (repeatable)")  # fmt: skip
    node.add_argument("--no-bundled-model", dest="bundled_model", action="store_false", default=None,
                      help="do not serve the packaged qwen2.5-coder-0.5b and gemma3-270m")  # fmt: skip
    node.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    node.add_argument("--allowed-host", action="append", dest="allowed_hosts", metavar="NAME",
                      help="a host name the local API answers to besides loopback and --host (repeatable)")  # fmt: skip
    node.add_argument("--api-port", type=int, help="port of the local API (default 8701)")
    node.add_argument("--home", help="data directory (default $DRAGON_HOME or ~/.dragonswarm)")
    node.add_argument("--local-share", type=_share, help="share of the machine for the owner's requests (0.80)")
    node.add_argument("--share", type=_share, help="share of the machine for work done for others (0.10)")
    node.add_argument("--cap-mechanism", choices=["auto", "cgroup", "duty", "none"],
                      help="how the share is enforced (default auto: cgroup quota, else affinity + duty cycle)")
    node.add_argument("--gpu-share", type=_gpu_share,
                      help="share of the GPU's memory for model layers, 0 for none (default: --local-share)")
    node.add_argument("--idle-unload", type=float, dest="idle_unload_s", metavar="SECONDS",
                      help="unload a model unused this long (default 600)")  # fmt: skip
    node.add_argument("--n-ctx", type=int, help="context length in tokens, per sequence (default 4096)")
    node.add_argument("--parallel", type=int, metavar="N",
                      help="sequences one model decodes together (continuous batching); default: from the cores, "
                      "the shares and free RAM, at most 4; 1: one at a time")  # fmt: skip
    node.add_argument("--max-queue", type=int, help="requests that may wait per model before 429 (default 32)")
    node.add_argument("--default-max-tokens", type=int, metavar="N",
                      help="tokens a choice may generate when the request sets no limit (default 2048)")  # fmt: skip
    node.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    node.add_argument("--name", help="this node's name in the swarm (default: the host name)")
    node.add_argument("--orchestrator", metavar="URL", help="join the swarm of this orchestrator "
                      "(https://host:8700; replicas: URL,URL,...)")
    node.add_argument("--key", help="a node key for --orchestrator (better: the DRAGON_KEY environment variable)")
    node.add_argument("--ca", help="the swarm's CA certificate, to verify the orchestrator (or DRAGON_CA)")
    node.add_argument("--insecure", action="store_true", default=None,
                      help="allow a plain http:// orchestrator (keys and prompts unencrypted)")  # fmt: skip
    _timeouts(node)
    node.add_argument("--api-key", help="key required on the local API; needed when --host is not loopback "
                      "(better: DRAGON_API_KEY)")  # fmt: skip

    orch = commands.add_parser("orchestrator", help="run the swarm's orchestrator")
    orch.add_argument("--host", help="address to bind (default 127.0.0.1)")
    orch.add_argument("--port", type=int, help="port (default 8700)")
    orch.add_argument("--home", help="data directory: keys, node registry (default $DRAGON_HOME or ~/.dragonswarm)")
    orch.add_argument("--max-queue", type=int, help="fragments that may wait before 429 (default 1024)")
    orch.add_argument("--max-queue-per-user", type=int,
                      help="fragments one key may have waiting (default 256; less as more keys wait)")  # fmt: skip
    orch.add_argument("--max-node-capacity", type=int, metavar="N",
                      help="fragments one node may run at once, whatever it claims (default 8)")  # fmt: skip
    orch.add_argument("--min-stream-tps", type=float, metavar="TOKENS",
                      help="tokens/s each stream must keep on a node that runs several: more go there only while "
                      "its measured rate allows; 0 fills every sequence (default 14: 0.5 s per line of code)")
    _timeouts(orch)
    orch.add_argument("--rate-rpm", type=int, help="requests per minute per key, 0 for no limit (default 600)")
    orch.add_argument("--rate-tpm", type=int, help="tokens per minute per key, 0 for no limit (default 2000000)")
    orch.add_argument("--max-tokens", type=int, help="the most max_tokens a request may ask per choice (4096)")
    orch.add_argument("--default-max-tokens", type=int, metavar="N",
                      help="tokens a choice may generate when the request sets no limit (default 2048)")  # fmt: skip
    orch.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    orch.add_argument("--insecure", action="store_true", default=None,
                      help="serve plain HTTP instead of TLS (only on a network you trust)")  # fmt: skip
    _redis(orch, "keep the state in this Redis, shared with other replicas, instead of SQLite under --home")
    orch.add_argument("--no-response-cache", dest="response_cache", action="store_false", default=None,
                      help="never answer from the response cache (by default the answer to a request at "
                      "temperature 0 or with a seed is kept and replayed to the same key)")  # fmt: skip
    orch.add_argument("--cache-ttl", type=_duration, dest="cache_ttl_s", metavar="DURATION",
                      help="how long a cached answer is kept: 30s, 90m, 12h (default 1h)")  # fmt: skip
    orch.add_argument("--cache-shared", action="store_true", default=None,
                      help="one response cache for every key: a key may be given an answer computed for "
                      "another (by default each key has its own)")  # fmt: skip
    orch.add_argument("--cache-max-mb", type=int, metavar="MB",
                      help="the most the cached answers take in responses.db without --redis (default 256; "
                      "with --redis, Redis's own maxmemory bounds them)")  # fmt: skip

    certs = commands.add_parser("certs", help="the swarm's own certificate authority")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION", parser_class=_Parser)
    init = certs_commands.add_parser("init", help="create a private CA and the orchestrator's certificate")
    init.add_argument("--name", action="append", dest="names", metavar="NAME|IP",
                      help="a host name or IP the orchestrator answers to (repeatable; default: localhost, "
                      "127.0.0.1, ::1 and this host's name)")  # fmt: skip
    init.add_argument("--home", help="data directory (default $DRAGON_HOME or ~/.dragonswarm)")
    init.add_argument("--force", action="store_true", help="replace an existing CA (every node needs the new one)")

    keys = commands.add_parser("keys", help="manage API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION", parser_class=_Parser)
    create = keys_commands.add_parser("create", help="create a key; it is printed once and only its hash is kept")
    create.add_argument("--role", required=True, choices=list(ROLES))
    create.add_argument("--name", default="", help="a label to recognise the key by")
    create.add_argument("--home", help="the orchestrator's data directory")
    create.add_argument("--expires", type=_duration, metavar="DURATION", help="valid for this long: 90m, 12h, 30d")
    create.add_argument("--no-cache", dest="cache", action="store_false",
                        help="its answers never come from nor go to the orchestrator's response cache")  # fmt: skip
    listing = keys_commands.add_parser("list", help="every key: id, role, name, shown prefix, state")
    listing.add_argument("--home", help="the orchestrator's data directory")
    revoke = keys_commands.add_parser("revoke", help="revoke a key for good (by id or shown prefix)")
    revoke.add_argument("key", metavar="ID|PREFIX")
    revoke.add_argument("--home", help="the orchestrator's data directory")
    for sub in (create, listing, revoke):
        _redis(sub, "the keys are in this Redis, which the orchestrator replicas share")

    status = commands.add_parser("status", help="show the swarm's nodes")
    status.add_argument("--url", help="the orchestrator (default: from $DRAGON_HOME/swarm.json, else :8700)")
    status.add_argument("--key", help="an admin key (default: $DRAGON_KEY, else the one `dragon up` keeps)")
    status.add_argument("--home", help="data directory (default $DRAGON_HOME or ~/.dragonswarm)")

    usage = commands.add_parser("usage", help="requests and tokens each key, and each node's hand-offs, used, in "
                                "all and per model")  # fmt: skip
    usage.add_argument("--json", action="store_true", help="print the orchestrator's answer as JSON: keys in "
                       "\"data\", nodes' hand-offs in \"nodes\", the window's start in \"since\"")  # fmt: skip
    usage.add_argument("--since", metavar="WHEN", help="count from the hour holding WHEN on (35 days back at most): "
                       "30m, 24h, 7d (back from now), unix seconds (9 digits or more), or an ISO date or time "
                       "(local unless it gives a zone)")  # fmt: skip
    _redis(usage, "read the report from this Redis, which the orchestrator replicas share, not from an orchestrator")

    nodes = commands.add_parser("nodes", help="list the swarm's nodes, revoke one, or free a name")
    nodes_commands = nodes.add_subparsers(dest="nodes_command", required=True, metavar="ACTION", parser_class=_Parser)
    nodes_list = nodes_commands.add_parser("list", help="the nodes, as `dragon status` shows them")
    nodes_revoke = nodes_commands.add_parser("revoke", help="cut a node off now; it can never rejoin")
    nodes_revoke.add_argument("name")
    nodes_forget = nodes_commands.add_parser("forget", help="free a node's name: its credential and record are "
                                             "deleted; a machine may join under it with the node key")  # fmt: skip
    nodes_forget.add_argument("name")
    status.add_argument("--ca", help="the swarm's CA certificate (default: from swarm.json, or DRAGON_CA)")
    dashboard = commands.add_parser("dashboard", help="print a one-time link that logs a browser in to the "
                                    "orchestrator's live dashboard (admin)")  # fmt: skip
    dashboard.add_argument("--open", action="store_true", help="open it in this machine's browser too")
    dashboard.add_argument("--ttl", type=_duration, default=120.0, help="how long the link stays valid (120s; at "
                           "most 1h)")  # fmt: skip
    for sub in (nodes_list, nodes_revoke, nodes_forget, usage, dashboard):
        sub.add_argument("--ca", help="the swarm's CA certificate (default: from swarm.json, or DRAGON_CA)")
        sub.add_argument("--url", help="the orchestrator (default: from $DRAGON_HOME/swarm.json, else :8700)")
        sub.add_argument("--key", help="an admin key (default: $DRAGON_KEY, else the one `dragon up` keeps)")
        sub.add_argument("--home", help="data directory (default $DRAGON_HOME or ~/.dragonswarm)")

    up = commands.add_parser("up", help="a whole swarm on this machine: orchestrator, this node and K workers")
    up.add_argument("--workers", type=int, default=3, help="worker nodes besides this machine's own (default 3)")
    up.add_argument("--port", type=int, default=8700, help="the orchestrator's port (default 8700)")
    up.add_argument("--api-port", type=int, default=8701, help="this machine's node API port (default 8701)")
    up.add_argument("--home", help="data directory (default $DRAGON_HOME or ~/.dragonswarm)")
    up.add_argument("--model", action="append", type=_model, metavar="NAME=PATH[:tags]", dest="models",
                    help="serve a local GGUF file under NAME on every node (repeatable)")  # fmt: skip
    up.add_argument("--no-bundled-model", dest="bundled_model", action="store_false", default=True,
                    help="do not serve the packaged qwen2.5-coder-0.5b and gemma3-270m")  # fmt: skip
    up.add_argument("--share", type=_share, default=0.10, help="each worker's share for others' work (0.10)")
    up.add_argument("--local-share", type=_share, default=0.80, help="the owner's share on every node (0.80)")
    up.add_argument("--replicas", type=int, default=1, help="orchestrator replicas sharing a local Redis (1: "
                    "none, the embedded store)")  # fmt: skip
    return parser


def _settings(args: argparse.Namespace, names: list[str], cls: type[Any] = NodeSettings) -> Any:
    given: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        raise ConfigError(f"invalid {field}: {err['msg']}") from None


def cmd_node(args: argparse.Namespace) -> None:
    from dragonswarm.engines.models import check_gguf
    from dragonswarm.node.app import run_node
    from dragonswarm.node.service import LocalModel

    settings: NodeSettings = _settings(args, [
        "models", "bundled_model", "host", "api_port", "home", "local_share", "share", "cap_mechanism", "gpu_share",
        "idle_unload_s", "n_ctx", "parallel", "max_queue", "default_max_tokens", "log_level", "name", "orchestrator",
        "key", "ca", "insecure", "api_key", "allowed_hosts", "stall_timeout_s", "request_timeout_s"])  # fmt: skip
    _setup_logging(settings.log_level)
    if bool(settings.orchestrator) != bool(settings.key):
        raise ConfigError("joining a swarm needs both --orchestrator URL and a node key (--key or DRAGON_KEY)")
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        raise ConfigError(f"--host {settings.host} opens this node's API beyond this machine: set --api-key "
                          "(or DRAGON_API_KEY) so only those who hold it can use it")  # fmt: skip
    urls = settings.orchestrator_urls
    if any(u.startswith("http://") for u in urls) and not settings.insecure:
        raise ConfigError("the orchestrator URL is plain http: use https:// with --ca, or add --insecure "
                          "to send keys and prompts unencrypted")  # fmt: skip
    if settings.ca is not None and not settings.ca.is_file():
        raise ConfigError(f"--ca {settings.ca}: no such file")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--orchestrator expects http(s)://HOST:PORT (several: comma-separated), got {url!r}")
    if len({u.split("://")[0] for u in urls}) > 1:
        raise ConfigError("--orchestrator: replicas of one swarm are all https:// or all http://")
    models = [(spec, check_gguf(spec.path)) for spec in settings.models]
    names = [spec.name for spec, _ in models]
    if len(set(names)) != len(names):
        raise ConfigError("two models share one name")
    if settings.bundled_model:
        models[:0] = [(spec, check_gguf(spec.path)) for spec in _bundled(settings.models_dir, names)]
    if not models:
        raise ConfigError("no model to serve: give --model NAME=PATH or drop --no-bundled-model")
    base = f"http://{settings.host}:{settings.api_port}/v1"
    print(f"dragon node: serving {', '.join(s.name for s, _ in models)} at {base}", file=sys.stderr)
    print(f"  try: curl {base}/chat/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{models[0][0].name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'",
          file=sys.stderr)  # fmt: skip
    run_node(settings, [LocalModel(spec, size) for spec, size in models])


def _bundled(models_dir: Path, taken: list[str]) -> list[ModelSpec]:
    """The bundled models, the coder first, less those a --model of the same name replaces."""
    from dragonswarm.engines.models import ProgressPrinter, bundled_coder, bundled_gemma

    specs = []
    for name, write in ((CODER_MODEL_NAME, bundled_coder), (SMALL_MODEL_NAME, bundled_gemma)):
        if name not in taken:
            printer = ProgressPrinter(f"writing the bundled model {name}", lambda line: print(line, file=sys.stderr))
            specs.append(write(models_dir, printer))
    return specs


def cmd_orchestrator(args: argparse.Namespace) -> None:
    from dragonswarm.orchestrator.app import run_orchestrator

    names = ["host", "port", "home", "max_queue", "max_queue_per_user", "request_timeout_s", "stall_timeout_s",
             "log_level", "rate_rpm", "rate_tpm", "max_tokens", "default_max_tokens", "insecure",
             "max_node_capacity", "min_stream_tps", "redis", "response_cache", "cache_ttl_s", "cache_shared",
             "cache_max_mb"]  # fmt: skip
    settings: OrchestratorSettings = _settings(args, names, OrchestratorSettings)
    _setup_logging(settings.log_level)
    if not settings.insecure:
        from dragonswarm.tls import TlsFiles, default_names, init_ca

        files = TlsFiles(settings.tls_dir)
        if not files.ready():
            init_ca(files, default_names())
            print(f"dragon orchestrator: created the swarm's CA; give nodes and clients --ca {files.ca_cert}",
                  file=sys.stderr)  # fmt: skip
    scheme = "http" if settings.insecure else "https"
    print(f"dragon orchestrator: {scheme}://{settings.host}:{settings.port}/v1 (state in {_state_in(settings)})",
          file=sys.stderr)  # fmt: skip
    run_orchestrator(settings)


def _state_in(settings: OrchestratorSettings) -> str:
    """Where the orchestrator's state is, as it may be printed: a Redis URL without its password."""
    if settings.redis is None:
        return str(settings.db_path)
    from dragonswarm.store.redis import redacted

    return redacted(settings.redis.get_secret_value())


def _orchestrator_store(args: argparse.Namespace) -> Store:
    """The store the orchestrator of `--home` keeps its state in: its Redis (--redis, DRAGON_REDIS or
    config.toml), else its SQLite file."""
    from dragonswarm.store.backends import open_store

    settings: OrchestratorSettings = _settings(args, ["home", "redis"], OrchestratorSettings)
    return open_store(settings.home, settings.redis.get_secret_value() if settings.redis else None)


def cmd_certs(args: argparse.Namespace) -> None:
    from dragonswarm.tls import TlsFiles, certificate_names, default_names, init_ca

    home = Path(args.home).expanduser() if args.home else default_home()
    files = TlsFiles(home / "tls")
    if files.ready() and not args.force and not args.names:
        names = ", ".join(certificate_names(files.server_cert))
        print(f"the swarm's CA is already there: {files.ca_cert} (orchestrator names: {names})", file=sys.stderr)
        return
    init_ca(files, args.names or default_names(), force=args.force)
    print(f"CA certificate      {files.ca_cert}   (give it to nodes and clients: --ca / DRAGON_CA)", file=sys.stderr)
    print(f"orchestrator cert   {files.server_cert}   for {', '.join(certificate_names(files.server_cert))}",
          file=sys.stderr)  # fmt: skip


def cmd_keys(args: argparse.Namespace) -> None:
    import time

    store = _orchestrator_store(args)
    try:
        if args.keys_command == "create":
            expires = time.time() + args.expires if args.expires else None
            try:
                key, record = store.create_key(args.role, args.name or f"{args.role} key", expires, args.cache)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            cache = "" if record.cache else ", no response cache"
            print(f"created {record.role} key #{record.id} ({record.name}{cache}); it is shown only this once:",
                  file=sys.stderr)  # fmt: skip
            print(key)
        elif args.keys_command == "list":
            from dragonswarm.status import keys_table

            print(keys_table(store.list_keys(), time.time()))
        else:
            revoked = store.revoke_key(args.key)
            if revoked is None:
                raise ConfigError(f"no single key has id or prefix {args.key!r} (see dragon keys list)")
            print(f"revoked {revoked.role} key #{revoked.id} ({revoked.name})", file=sys.stderr)
    finally:
        store.close()


def _admin_request(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """Call the orchestrator's admin API; the URL and key default to what `dragon up` keeps."""
    import httpx

    from dragonswarm import tls

    home = Path(args.home).expanduser() if args.home else default_home()
    url, key, ca = args.url, args.key or os.environ.get("DRAGON_KEY"), args.ca or os.environ.get("DRAGON_CA")
    swarm_file, admin_file = home / "swarm.json", home / "keys" / "admin.key"
    swarm = json.loads(swarm_file.read_text()) if swarm_file.exists() else {}
    if url is None:
        url = swarm.get("api_url", "https://127.0.0.1:8700")
        ca = ca or swarm.get("ca_cert")
    if key is None and admin_file.exists():
        key = admin_file.read_text().strip()
    if not key:
        raise ConfigError("this needs an admin key: --key KEY or DRAGON_KEY")
    base = url.rstrip("/").removesuffix("/v1")
    try:
        response = httpx.request(method, f"{base}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=10,
                                 json=body, verify=tls.client_context(Path(ca)) if ca else True)  # fmt: skip
    except httpx.TransportError as exc:
        raise ConfigError(f"cannot reach the orchestrator at {base}: {exc}") from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise ConfigError(f"the orchestrator answered {response.status_code}: {message}")
    return response.json()


def cmd_status(args: argparse.Namespace) -> None:
    from dragonswarm.status import nodes_table

    print(nodes_table(_admin_request(args, "GET", "/v1/nodes")["data"]))


def cmd_nodes(args: argparse.Namespace) -> None:
    from dragonswarm.status import nodes_table

    if args.nodes_command == "list":
        print(nodes_table(_admin_request(args, "GET", "/v1/nodes")["data"]))
        return
    if args.nodes_command == "forget":
        result = _admin_request(args, "POST", f"/v1/nodes/{args.name}/forget")
        cut = " and cut off" if result["was_connected"] else ""
        print(f"node {result['name']} forgotten{cut}; a machine may join under this name again", file=sys.stderr)
        return
    result = _admin_request(args, "POST", f"/v1/nodes/{args.name}/revoke")
    cut = " and cut off" if result["was_connected"] else ""
    print(f"node {result['name']} revoked{cut}; it cannot rejoin", file=sys.stderr)


def cmd_usage(args: argparse.Namespace) -> None:
    import time
    from urllib.parse import urlencode

    from dragonswarm.orchestrator.usage import read_usage, since_arg
    from dragonswarm.status import usage_since, usage_table

    try:
        since = None if args.since is None else since_arg(args.since, time.time())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.redis or os.environ.get("DRAGON_REDIS"):  # the replicas' shared store: no orchestrator needed
        store = _orchestrator_store(args)
        try:
            answer = read_usage(store, since, time.time())
        finally:
            store.close()
    else:
        query = "" if since is None else "?" + urlencode({"since": repr(since)})
        answer = _admin_request(args, "GET", f"/v1/usage{query}")
        if since is not None and "since" not in answer:  # it ignored ?since= and counted all time
            raise ConfigError("this orchestrator is too old to count usage by the hour (--since): upgrade it, or "
                              "leave --since out for all time")  # fmt: skip
    if answer.get("since") is not None:  # the hour the window starts at: before WHEN, or after it if not kept
        print(usage_since(answer["since"]), file=sys.stderr)
    print(json.dumps(answer, indent=2) if args.json else usage_table(answer["data"], answer.get("nodes", [])))


def cmd_dashboard(args: argparse.Namespace) -> None:
    answer = _admin_request(args, "POST", "/v1/dashboard/login", {"ttl_s": args.ttl})
    print(answer["url"])
    print(f"a one-time link, valid for {answer['expires_in']:.0f} s: it logs one browser in", file=sys.stderr)
    if args.open:
        import webbrowser

        if not webbrowser.open(answer["url"]):
            print("no browser could be opened here: open the link above yourself", file=sys.stderr)


def cmd_up(args: argparse.Namespace) -> None:
    from dragonswarm.engines.models import check_gguf
    from dragonswarm.up import run_up

    if args.workers < 0 or args.workers > 64:
        raise ConfigError("--workers must be between 0 and 64")
    if args.replicas < 1 or args.replicas > 8:
        raise ConfigError("--replicas must be between 1 and 8")
    home = Path(args.home).expanduser() if args.home else default_home()
    models = list(args.models or [])
    for spec in models:
        check_gguf(spec.path)
    if args.bundled_model:
        models[:0] = _bundled(home / "models", [m.name for m in models])
    if not models:
        raise ConfigError("no model to serve: give --model NAME=PATH or drop --no-bundled-model")
    code = run_up(home, args.port, args.api_port, args.workers, models, args.share, args.local_share,
                  lambda line: print(line, file=sys.stderr, flush=True), args.replicas)  # fmt: skip
    if code:
        raise SystemExit(code)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


COMMANDS = {"node": cmd_node, "orchestrator": cmd_orchestrator, "keys": cmd_keys, "status": cmd_status,
            "dashboard": cmd_dashboard,
            "nodes": cmd_nodes, "usage": cmd_usage, "up": cmd_up, "certs": cmd_certs}


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
