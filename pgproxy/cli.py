"""The command line: flags → `Settings` → logging → the proxy.

Rules of this file:

* Every setting has a flag generated from `Settings.model_fields`, named after it
  (`default_pool_size` → `--default-pool-size`), with the field's description as help. No flag
  is written by hand except `--config`, `--pgbouncer-config`, `--version` and PgBouncer's
  `--quiet` and `--daemon` (refused: pgproxy runs in the foreground).
* A flag not given is absent (`argparse.SUPPRESS`), so it never overrides the environment or
  the file. Values go to `load_settings` as typed, so a bad value is reported the same way
  whatever its source: one line, `pgproxy: invalid setting NAME: problem`, exit code 2, and
  nothing of the proxy imported or started.
* `--pgbouncer-config` is a file layer like `--config`: flags > environment > pgbouncer.ini >
  defaults. See `_pgbouncer_flags` for how that order is kept.
"""

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path

from pydantic.fields import FieldInfo

from pgproxy import __version__, pgbouncer_ini
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
    """An argparse parser with one flag per setting, plus the hand-written ones."""
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
    parser.add_argument(
        "--pgbouncer-config",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="PgBouncer's pgbouncer.ini (with its %%include files and auth_file), read as the "
        "settings file instead of --config: every setting pgproxy has is mapped, and each one it "
        "does not support is named in a warning on stderr. RELOAD and SIGHUP read it again.",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="Do not print the warnings about pgbouncer.ini settings pgproxy does not support.",
    )
    parser.add_argument(
        "-d",
        "--daemon",
        action="store_true",
        default=argparse.SUPPRESS,
        help="Not supported (PgBouncer's): pgproxy runs in the foreground; start it from a "
        "process manager such as systemd.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
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


def _in_environment(name: str, environ: Mapping[str, str]) -> bool:
    """Whether the environment sets this setting: `PGPROXY_NAME` in any case, as pydantic reads."""
    wanted = f"{ENV_PREFIX}{name}".upper()
    return any(key.upper() == wanted for key in environ)


def _pgbouncer_flags(
    path: Path, explicit: dict[str, object], environ: Mapping[str, str]
) -> tuple[dict[str, object], pgbouncer_ini.Conversion]:
    """The settings of a pgbouncer.ini, laid under the environment and the explicit flags.

    `load_settings` ranks its sources flags > environment > TOML file, and a TOML file is the
    only file it reads. Rather than teach it a second file format, the converted values travel
    with the flags, minus every setting the environment sets (so the environment's value is
    the one read), with the explicit flags laid over them. The result is the same order as
    with `--config`: flags > environment > pgbouncer.ini > defaults. `--config` and
    `--pgbouncer-config` together are refused, as a TOML file would then rank below the ini.
    """
    conversion = pgbouncer_ini.convert(path)
    flags = {
        name: value
        for name, value in conversion.settings.items()
        if not _in_environment(name, environ)
    }
    flags.update(explicit)
    return flags, conversion


def _fail(message: str) -> int:
    sys.stderr.write(f"pgproxy: {message}\n")
    return EXIT_BAD_CONFIG


def main(argv: list[str] | None = None) -> int:
    """Run pgproxy; returns the process exit code (2 for a bad setting)."""
    if argv is None:
        argv = sys.argv[1:]
    parsed = vars(build_parser().parse_args(argv))
    config = parsed.pop("config", None)
    pgbouncer_config = parsed.pop("pgbouncer_config", None)
    quiet = bool(parsed.pop("quiet", False))
    if parsed.pop("daemon", False):
        return _fail(
            "--daemon is not supported: pgproxy runs in the foreground; start it from a process "
            "manager (systemd, a container runtime, supervisord) to run it in the background"
        )
    if config is None and os.environ.get(CONFIG_ENV):
        config = Path(os.environ[CONFIG_ENV])
    assert config is None or isinstance(config, Path)
    assert pgbouncer_config is None or isinstance(pgbouncer_config, Path)
    if config is not None and pgbouncer_config is not None:
        return _fail(f"give --config ({CONFIG_ENV}) or --pgbouncer-config, not both")
    # Set by a supervisor (workers > 1) in the environment of the workers it starts.
    worker = os.environ.get(WORKER_ENV)
    explicit = _flags(parsed)
    flags = explicit
    # Where each pgbouncer.ini setting came from, to point a bad value at its line.
    origins: dict[str, str] = {}
    # Warnings already shown; workers (started by a supervisor that showed them) show none.
    warned: set[str] = set()
    quiet = quiet or bool(worker)
    try:
        if pgbouncer_config is not None:
            flags, conversion = _pgbouncer_flags(pgbouncer_config, explicit, os.environ)
            origins = {name: where for name, where in conversion.origins.items() if name in flags}
            warned.update(conversion.warnings)
            for warning in () if quiet else conversion.warnings:
                sys.stderr.write(f"pgproxy: pgbouncer.ini: {warning}\n")
        settings = load_settings(flags, config_file=config)
    except ConfigError as exc:
        # A value from the file, not overridden by a flag or the environment: say where.
        where = origins.get(exc.setting) if exc.setting not in explicit else None
        if where is not None:
            return _fail(f"invalid setting {exc.setting}: {exc.problem} (from {where})")
        return _fail(f"invalid setting {exc.setting}: {exc.problem}")
    log_format = LOG_FORMAT
    if worker:
        log_format = LOG_FORMAT.replace("%(name)s", f"%(name)s[worker {worker.split('/')[0]}]")
    logging.basicConfig(level=settings.log_level.upper(), format=log_format, stream=sys.stderr)
    # Imported only now: a bad setting must not pay for (or fail on) importing the proxy.
    from pgproxy.proxy import serve
    from pgproxy.workers import WorkerSpec, serve_workers

    if settings.workers > 1 and not worker:
        return serve_workers(settings, argv)

    def reload() -> Settings:
        """RELOAD / SIGHUP: the same sources again, the pgbouncer.ini (and its files) too."""
        if pgbouncer_config is None:
            return load_settings(explicit, config_file=config)
        again, conversion = _pgbouncer_flags(pgbouncer_config, explicit, os.environ)
        for warning in conversion.warnings:
            if warning not in warned and not quiet:
                logging.getLogger("pgproxy").warning("pgbouncer.ini: %s", warning)
            warned.add(warning)
        return load_settings(again, config_file=config)

    return serve(
        settings,
        reload=reload,
        worker=WorkerSpec.decode(worker) if worker else None,
    )
