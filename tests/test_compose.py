"""The Docker deployment (Dockerfile, docker-compose.airflow.yml, .env.example), checked without
a Docker engine.

The compose file is validated against the Compose Specification by the pinned
`check-jsonschema` (offline, its vendored schema), and the validator is shown to reject broken
copies. The rest reads the file as compose would after interpolating a `.env` made from
`.env.example`, and checks what the schema cannot: health checks, the Celery executor, commands
the installed Airflow CLI knows, `blogqa init` in airflow-init, the results database reaching
every component as the Airflow connection `blogqa_db`, and that every variable is documented.
The processes themselves are tested without Docker in tests/test_airflow_*.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.airflow.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
REQUIREMENTS = ROOT / "requirements.txt"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"

# Services that run once and exit; every other service is long-running.
ONE_SHOT = {"airflow-init", "airflow-cli"}
# Airflow components and their command (the image's entrypoint runs `airflow <command>`).
AIRFLOW_COMMANDS = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "celery worker",
    "flower": "celery flower",
}
# Where blogqa code runs inside Airflow: tasks (scheduler, workers, triggerer), the DAG file
# (dag-processor), the plugin (api-server) and `blogqa init` (airflow-init).
BLOGQA_IN_AIRFLOW = sorted(set(AIRFLOW_COMMANDS) - {"flower"} | {"airflow-init"})
BLOGQA_SETTINGS = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "BLOGQA_CHAT_MODEL",
    "BLOGQA_EMBED_MODEL",
    "BLOGQA_EMBED_DIM",
    "BLOGQA_LLM_POOL_SLOTS",
    "BLOGQA_SCHEDULE",
)
SECRETS = (
    "FERNET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "BLOGQA_DB_PASSWORD",
    "_AIRFLOW_WWW_USER_PASSWORD",
)

# `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`, `${NAME?error}`; `$$` is a
# literal `$` (compose's escape, used in shell commands).
INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?])([^}]*))?\}")


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation of one value (the subset of the syntax used here)."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, colon, op, arg = match.groups()
        value = env.get(name)
        missing = value is None or (colon == ":" and value == "")
        if op == "-":
            return arg if missing else value
        if op == "?" and missing:
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    return INTERPOLATION.sub(substitute, text)


def strings(node) -> list[str]:
    """Every string value of a parsed compose file: what compose interpolates (after parsing
    the YAML, so comments are not read)."""
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return [node] if isinstance(node, str) else []


def resolve(node, env: dict[str, str]):
    """The parsed compose file with every string interpolated."""
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def raw_compose() -> dict:
    """The compose file as YAML, anchors and merges resolved, variables not interpolated."""
    return yaml.safe_load(COMPOSE.read_text())


def variables_read() -> set[str]:
    return {
        match.group(1)
        for value in strings(raw_compose())
        for match in INTERPOLATION.finditer(value)
        if match.group(1)
    }


def env_example() -> dict[str, str]:
    """Variables of .env.example (commented-out ones too), as compose's .env parser reads them."""
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^#?\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if match:
            found[match.group(1)] = match.group(2).strip().strip('"')
    return found


def fernet_key() -> str:
    """As .env.example says to make one."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    """A .env made from .env.example with its secrets filled in."""
    env = env_example()
    env.update(
        FERNET_KEY=fernet_key(),
        AIRFLOW__API_AUTH__JWT_SECRET="jwt-secret-for-tests",
        BLOGQA_DB_PASSWORD="Db_pass-word",
        _AIRFLOW_WWW_USER_PASSWORD="admin-password",
    )
    return env


@pytest.fixture(scope="module")
def compose(dotenv) -> dict:
    """The compose file as compose reads it with that .env (anchors and merges resolved)."""
    return resolve(raw_compose(), dotenv)


def environment(service: dict) -> dict[str, str]:
    """A service's environment as its containers get it (compose passes strings)."""
    env = service.get("environment") or {}
    assert isinstance(env, dict), "use the mapping form, so anchors can merge it"
    return {k: "" if v is None else str(v) for k, v in env.items()}


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---------------------------------------------------------------- schema validation


