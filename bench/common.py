"""Facts every benchmark result carries: the machine, and which code was measured.

The repository has no version stamp a benchmark could read while it is being edited, so each
result records a fingerprint of the pipeline's code (package, DAG, migrations). A benchmark
that starts several processes over many minutes can also run them all on a snapshot of that
code (`snapshot_code`), so an edit made meanwhile does not split one result between versions.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_GLOBS = ("include/blogqa/**/*.py", "include/blogqa/**/*.sql", "dags/*.py", "plugins/*.py")
CODE_DIRS = ("include", "dags", "plugins")  # what `blogqa run` and Airflow import and read


def code_fingerprint(root: Path = ROOT) -> str:
    """sha256 (12 hex digits) over the paths and contents of the pipeline's code files."""
    digest = hashlib.sha256()
    files = sorted({path for pattern in CODE_GLOBS for path in root.glob(pattern)})
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def snapshot_code(target: Path) -> Path:
    """Copy the package, DAG folder and migrations under `target`; returns the directory to
    put first on PYTHONPATH. The package finds its DAG folder and migrations relative to its
    own files, so processes importing it from there use the copies throughout."""
    for name in CODE_DIRS:
        shutil.copytree(
            ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    return target / "include"


def snapshot_commit(target: Path, rev: str) -> tuple[Path, str]:
    """Like `snapshot_code`, from a commit instead of the working tree: in a tree several
    people edit at once, the working tree can hold half-done changes of others, and a commit
    is a version that can be named. Returns (directory for PYTHONPATH, full commit hash)."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target.mkdir(parents=True, exist_ok=True)
    archive = target / "code.tar"
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), commit]
        + list(CODE_DIRS),
        check=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    archive.unlink()
    return target / "include", commit


def machine_facts() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]
