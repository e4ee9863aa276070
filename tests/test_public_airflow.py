"""Product code uses only Airflow's public Python interface (its "Public Interface of
Airflow" page): the Task SDK, providers, the plugin class, the auth-manager interface and
public exceptions. Anything else is an internal that a minor upgrade may move or change, so
an import of one fails here, naming the file and line, before it fails a deployment.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_CODE = ("include/blogqa", "dags", "plugins")

# module prefix -> why it is public
PUBLIC = {
    "airflow.sdk": "the Task SDK: the public interface for DAG authors and tasks",
    "airflow.providers": "providers' hooks and operators (e.g. PostgresHook, HITLOperator)",
    "airflow.plugins_manager": "AirflowPlugin, the documented base class of plugins",
    "airflow.exceptions": "public exceptions",
    "airflow.triggers.base": "BaseTrigger/TriggerEvent, the documented base of custom triggers",
    "airflow.api_fastapi.auth.managers.base_auth_manager": "BaseAuthManager, the public "
    "auth-manager interface",
    "airflow.api_fastapi.auth.managers.models.resource_details": "the resource types in "
    "BaseAuthManager's public method signatures (DagDetails for is_authorized_dag)",
    "airflow.api_fastapi.app": "get_auth_manager(), how the auth-manager docs reach the "
    "configured BaseAuthManager",
}


def _airflow_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] == "airflow"]


def _is_public(module: str) -> bool:
    return module == "airflow" or any(
        module == prefix or module.startswith(prefix + ".") for prefix in PUBLIC
    )


def test_product_code_imports_only_public_airflow_modules():
    files = sorted(p for folder in PRODUCT_CODE for p in (ROOT / folder).rglob("*.py"))
    assert len(files) > 20  # the scan sees the package, not an empty folder
    private = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in files
        if not path.is_symlink()  # the package's links to dags/ and plugins/ files
        for line, module in _airflow_imports(path)
        if not _is_public(module)
    ]
    assert private == [], "internal Airflow modules imported:\n" + "\n".join(private)


def test_the_scan_catches_an_internal_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from airflow.models.pool import Pool\n"
        "def f():\n    from airflow.utils import db\n"
        "from airflow.sdk import dag\n"
    )
    flagged = [m for _, m in _airflow_imports(sample) if not _is_public(m)]
    assert flagged == ["airflow.models.pool", "airflow.utils"]