def test_compose_file_matches_the_compose_specification():
    result = validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout


def _healthcheck_yes(doc: dict) -> str:
    doc["services"]["redis"]["healthcheck"] = True  # `healthcheck: yes`
    return "$.services.redis.healthcheck"


def _unknown_key(doc: dict) -> str:
    worker = doc["services"]["airflow-worker"]
    worker["helthcheck"] = worker.pop("healthcheck")
    return "$.services['airflow-worker']: Unevaluated properties are not allowed ('helthcheck'"


def _unknown_condition(doc: dict) -> str:
    doc["services"]["airflow-scheduler"]["depends_on"]["airflow-init"]["condition"] = "completed"
    return "$.services['airflow-scheduler'].depends_on['airflow-init'].condition"


def _command_as_mapping(doc: dict) -> str:
    doc["services"]["airflow-triggerer"]["command"] = {"run": "triggerer"}
    return "$.services['airflow-triggerer'].command"


@pytest.mark.parametrize(
    "breakage", [_healthcheck_yes, _unknown_key, _unknown_condition, _command_as_mapping]
)
def test_validator_rejects_a_broken_copy(tmp_path, breakage):
    doc = raw_compose()  # uninterpolated, as the validator reads it
    control = tmp_path / "control.yml"
    control.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert validate(control).returncode == 0, "the re-dumped copy itself must be valid"

    where = breakage(doc)
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = validate(broken)
    assert result.returncode != 0, result.stdout
    assert where in result.stdout, result.stdout


# ---------------------------------------------------------------- services


def test_every_long_running_service_has_a_healthcheck(compose):
    services = compose["services"]
    assert ONE_SHOT <= set(services)
    for name, service in services.items():
        if name in ONE_SHOT:
            assert "restart" not in service, f"{name} runs once; restarting would loop it"
            continue
        check = service.get("healthcheck")
        assert isinstance(check, dict) and check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert service.get("restart") == "always", name


def test_airflow_services_run_airflow_commands(compose):
    services = compose["services"]
    image = services["airflow-scheduler"]["image"]
    runs_airflow = {
        name
        for name, s in services.items()
        if s.get("image") == image and "entrypoint" not in s and name not in ONE_SHOT
    }
    assert runs_airflow == set(AIRFLOW_COMMANDS)
    for name, command in AIRFLOW_COMMANDS.items():
        assert services[name]["command"] == command, name


