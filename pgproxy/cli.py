"""The command line: flags → `Settings` → logging → the proxy.

Rules of this file:

* Every setting has a flag generated from `Settings.model_fields`, named after it
  (`default_pool_size` → `--default-pool-size`), with the field's description as help. No flag
  is written by hand except `--config` and `--version`.
* A flag not given is absent (`argparse.SUPPRESS`), so it never overrides the environment or
  the file. Values go to `load_settings` as typed, so a bad value is reported the same way
  whatever its source: one line, `pgproxy: invalid setting NAME: problem`, exit code 2, and
  nothing of the proxy imported or started.
"""

import argparse
import logging
import os
import sys
from enum import StrEnum
from pathlib import Path

from pydantic.fields import FieldInfo

from pgproxy import __version__
from pgproxy.config import ENV_PREFIX, Settings, load_settings
from pgproxy.errors import ConfigError

# Set by the supervisor for the workers it starts (pgproxy.workers.WORKER_ENV; not imported
# from there, so that a bad setting is reported before the proxy's modules load).
WORKER_ENV = "_PGPROXY_WORKER"
# Exit code for a bad command line or configuration, the same as argparse's usage errors.
EXIT_BAD_CONFIG = 2
# The config file may also be named in the environment, handy in a container.
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Settings given once per entry, by repeating the flag; the singular reads better there.
_REPEATED = {"users": "--user", "databases": "--database"}
_METAVARS: dict[str, str | tuple[str, str]] = {
    "listen": "HOST:PORT",
    "server": "HOST[:PORT]|URL",
    "users": "NAME:PASSWORD",
    # nargs="+": one metavar for the first word, one for the rest.
    "databases": ("ALIAS[=KEY=VALUE]", "KEY=VALUE"),
    "server_reset_query": "SQL",
}


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per setting, plus `--config` and `--version`."""
    parser = argparse.ArgumentParser(
        prog="pgproxy",
        description="A PostgreSQL connection-pooling proxy. Precedence of settings: "
        f"flags > environment ({ENV_PREFIX}NAME) > TOML file (--config) > defaults.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="PATH",
        help=f"TOML file of settings named as below (default_pool_size = 20). Env: {CONFIG_ENV}.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = _help(name, field).replace("%", "%%")
        if name in _REPEATED:
            # nargs="+" lets `--database app=dbname=x pool_size=5` work without quotes.
            parser.add_argument(
                _REPEATED[name],
                flag,
                dest=name,
                action="append",
                nargs="+" if name == "databases" else None,
                default=argparse.SUPPRESS,
                metavar=_metavar(name, field),
                help=help_text + " Repeatable.",
            )
        else:
            parser.add_argument(
                flag,
                dest=name,
                default=argparse.SUPPRESS,
                metavar=_metavar(name, field),
                help=help_text,
            )
    return parser


def _metavar(name: str, field: FieldInfo) -> str | tuple[str, str]:
    if name in _METAVARS:
        return _METAVARS[name]
    kind = field.annotation
    # No argparse `choices`: a bad choice is a bad setting, reported like any other.
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        return "{" + ",".join(member.value for member in kind) + "}"
    if kind is int:
        return "N"
    if kind is float:
        return "SECONDS"
    return "VALUE"


def _help(name: str, field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    if isinstance(default, StrEnum):
        shown = default.value
    elif isinstance(default, float):
        shown = f"{default:g}"
    elif default in ((), {}):
        shown = "none"
    elif default == "":
        shown = '""'
    else:
        shown = str(default)
    return f"{field.description} Default: {shown}. Env: {ENV_PREFIX}{name.upper()}."


def _flags(parsed: dict[str, object]) -> dict[str, object]:
    """Parsed arguments → raw setting values for `load_settings`."""
    flags = dict(parsed)
    if "databases" in flags:
        entries = flags["databases"]
        assert isinstance(entries, list)
        flags["databases"] = [" ".join(words) for words in entries]
    return flags


def main(argv: list[str] | None = None) -> int:
    """Run pgproxy; returns the process exit code (2 for a bad setting)."""
    if argv is None:
        argv = sys.argv[1:]
    parsed = vars(build_parser().parse_args(argv))
    config = parsed.pop("config", None)
    if config is None and os.environ.get(CONFIG_ENV):
        config = Path(os.environ[CONFIG_ENV])
    assert config is None or isinstance(config, Path)
    try:
        settings = load_settings(_flags(parsed), config_file=config)
    except ConfigError as exc:
        sys.stderr.write(f"pgproxy: invalid setting {exc.setting}: {exc.problem}\n")
        return EXIT_BAD_CONFIG
    # Set by a supervisor (workers > 1) in the environment of the workers it starts.
    worker = os.environ.get(WORKER_ENV)
    log_format = LOG_FORMAT
    if worker:
        log_format = LOG_FORMAT.replace("%(name)s", f"%(name)s[worker {worker.split('/')[0]}]")
    logging.basicConfig(level=settings.log_level.upper(), format=log_format, stream=sys.stderr)
    # Imported only now: a bad setting must not pay for (or fail on) importing the proxy.
    from pgproxy.proxy import serve
    from pgproxy.workers import WorkerSpec, serve_workers

    if settings.workers > 1 and not worker:
        return serve_workers(settings, argv)
    flags = _flags(parsed)
    return serve(
        settings,
        reload=lambda: load_settings(flags, config_file=config),
        worker=WorkerSpec.decode(worker) if worker else None,
    )
