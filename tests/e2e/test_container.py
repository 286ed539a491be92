"""The container image and the deployment examples, checked without a Docker engine.

* The Dockerfile is read by a small parser of Docker's syntax (below) and must have what a
  production image needs: two stages, a non-root user, the two ports, a health check, SIGTERM,
  tini as PID 1.
* What it copies from the build context exists and survives .dockerignore.
* Its builder stage is replayed in a temporary directory (the context copied through
  .dockerignore, the same `python -m venv` and `pip install`): the entrypoint of the resulting
  virtualenv, with the image's environment, serves the session cluster, answers /healthz and the
  image's HEALTHCHECK, and exits 0 on SIGTERM. The compose file's Django app queries through it.
* docker-compose.yml and deploy/k8s/ load, agree with each other, with the image and with
  pgproxy's settings.
"""

from __future__ import annotations

import http.client
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from pgproxy.config import ENV_PREFIX, PasswordKind, Settings, load_settings
from pgproxy.localpg import LocalPostgres, free_port
from pgproxy.wire.scram import parse_scram_secret

from .helpers import APP_PASSWORD, REPO, cli_env, connect, wait_for

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.yml"
APP_DIR = REPO / "deploy" / "compose" / "app"
K8S = REPO / "deploy" / "k8s"
PGPROXY_PORT = 6432
METRICS_PORT = 9127
HEALTHCHECK_URL = f"http://127.0.0.1:{METRICS_PORT}/healthz"
# Where the image links Debian's jemalloc; the replayed image uses this machine's copy.
IMAGE_JEMALLOC = "/usr/local/lib/libjemalloc.so.2"
HOST_JEMALLOC = next(Path("/usr/lib").glob("*/libjemalloc.so.2"), None)
# What the image must not contain: the dev extras of pyproject.toml.
DEV_PACKAGES = {"pytest", "ruff", "mypy", "hypothesis", "psycopg", "asyncpg", "django"}
RUNTIME_PACKAGES = {"pgproxy", "uvloop", "pg8000", "pydantic-settings", "prometheus-client"}
# A mapping as yaml.safe_load gives it.
Yaml = dict[str, Any]


# --- a Dockerfile parser ----------------------------------------------------------------------

KEYWORDS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
    "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
# Instructions whose arguments may start with --name=value options.
FLAGGED = {"FROM", "RUN", "COPY", "ADD", "HEALTHCHECK"}
_FLAG = re.compile(r"--([a-z][a-z-]*)(?:=(\S*))?\s+")
_DIRECTIVE = re.compile(r"#\s*([a-z]+)\s*=\s*(\S+)\s*$")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    flags: dict[str, str]  # --name=value options before the arguments
    args: str  # the rest, continuation lines joined
    line: int  # where it starts, 1-based

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of the exec form, or None for the shell form.

        Docker quietly runs an invalid array (single quotes, a trailing comma) as a shell
        command; here it is an error, because it is always a mistake.
        """
        text = self.args.strip()
        if not text.startswith("["):
            return None
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(
                f"line {self.line}: {self.keyword} array is not JSON: {text}"
            ) from None
        if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            raise ValueError(f"line {self.line}: {self.keyword} array must hold strings")
        return value

    def words(self) -> list[str]:
        """The arguments as a list: the exec form, or the shell form split like a shell."""
        form = self.exec_form
        return form if form is not None else shlex.split(self.args)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]

    def env(self) -> dict[str, str]:
        """Every ENV of the stage, in order (`$NAME` left as written)."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            words = shlex.split(instruction.args)
            if words and "=" not in words[0]:  # the old form: ENV NAME value with spaces
                values[words[0]] = instruction.args.strip()[len(words[0]) :].strip()
                continue
            for word in words:
                name, equals, value = word.partition("=")
                assert equals and name, f"line {instruction.line}: bad ENV word {word!r}"
                values[name] = value
        return values


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) of each instruction: comments dropped, continuations joined."""
    lines = text.splitlines()
    # Parser directives: `# name=value` comments at the very top.
    start = 0
    while start < len(lines) and (match := _DIRECTIVE.match(lines[start])):
        assert match.group(1) != "escape", "only the default escape character is supported"
        start += 1
    current: list[str] = []
    first = 0
    for number, line in enumerate(lines[start:], start=start + 1):
        stripped = line.strip()
        if stripped.startswith("#") or (current and not stripped):
            continue  # Docker drops comment lines, also inside a continuation
        if not current:
            if not stripped:
                continue
            first = number
        if line.rstrip().endswith("\\"):
            current.append(line.rstrip()[:-1])
            continue
        current.append(line)
        yield first, "".join(current).strip()
        current = []
    assert not current, f"line {first}: the file ends inside a continuation"


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile, each with its instructions."""
    stages: list[Stage] = []
    for number, logical in logical_lines(text):
        match = re.match(r"(\S+)\s*(.*)", logical, re.DOTALL)
        assert match is not None
        keyword, rest = match.group(1).upper(), match.group(2)
        if keyword not in KEYWORDS:
            raise ValueError(f"line {number}: unknown instruction {match.group(1)!r}")
        flags: dict[str, str] = {}
        while keyword in FLAGGED and (flag := _FLAG.match(rest)):
            flags[flag.group(1)] = flag.group(2) or ""
            rest = rest[flag.end() :]
        instruction = Instruction(keyword, flags, rest, number)
        if keyword == "FROM":
            words = rest.split()
            if len(words) == 3 and words[1].upper() == "AS":
                stages.append(Stage(words[0], words[2]))
            elif len(words) == 1:
                stages.append(Stage(words[0], None))
            else:
                raise ValueError(f"line {number}: FROM IMAGE [AS NAME], got {rest!r}")
        elif not stages:
            assert keyword == "ARG", f"line {number}: {keyword} before the first FROM"
        else:
            stages[-1].instructions.append(instruction)
    return stages