def test_every_airflow_service_uses_the_celery_executor(compose):
    services = compose["services"]
    for name in [*AIRFLOW_COMMANDS, *ONE_SHOT]:
        env = environment(services[name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
        assert broker.scheme == "redis" and broker.hostname == "redis", name
        # results in the broker's Redis, apart from its messages (bench/README.md says why)
        results = urlsplit(env["AIRFLOW__CELERY__RESULT_BACKEND"])
        assert (results.scheme, results.hostname) == ("redis", "redis"), name
        assert results.path != broker.path, name
        assert urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).hostname == "postgres"
        # tasks talk to the api-server's execution API, at the port it listens on
        api = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
        assert (api.hostname, api.path) == ("airflow-apiserver", "/execution/"), name
        published = services["airflow-apiserver"]["ports"][0]
        assert str(api.port) == str(published).rsplit(":", 1)[-1]
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
    assert {"redis", "postgres"} <= set(services["airflow-worker"]["depends_on"])
    worker = services["airflow-worker"]
    # scalable with --scale: nothing that two replicas could not share
    assert "container_name" not in worker and "ports" not in worker
    assert environment(worker)["DUMB_INIT_SETSID"] == "0"  # warm shutdown of Celery


def test_airflow_init_migrates_then_runs_blogqa_init(compose):
    services = compose["services"]
    init = services["airflow-init"]
    assert init["entrypoint"] == "/bin/bash"
    assert environment(init)["_AIRFLOW_DB_MIGRATE"] == "true"
    lines = [line.strip() for line in init["command"][1].splitlines()]
    migrate = lines.index("/entrypoint airflow version")  # the entrypoint migrates first
    blogqa_init = lines.index("blogqa init")
    chown = next(i for i, line in enumerate(lines) if line.startswith("chown -R"))
    # set -e before the steps that matter: a failed `blogqa init` fails the service, so
    # nothing that depends on it starts
    assert lines.index("set -euo pipefail") < migrate < blogqa_init < chown
    assert init["depends_on"]["pgvector"]["condition"] == "service_healthy"
    for name, service in services.items():
        if name in AIRFLOW_COMMANDS or name == "blogqa-api":
            condition = service["depends_on"]["airflow-init"]["condition"]
            assert condition == "service_completed_successfully", name


def test_results_database_reaches_every_component(compose):
    services = compose["services"]
    pg = environment(services["pgvector"])
    expected = f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@pgvector:5432/"
    expected += pg["POSTGRES_DB"]
    for name in BLOGQA_IN_AIRFLOW:
        env = environment(services[name])
        assert env["AIRFLOW_CONN_BLOGQA_DB"] == expected, name
        assert "BLOGQA_DATABASE_URL" not in env, f"{name}: the Airflow connection is the source"
        assert set(BLOGQA_SETTINGS) <= set(env), name
        assert services[name]["depends_on"]["pgvector"]["condition"] == "service_healthy"
    api = environment(services["blogqa-api"])
    assert api["BLOGQA_DATABASE_URL"] == expected
    assert set(BLOGQA_SETTINGS) <= set(api)
    assert services["blogqa-api"]["profiles"] == ["api"]
    assert services["blogqa-api"]["command"][:2] == ["blogqa", "serve"]


def test_only_logs_and_named_volumes_are_mounted(compose):
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert source in declared, f"{name} mounts {source} from the host"
            assert target not in ("/opt/airflow/dags", "/opt/airflow/plugins"), name


# ---------------------------------------------------------------- against the installed Airflow

AIRFLOW_PROBE = r"""
import importlib, json, sys
from airflow.cli import cli_parser
from airflow.configuration import conf
from airflow.models.connection import Connection

args = json.loads(sys.argv[1])
parser = cli_parser.get_parser()
for command in args["commands"]:
    try:
        parser.parse_args(command)
    except SystemExit:
        sys.exit(f"not an Airflow command: airflow {' '.join(command)}")
conn = Connection(conn_id="blogqa_db", uri=args["conn_uri"])
print(json.dumps({
    "auth_manager": conf.getimport("core", "auth_manager").__name__,
    "conn": [conn.conn_type, conn.host, conn.port, conn.login, conn.password, conn.schema],
}))
"""


def _airflow_env(compose: dict, tmp_path: Path) -> dict[str, str]:
    """The worker's environment, with a scratch AIRFLOW_HOME instead of the image's."""
    env = environment(compose["services"]["airflow-worker"])
    env.update(PATH=os.environ["PATH"], HOME=str(tmp_path), AIRFLOW_HOME=str(tmp_path))
    return env


def test_commands_and_settings_work_with_the_installed_airflow(compose, dotenv, tmp_path):
    """Service commands and health-check commands parse with Airflow's own CLI (the celery
    group exists only under the CeleryExecutor), the auth manager class imports, and Airflow
    reads the `blogqa_db` connection URI as the postgres connection the tasks use."""
    services = compose["services"]
    commands = [command.split() for command in AIRFLOW_COMMANDS.values()]
    for service in services.values():
        for part in service.get("healthcheck", {}).get("test", [])[1:]:
            for match in re.finditer(r"\bairflow (jobs check .+)", part):
                commands.append(match.group(1).replace('"${HOSTNAME}"', "host").split())
    assert len(commands) == len(AIRFLOW_COMMANDS) + 2  # + dag-processor and triggerer checks
    worker_env = environment(services["airflow-worker"])
    result = _python(
        AIRFLOW_PROBE,
        json.dumps({"commands": commands, "conn_uri": worker_env["AIRFLOW_CONN_BLOGQA_DB"]}),
        env=_airflow_env(compose, tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["auth_manager"] == "SimpleAuthManager"
    password = dotenv["BLOGQA_DB_PASSWORD"]
    assert probe["conn"] == ["postgres", "pgvector", 5432, "blogqa", password, "blogqa"]


def _python(code: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -c CODE ARGS` in Airflow's environment as the compose file sets it."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_worker_healthcheck_celery_app_loads(compose, tmp_path):
    test = compose["services"]["airflow-worker"]["healthcheck"]["test"][1]
    app_path = re.search(r"celery --app (\S+) inspect ping", test).group(1)
    module, _, attr = app_path.rpartition(".")
    code = f"import importlib; print(type(getattr(importlib.import_module({module!r}), {attr!r})))"
    result = _python(code, env=_airflow_env(compose, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "celery.app.base.Celery" in result.stdout


# ---------------------------------------------------------------- .env.example


def test_every_variable_the_compose_file_reads_is_documented():
    for value in strings(raw_compose()):
        # only the braced form, so INTERPOLATION sees every variable read
        assert not re.search(r"\$[A-Za-z_]", value.replace("$$", "")), f"use ${{NAME}}: {value}"
    read = variables_read()
    documented = env_example()
    assert read - set(documented) == set(), "read by the compose file, not in .env.example"
    assert set(documented) - read == set(), "in .env.example, never read by the compose file"
    # every variable line has a comment above it in its paragraph
    commented = False
    for line in ENV_EXAMPLE.read_text().splitlines():
        if not line.strip():
            commented = False
        elif line.startswith("#") and not re.match(r"^#\s*[A-Za-z_]\w*=", line):
            commented = True
        elif re.match(r"^[A-Za-z_]\w*=", line):
            assert commented, f"{line.split('=')[0]} has no comment"


def test_secrets_have_no_defaults(dotenv):
    values = strings(raw_compose())
    example = env_example()
    for name in SECRETS:
        uses = [
            (match.group(2), match.group(3))
            for value in values
            for match in INTERPOLATION.finditer(value)
            if match.group(1) == name
        ]
        assert uses and set(uses) == {(":", "?")}, f"{name} must be required: ${{{name}:?...}}"
        assert example[name] == "", f"{name} must be generated, not shipped in .env.example"
        with pytest.raises(MissingVariable, match=name):  # compose refuses to start
            resolve(raw_compose(), {**dotenv, name: ""})


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_extends_the_pinned_airflow_image():
    dockerfile = DOCKERFILE.read_text()
    (tag,) = re.findall(r"^FROM\s+apache/airflow:(\S+)\s*$", dockerfile, re.MULTILINE)
    pinned = re.search(r"^apache-airflow==(\S+)$", REQUIREMENTS.read_text(), re.MULTILINE).group(1)
    match = re.fullmatch(r"(?:slim-)?(\d+\.\d+\.\d+)(?:-python(3\.\d+))?", tag)
    assert match and match.group(1) == pinned, f"FROM {tag} but requirements.txt pins {pinned}"
    assert match.group(2) in ("3.11", "3.12"), "requirements.txt is resolved for 3.11/3.12"

    steps = re.sub(r"\\\n\s*", " ", dockerfile)
    assert re.search(r"^USER airflow$", steps, re.MULTILINE)
    assert re.search(r"^RUN pip install .*-r /tmp/blogqa-requirements\.txt", steps, re.MULTILINE)
    assert re.search(
        r"^RUN .*pip install --no-cache-dir --no-deps .*\"\$src\"", steps, re.MULTILINE
    )
    assert "--editable" not in steps and " -e " not in steps
    assert re.search(r"^COPY .*dags/ /opt/airflow/dags/$", steps, re.MULTILINE)
    assert re.search(r"^COPY .*plugins/ /opt/airflow/plugins/$", steps, re.MULTILINE)

    ignored = set(DOCKERIGNORE.read_text().split())
    assert {".env", ".venv", ".git", ".blogqa", "**/__pycache__"} <= ignored
    assert "README.md" not in ignored and "include" not in ignored  # the build needs them
