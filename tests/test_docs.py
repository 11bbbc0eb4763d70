"""The documentation site builds with ``mkdocs build --strict`` and no warning: a broken link between pages, a link
to a results file that moved, or an API-reference entry naming a function that was renamed fails here. The site goes
to a temporary folder; ``mkdocs`` comes with the ``docs`` extra (``pip install ".[docs]"``, as ``.ci/run`` does)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import REPO


def build(root, site) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of the ``mkdocs.yml`` in ``root`` into ``site``, in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(root))
    try:
        import mkdocs  # noqa: F401
    except ImportError as error:  # not a skip: CI installs the extra, and a missing build is a failure
        raise AssertionError('mkdocs is missing: pip install ".[docs]"') from error
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_docs_build_strict_without_warnings(tmp_path):
    done = build(REPO, tmp_path / "site")
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{log[-4000:]}"
    assert "WARNING" not in log, log
    assert (tmp_path / "site" / "reference" / "index.html").is_file()
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert "fit_router" in reference and "ScaleConfig" in reference  # generated from the docstrings
    # a results file a page links to is in the site, next to the pages
    assert (tmp_path / "site" / "_repo" / "benchmarks" / "results" / "architecture_coverage.json").is_file()


def test_a_renamed_function_or_a_moved_results_file_breaks_the_build(tmp_path):
    """The same build on a copy of the docs with one broken reference each: both must fail."""
    for broken, expected in [
        ("::: peft_scale.fit_router_renamed\n", "fit_router_renamed"),
        ("[results](../benchmarks/results/no_such_file.json)\n", "no_such_file.json"),
    ]:
        root = tmp_path / expected
        shutil.copytree(REPO / "docs", root / "docs")
        shutil.copy(REPO / "mkdocs.yml", root / "mkdocs.yml")
        shutil.copytree(REPO / "peft_scale", root / "peft_scale")
        shutil.copytree(REPO / "benchmarks" / "results", root / "benchmarks" / "results")
        for folder in ("tests", "examples"):  # linked from the pages
            shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
        with open(root / "docs" / "reference.md", "a") as page:
            page.write("\n" + broken)
        done = build(root, tmp_path / f"site_{expected}")
        assert done.returncode != 0 and expected in done.stdout + done.stderr, done.stdout + done.stderr