def healthcheck_command(instruction: Instruction) -> list[str]:
    """The argv of `HEALTHCHECK [options] CMD [...]` (exec form required)."""
    keyword, _, rest = instruction.args.strip().partition(" ")
    assert keyword.upper() == "CMD", f"HEALTHCHECK {keyword}: expected CMD"
    argv = Instruction("CMD", {}, rest, instruction.line).exec_form
    assert argv, "HEALTHCHECK CMD must be an exec-form array (no shell in the check)"
    return argv


# --- .dockerignore --------------------------------------------------------------------------


def _translate(pattern: str) -> str:
    """A .dockerignore pattern as a regex: `*`, `?`, `[...]` within a path segment, `**` across."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")  # any number of directories, none included
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[" and (end := pattern.find("]", i + 1)) > i:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]")
            i = end
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


class DockerIgnore:
    """Docker's rules: patterns in order, `!` re-includes, the last pattern that matches the
    path or one of its parent directories decides."""

    def __init__(self, text: str) -> None:
        self.patterns: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
            self.patterns.append((include, re.compile(_translate(pattern))))

    def excludes(self, path: str) -> bool:
        parts = path.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for include, regex in self.patterns:
            if any(regex.fullmatch(candidate) for candidate in candidates):
                excluded = not include
        return excluded


def context_files(context: Path, source: str, ignore: DockerIgnore) -> list[Path]:
    """The files under `source` (a file or a directory of the build context) Docker sends."""
    path = context / source
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [p for p in files if not ignore.excludes(p.relative_to(context).as_posix())]


# --- the files under test ---------------------------------------------------------------------


def dockerfile() -> tuple[Stage, Stage]:
    stages = parse_dockerfile(DOCKERFILE.read_text())
    assert len(stages) == 2, [stage.base for stage in stages]
    return stages[0], stages[1]


def k8s_documents() -> dict[str, Yaml]:
    """Every object of deploy/k8s/*.yaml by kind; each kind once."""
    objects: dict[str, Yaml] = {}
    paths = sorted(K8S.glob("*.yaml"))
    assert paths, "no manifests in deploy/k8s"
    for path in paths:
        for document in yaml.safe_load_all(path.read_text()):
            if document is None:
                continue
            assert isinstance(document, dict), path
            assert {"apiVersion", "kind", "metadata"} <= set(document), path
            assert document["metadata"].get("name"), path
            assert document["kind"] not in objects, f"{document['kind']} twice"
            objects[document["kind"]] = document
    return objects


def pgproxy_env(values: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in values.items() if name.startswith(ENV_PREFIX)}


def setting_of(variable: str) -> str:
    """`PGPROXY_DEFAULT_POOL_SIZE` → `default_pool_size`; fails for a name pgproxy lacks."""
    assert variable.startswith(ENV_PREFIX), variable
    name = variable.removeprefix(ENV_PREFIX).lower()
    assert name in Settings.model_fields or name == "config", f"{variable}: no such setting"
    return name


def seconds(duration: str | int) -> float:
    """A compose duration (`40s`, `1m30s`) in seconds."""
    if isinstance(duration, int):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --- (a) the Dockerfile ---------------------------------------------------------------------


def test_dockerfile_parser_reads_comments_continuations_flags_and_arrays():
    stages = parse_dockerfile(
        "# syntax=docker/dockerfile:1\n"
        "FROM base:1 AS build\n"
        "RUN --mount=type=cache,target=/c one \\\n"
        "# a comment inside the continuation\n"
        "    && two\n"
        "from base:1\n"
        'ENV A=1 B="two words" \\\n'
        "    C=$A\n"
        "ENV OLD legacy form\n"
        'HEALTHCHECK --interval=5s CMD ["x", "-c", "y z"]\n'
        'ENTRYPOINT ["tini", "--"]\n'
        "CMD run me\n"
    )
    assert [(s.base, s.name) for s in stages] == [("base:1", "build"), ("base:1", None)]
    run = stages[0].last("RUN")
    assert run.flags == {"mount": "type=cache,target=/c"}
    assert shlex.split(run.args) == ["one", "&&", "two"]
    assert stages[1].env() == {"A": "1", "B": "two words", "C": "$A", "OLD": "legacy form"}
    health = stages[1].last("HEALTHCHECK")
    assert health.flags == {"interval": "5s"}
    assert healthcheck_command(health) == ["x", "-c", "y z"]
    assert stages[1].last("ENTRYPOINT").exec_form == ["tini", "--"]
    assert stages[1].last("CMD").exec_form is None
    with pytest.raises(ValueError, match="not JSON"):
        _ = Instruction("CMD", {}, "['single', 'quotes']", 1).exec_form
    with pytest.raises(ValueError, match="unknown instruction"):
        parse_dockerfile("FROM x\nRUNN y\n")


def test_dockerfile_builds_a_virtualenv_and_runs_it_on_a_slim_python_image():
    builder, runtime = dockerfile()
    assert builder.name is not None
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-[a-z]+)?", builder.base), builder.base
    # The virtualenv's python links to the base image's interpreter: the same image both times.
    assert runtime.base == builder.base
    venv = builder.last("RUN").words()[0].removesuffix("/bin/pip")
    assert ["python", "-m", "venv", venv] in [r.words() for r in builder.all("RUN")]
    # The builder compiles the hot path, and a build that cannot fails (PGPROXY_COMPILE=1).
    assert "--no-install-recommends gcc libc6-dev" in builder.all("RUN")[0].args
    assert builder.env()["PGPROXY_COMPILE"] == "1"
    # The runtime stage takes the virtualenv only, to the same path (its scripts' #! lines).
    copies = runtime.all("COPY") + runtime.all("ADD")
    assert [(c.flags, c.words()) for c in copies] == [({"from": builder.name}, [venv, venv])]
    runtime_runs = " ".join(r.args for r in runtime.all("RUN"))
    for tool in ("gcc", "build-essential", "pip ", "make"):
        assert tool not in runtime_runs, f"{tool} in the runtime stage"
    assert "--no-install-recommends tini" in runtime_runs
    assert "rm -rf /var/lib/apt/lists/*" in runtime_runs
    assert runtime.env()["PATH"].startswith(f"{venv}/bin:")


def test_dockerfile_runs_pgproxy_as_a_non_root_user_under_tini():
    _, runtime = dockerfile()
    user, _, group = runtime.last("USER").args.strip().partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it.
    assert user.isdigit() and int(user) != 0, user
    assert not group or (group.isdigit() and int(group) != 0), group
    created = " ".join(r.args for r in runtime.all("RUN"))
    assert f"--uid {user}" in created
    assert runtime.last("ENTRYPOINT").exec_form == ["tini", "--", "pgproxy"]
    assert runtime.last("CMD").exec_form is not None
    assert runtime.last("STOPSIGNAL").args.strip() == "SIGTERM"


def test_dockerfile_preloads_the_jemalloc_its_runtime_stage_installs():
    _, runtime = dockerfile()
    env = runtime.env()
    assert env["LD_PRELOAD"] == IMAGE_JEMALLOC
    assert env["PYTHONMALLOC"] == "malloc"  # or Python's small objects never reach jemalloc
    assert "background_thread:true" in env["MALLOC_CONF"].split(",")
    installs = [r.args for r in runtime.all("RUN") if "apt-get install" in r.args]
    assert len(installs) == 1 and "libjemalloc2" in installs[0].split()
    link = installs[0].partition("ln -s ")[2]
    assert "libjemalloc.so.2" in link and link.rstrip().endswith(f" {IMAGE_JEMALLOC}"), link


def test_dockerfile_exposes_the_ports_its_environment_listens_on():
    _, runtime = dockerfile()
    exposed = {int(word) for e in runtime.all("EXPOSE") for word in e.args.split()}
    assert exposed == {PGPROXY_PORT, METRICS_PORT}
    env = pgproxy_env(runtime.env())
    # Not set by the image: pgproxy's defaults are these ports, and an ENV would win over a
    # mounted TOML file's listen / metrics_listen.
    assert "PGPROXY_LISTEN" not in env and "PGPROXY_METRICS_LISTEN" not in env
    for variable in env:
        setting_of(variable)
    settings = load_settings(environ=env)
    assert settings.metrics_listen is not None
    assert {settings.listen.port, settings.metrics_listen.port} == exposed


def test_dockerfile_healthcheck_asks_healthz_with_the_images_python():
    _, runtime = dockerfile()
    health = runtime.last("HEALTHCHECK")
    assert {"interval", "timeout", "retries"} <= set(health.flags)
    argv = healthcheck_command(health)
    assert argv[:2] == ["python", "-c"]
    assert HEALTHCHECK_URL in argv[2]


# --- (b) the build context ------------------------------------------------------------------


def test_dockerignore_keeps_the_package_and_leaves_out_the_rest():
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    for kept in (
        "pyproject.toml",
        "setup.py",
        "README.md",
        "pgproxy/__init__.py",
        "pgproxy/core/pool.py",
    ):
        assert not ignore.excludes(kept), kept
    for left_out in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "pgproxy/__pycache__/cli.cpython-311.pyc",
        "pgproxy/wire/__pycache__/scram.cpython-312.pyc",
        "pgproxy.egg-info/PKG-INFO",
        "build/lib/pgproxy/cli.py",
        "bench/run.py",
        "pgproxy/net/flow.cpython-311-x86_64-linux-gnu.so",
    ):
        assert ignore.excludes(left_out), left_out


@pytest.mark.parametrize(
    ("dockerfile_path", "context"), [(DOCKERFILE, REPO), (APP_DIR / "Dockerfile", APP_DIR)]
)
def test_every_path_a_dockerfile_copies_is_in_its_build_context(dockerfile_path, context):
    ignore_file = context / ".dockerignore"
    ignore = DockerIgnore(ignore_file.read_text() if ignore_file.is_file() else "")
    copied = 0
    for stage in parse_dockerfile(dockerfile_path.read_text()):
        for copy in stage.all("COPY") + stage.all("ADD"):
            if "from" in copy.flags:
                continue
            *sources, _dest = copy.words()
            assert sources, f"line {copy.line}: nothing to copy"
            for source in sources:
                assert (context / source).exists(), f"{source} is not in {context}"
                assert not ignore.excludes(source), f"{source} is excluded by .dockerignore"
                files = context_files(context, source, ignore)
                assert files, f"{source}: every file is excluded"
                # A directory arrives whole, Python sources included; only caches stay out.
                if (context / source).is_dir():
                    python = [
                        p for p in (context / source).rglob("*.py") if "__pycache__" not in p.parts
                    ]
                    assert python and set(python) <= set(files), source
                copied += 1
    assert copied


# --- (c) the builder, replayed; the entrypoint, run ------------------------------------------


# For the first test of the module that needs `image_install`: pip with a cold cache downloads
# the dependencies once (about 10 s with a warm cache).
BUILDS_IMAGE = pytest.mark.timeout(300)


@dataclass(frozen=True)
class ImageInstall:
    root: Path  # stands for the image's "/"
    venv: Path  # the image's /opt/pgproxy, under root
    env: dict[str, str]  # the runtime stage's environment, paths mapped under root
    command: list[str]  # ENTRYPOINT after `tini --`, then CMD
    healthcheck: list[str]


def _host_path(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _replay_copy(copy: Instruction, root: Path, workdir: str, ignore: DockerIgnore) -> None:
    *sources, dest = copy.words()
    target = _host_path(root, posixpath.join(workdir, dest))
    for source in sources:
        origin = REPO / source
        for file in context_files(REPO, source, ignore):
            if origin.is_dir():
                to = target / file.relative_to(origin)
            elif dest.endswith("/") or len(sources) > 1:
                to = target / file.name
            else:
                to = target
            to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, to)


def _build_env() -> dict[str, str]:
    env = cli_env()
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(name, None)
    return env


def _assert_installed(script: str) -> None:
    """The packages of an `apt-get install` step are installed here (Debian's dpkg says)."""
    words = script.split("apt-get install", 1)[1].split("&&", 1)[0].split()
    packages = [w for w in words if not w.startswith("-") and w != "\\"]
    assert packages, script
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian system: cannot check the builder's packages")
    for package in packages:
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        assert status == "install ok installed", f"{package} is not installed: {status!r}"


@pytest.fixture(scope="module")
def image_install(tmp_path_factory: pytest.TempPathFactory) -> ImageInstall:
    """The builder stage replayed here: context through .dockerignore, then its RUNs.

    `python` is this test's interpreter rather than the image's; pip uses the user's cache (the
    image's build uses a BuildKit cache mount at the same place).
    """
    builder, runtime = dockerfile()
    root = tmp_path_factory.mktemp("image") / "root"
    root.mkdir()
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    workdir = "/"
    env = _build_env()
    pip_runs = 0
    for instruction in builder.instructions:
        if instruction.keyword == "COPY":
            assert "from" not in instruction.flags
            _replay_copy(instruction, root, workdir, ignore)
        elif instruction.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, instruction.args.strip())
            _host_path(root, workdir).mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "ENV":
            env.update(builder.env())
        elif instruction.keyword == "RUN" and instruction.args.startswith("apt-get update"):
            # System packages: this machine must have them (`make compile` installs them).
            _assert_installed(instruction.args)
        elif instruction.keyword == "RUN":
            # Only cache mounts, which change how fast a build is, not what it builds.
            mount = instruction.flags.get("mount", "type=cache,")
            assert set(instruction.flags) <= {"mount"} and mount.startswith("type=cache,"), mount
            script = instruction.args
            assert not re.search(r"&&|;|\||\$", script), f"not a plain command: {script}"
            argv = [
                str(_host_path(root, a)) if a.startswith("/") else a for a in shlex.split(script)
            ]
            if argv[0] == "python":
                argv[0] = sys.executable
            if "pip" in Path(argv[0]).name and "install" in argv:
                pip_runs += 1
                # The package alone: no extras (no [dev]), from the copied context.
                target = argv[-1]
                assert "[" not in target and (Path(target) / "pyproject.toml").is_file(), argv
            done = subprocess.run(
                argv,
                cwd=_host_path(root, workdir),
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
                check=False,
            )
            assert done.returncode == 0, f"{script}\n{done.stdout}\n{done.stderr}"
        else:
            raise AssertionError(f"line {instruction.line}: cannot replay {instruction.keyword}")
    assert pip_runs == 1

    copy = runtime.last("COPY")
    venv = _host_path(root, copy.words()[-1])
    runtime_env = _build_env()
    for name, value in runtime.env().items():
        value = re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: runtime_env.get(m[1] or m[2], ""), value)
        if name == "PATH":  # entries that exist in the image's tree point there
            value = os.pathsep.join(
                str(_host_path(root, part)) if _host_path(root, part).exists() else part
                for part in value.split(os.pathsep)
            )
        if name == "LD_PRELOAD":  # the runtime's RUN links it from Debian's package
            assert value == IMAGE_JEMALLOC, value
            if HOST_JEMALLOC is None:
                continue
            value = str(HOST_JEMALLOC)
        runtime_env[name] = value
    entrypoint = runtime.last("ENTRYPOINT").exec_form
    assert entrypoint is not None and entrypoint[:2] == ["tini", "--"]
    command = [*entrypoint[2:], *(runtime.last("CMD").exec_form or [])]
    return ImageInstall(
        root, venv, runtime_env, command, healthcheck_command(runtime.last("HEALTHCHECK"))
    )


@dataclass
class RunningImage:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def run_image(install: ImageInstall, pg: LocalPostgres, tmp_path: Path) -> Iterator[RunningImage]:
    """The image's command with its environment, pointed at the session cluster."""
    port, metrics_port = free_port(), free_port()
    env = dict(install.env)
    overrides = {
        # Loopback and free ports: other tests and proxies may be running on this machine.
        "PGPROXY_LISTEN": f"127.0.0.1:{port}",
        "PGPROXY_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "PGPROXY_SERVER": f"{pg.host}:{pg.port}",
        "PGPROXY_USERS": f"app:{APP_PASSWORD}",
    }
    env.update(overrides)
    executable = shutil.which(install.command[0], path=env["PATH"])
    assert executable is not None and Path(executable).parent == install.venv / "bin", executable
    log_path = tmp_path / "pgproxy.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [executable, *install.command[1:]],
            cwd="/",
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    running = RunningImage(process, port, metrics_port, log_path)

    def healthy() -> bool:
        assert process.poll() is None, f"pgproxy exited early:\n{running.log()}"
        try:
            return http_get(metrics_port, "/healthz")[0] == 200
        except OSError:
            return False

    try:
        wait_for(healthy, timeout=20, what="the image's pgproxy to answer /healthz")
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@BUILDS_IMAGE
def test_image_virtualenv_holds_pgproxy_and_only_its_runtime_dependencies(image_install):
    python = image_install.venv / "bin" / "python"
    script = (
        "import importlib.metadata, json, pgproxy\n"
        "description = importlib.metadata.metadata('pgproxy').get_payload()\n"
        "print(json.dumps([pgproxy.__file__, description]))"
    )
    found = subprocess.run(
        [python, "-c", script],
        env=image_install.env,
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    where, description = json.loads(found)
    # Installed into the virtualenv, not linked to this checkout (no editable install).
    assert Path(where).is_relative_to(image_install.venv), where
    # pyproject.toml's readme was in the context: without it the wheel builds, undescribed.
    assert description.startswith("# pgproxy\n"), description[:80]
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"],
        env=image_install.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = {package["name"].lower().replace("_", "-") for package in json.loads(listed)}
    assert installed >= RUNTIME_PACKAGES
    assert not DEV_PACKAGES & installed, DEV_PACKAGES & installed


@BUILDS_IMAGE
def test_image_entrypoint_serves_the_cluster_and_exits_0_on_sigterm(image_install, pg, tmp_path):
    with run_image(image_install, pg, tmp_path) as running:
        with connect(running.port) as conn:
            row = conn.execute("SELECT current_user, current_database(), 40 + 2").fetchone()
            assert row == ("app", "app", 42)
        assert http_get(running.metrics_port, "/healthz") == (200, b"ok\n")
        assert http_get(running.metrics_port, "/readyz")[0] == 200

        # The image's HEALTHCHECK as Docker runs it, on this run's metrics port.
        argv = list(image_install.healthcheck)
        argv[-1] = argv[-1].replace(
            HEALTHCHECK_URL, f"http://127.0.0.1:{running.metrics_port}/healthz"
        )
        assert argv != image_install.healthcheck
        python = shutil.which(argv[0], path=image_install.env["PATH"])
        assert python is not None and Path(python).parent == image_install.venv / "bin"
        check = [python, *argv[1:]]
        assert subprocess.run(check, capture_output=True, timeout=10).returncode == 0

        idle = connect(running.port)
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=20) == 0, running.log()
        with pytest.raises(psycopg.OperationalError):
            idle.execute("SELECT 1")
        idle.close()
        assert "stopped" in running.log()
        if HOST_JEMALLOC is not None:  # `make test` installs libjemalloc2
            assert "memory allocator: jemalloc" in running.log(), running.log()
        assert "hot path: compiled (mypyc)" in running.log(), running.log()
        # And the health check notices a pgproxy that is gone.
        assert subprocess.run(check, capture_output=True, timeout=10).returncode != 0


@BUILDS_IMAGE
def test_compose_django_app_queries_through_the_images_pgproxy(image_install, pg, tmp_path):
    app_env = compose_services()["app"]["environment"]
    script = (
        "import json, django\n"
        "django.setup()\n"
        "from django.db import connection\n"
        "from django.test import Client\n"
        "reply = Client().get('/')\n"
        "print(json.dumps({'status': reply.status_code, 'body': reply.content.decode(),\n"
        "    'no_server_side_cursors': connection.settings_dict['DISABLE_SERVER_SIDE_CURSORS']}))\n"
    )
    with run_image(image_install, pg, tmp_path) as running:
        env = {
            **_build_env(),
            **{name: str(value) for name, value in app_env.items()},
            "DJANGO_SETTINGS_MODULE": "webapp.settings",
            "DJANGO_ALLOWED_HOSTS": "testserver",
            "DATABASE_HOST": "127.0.0.1",
            "DATABASE_PORT": str(running.port),
            "DATABASE_PASSWORD": APP_PASSWORD,
        }
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=APP_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["status"] == 200, result
        assert result["no_server_side_cursors"] is True
        body = json.loads(result["body"])
        assert (body["database"], body["user"]) == ("app", "app")
        assert isinstance(body["backend_pid"], int)
        assert "login: user=app database=app" in running.log()  # through this pgproxy


# --- (d) docker-compose.yml and deploy/k8s/ --------------------------------------------------


def compose_services() -> dict[str, Yaml]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    services: dict[str, Yaml] = document["services"]
    assert set(services) == {"postgres", "pgproxy", "app"}
    return services


def _published(service: Yaml) -> set[int]:
    """Container ports of `ports:` entries (`[HOST_IP:]HOST_PORT:CONTAINER_PORT`)."""
    return {int(str(entry).rsplit(":", 1)[-1]) for entry in service.get("ports", [])}


def _build_context(service: Yaml) -> Path:
    build = service["build"]
    context = build if isinstance(build, str) else build["context"]
    return (COMPOSE.parent / context).resolve()


def test_compose_runs_scram_postgres_pgproxy_and_the_app_in_order():
    services = compose_services()
    postgres, proxy, app = services["postgres"], services["pgproxy"], services["app"]

    image, _, tag = postgres["image"].partition(":")
    assert image == "postgres" and tag and tag != "latest", postgres["image"]
    pg_env = postgres["environment"]
    assert "--auth=scram-sha-256" in pg_env["POSTGRES_INITDB_ARGS"].split()
    assert pg_env["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256"
    assert "healthcheck" in postgres

    assert _build_context(proxy) == REPO and (REPO / "Dockerfile").is_file()
    proxy_env = {name: str(value) for name, value in proxy["environment"].items()}
    for variable in proxy_env:
        setting_of(variable)
    _, runtime = dockerfile()
    settings = load_settings(environ={**pgproxy_env(runtime.env()), **proxy_env})
    assert (settings.server.host, settings.server.port) == ("postgres", 5432)
    assert settings.listen.port == PGPROXY_PORT
    assert _published(proxy) == {PGPROXY_PORT, METRICS_PORT}
    probe = " ".join(proxy["healthcheck"]["test"])
    assert f"127.0.0.1:{METRICS_PORT}/readyz" in probe or HEALTHCHECK_URL in probe
    assert proxy["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert seconds(proxy["stop_grace_period"]) > settings.shutdown_timeout

    assert (_build_context(app) / "Dockerfile").is_file()
    app_env = app["environment"]
    assert app_env["DATABASE_HOST"] == "pgproxy"
    assert int(app_env["DATABASE_PORT"]) == PGPROXY_PORT
    assert app["depends_on"]["pgproxy"]["condition"] == "service_healthy"
    # One login, the same everywhere: Postgres' role, pgproxy's user, the app's settings.
    users = {user.name: user.password for user in settings.users}
    assert app_env["DATABASE_USER"] == pg_env["POSTGRES_USER"]
    assert users[app_env["DATABASE_USER"]] == app_env["DATABASE_PASSWORD"]
    assert app_env["DATABASE_PASSWORD"] == pg_env["POSTGRES_PASSWORD"]
    assert app_env["DATABASE_NAME"] == pg_env["POSTGRES_DB"]


def _container(objects: dict[str, Yaml]) -> Yaml:
    containers = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Yaml = containers[0]
    return container


def _port_number(container: Yaml, port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in named, f"no container port named {port}"
    return int(named[port])


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def test_k8s_manifests_wire_probes_ports_and_objects_together():
    objects = k8s_documents()
    assert set(objects) == {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"}
    deployment, service = objects["Deployment"], objects["Service"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert _labels_match(deployment["spec"]["selector"]["matchLabels"], labels)
    assert _labels_match(service["spec"]["selector"], labels)
    pdb = objects["PodDisruptionBudget"]["spec"]
    assert _labels_match(pdb["selector"]["matchLabels"], labels)
    # A budget the Deployment cannot meet would block every node drain.
    assert pdb["minAvailable"] < deployment["spec"]["replicas"]

    container = _container(objects)
    assert {p["containerPort"] for p in container["ports"]} == {PGPROXY_PORT, METRICS_PORT}
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["httpGet"]["path"] == "/readyz"
    assert liveness["httpGet"]["path"] == "/healthz"
    for probe in (readiness, liveness):
        assert _port_number(container, probe["httpGet"]["port"]) == METRICS_PORT
    service_ports = {
        entry["port"]: _port_number(container, entry["targetPort"])
        for entry in service["spec"]["ports"]
    }
    assert service_ports == {PGPROXY_PORT: PGPROXY_PORT, METRICS_PORT: METRICS_PORT}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)

    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_k8s_pod_runs_as_the_images_user_on_a_read_only_root():
    objects = k8s_documents()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = _container(objects)
    _, runtime = dockerfile()
    image_uid = int(runtime.last("USER").args.strip().partition(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # --workers keeps its Unix sockets in a temporary directory: /tmp must be writable.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def _config_toml(objects: dict[str, Yaml], tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """The ConfigMap's TOML written where the pod would see it (under tmp_path)."""
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = _container(objects)
    config_map = objects["ConfigMap"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    config_path = env["PGPROXY_CONFIG"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    directory, _, key = config_path.rpartition("/")
    assert mounts[volume["name"]] == directory, config_path
    text = config_map["data"][key]
    path = tmp_path / key
    path.write_text(text)
    return path, tomllib.loads(text)


def _secret_env(objects: dict[str, Yaml]) -> dict[str, str]:
    container = _container(objects)
    secret = objects["Secret"]
    refs = [source["secretRef"]["name"] for source in container.get("envFrom", [])]
    assert refs == [secret["metadata"]["name"]]
    assert "data" not in secret  # stringData only: readable, base64 added by the API server
    return dict(secret["stringData"])


def test_k8s_config_map_and_secret_load_as_pgproxy_settings(tmp_path):
    objects = k8s_documents()
    config_path, table = _config_toml(objects, tmp_path)
    for name in table:
        assert name in Settings.model_fields, f"{name}: no such setting"
    _, runtime = dockerfile()
    image_env = pgproxy_env(runtime.env())
    # The image's environment wins over the file: a key it sets would be silently ignored.
    overridden = {setting_of(variable) for variable in image_env} & set(table)
    assert not overridden, f"set by the image's ENV, ignored in the file: {overridden}"
    secret_env = _secret_env(objects)
    for variable in secret_env:
        setting_of(variable)

    settings = load_settings(config_file=config_path, environ={**image_env, **secret_env})
    assert settings.server.host == table["server"].rsplit(":", 1)[0]
    assert settings.users, "the Secret names no user"
    for user in settings.users:
        # pg_authid's secrets, not passwords; and well-formed enough to log in with.
        assert user.password_kind is PasswordKind.SCRAM_SHA_256, user.name
        parse_scram_secret(user.password)

    # Stopping: the preStop hook starts the drain (SIGTERM to PID 1, tini) and waits for the
    # container to end, so the kubelet's own SIGTERM cannot come as a second, cutting signal;
    # load balancers get shutdown_grace_period to stop sending new clients, then at most
    # shutdown_timeout of draining, all within terminationGracePeriodSeconds.
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    command = _container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["/bin/sh", "-c"], command
    script = command[2]
    assert script.startswith("kill -TERM 1;") and "while kill -0 1" in script, script
    image_entrypoint = dockerfile()[1].last("ENTRYPOINT").exec_form
    assert image_entrypoint is not None and image_entrypoint[0] == "tini"  # PID 1 forwards it
    assert settings.shutdown_grace_period >= 5, "no time for the endpoints"
    grace = pod["terminationGracePeriodSeconds"]
    stopping = settings.shutdown_grace_period + settings.shutdown_timeout
    assert grace > stopping, (grace, stopping)
