"""Build the fuse4seg book: run every chapter with papermill, then render it offline.

``make book`` runs this script. The steps, each printed with the elapsed seconds:

1. **Chapters.** Read the table of contents (``_toc.yml``). Each entry ``book/NN_name`` whose
   source ``book/NN_name.md`` is a MyST Markdown notebook (its front matter has a
   ``kernelspec``) is a *chapter*; other Markdown files (``book/intro.md``) are plain pages.
   Entries whose file does not exist yet are skipped with a warning (chapters are written while
   the book grows) and left out of the staged table of contents.
2. **Data.** When a chapter declares ``data_dir`` and no ``--brats-dir`` is given, the phantom
   (``fuse4seg.data.phantom.write_phantom_dataset``, seed 0) is written to ``--data-dir``
   (default ``_data/phantom``) unless it is already there with the number of cases of the
   profile (:data:`PHANTOM_CASES`); see :func:`prepare_phantom`.
3. **Execution.** Each chapter is converted with jupytext and executed with papermill (working
   directory: the book's root, so the chapters' relative default paths work). A chapter gets
   only the parameters its ``parameters`` cell declares (:func:`select_parameters`), because
   papermill merely *warns* about an unknown parameter (run by hand, the chapter's own check,
   ``fuse4seg.book.check_parameters``, refuses it). The first chapter that fails stops the
   build with its name and the error (exit status 1); the executed notebook with the traceback
   stays in ``_build/executed/``.
4. **Staging.** The executed notebooks, the plain pages, ``_config.yml`` and the (pruned)
   ``_toc.yml`` are copied to ``_build/src/``, and the JavaScript the pages need (MathJax 3,
   RequireJS, the ipywidgets HTML manager; see :data:`VENDOR_FILES`) is copied from
   ``node_modules/`` to ``_build/src/_vendor/``, which ``_config.yml`` names in
   ``html_static_path``. ``npm ci`` runs first when ``node_modules/`` is missing.
5. **HTML.** ``jupyter-book build`` runs on the staging tree with execution off
   (``_config.yml``); the site is moved to ``_build/html/`` and needs no network to render.

Parameters passed to chapters (each only if its parameters cell declares it): ``profile``,
``data_dir`` (the phantom, or ``--brats-dir`` when given), ``brats_dir``, ``harvard_dir``,
``gfp_dir`` (``None`` unless given), ``device``, ``runs_dir`` (``_build/runs``),
``cache_dir`` (``_build/cache``), and ``overrides`` when ``--set NAME=VALUE`` is given (checked
against the profile before any chapter runs). Folders inside the book's root are passed
relative to it (the kernel's working folder), others as absolute paths (:func:`chapter_path`).

With ``--prepare-only`` step 3 stops after the parameters are injected (papermill's
``prepare_only``): the parameterised notebooks are written to ``<out>/prepared/`` for another
runner, with every folder passed as an absolute path (the runner's working folder may differ).
``make test`` runs them once with nbval (``pytest --nbval-lax``), so every cell of every chapter
is checked to run in the ``smoke`` profile through this script's conversion and parameters.

Usage::

    python book/build.py --profile smoke
    python book/build.py --profile paper --brats-dir /data/BraTS2021 --device cuda
    python book/build.py --only book/01_data --no-html      # run one chapter, no HTML
    python book/build.py --device cuda --set model.fusion=fuse4seg_paper --set \
        train.rollout_epochs=2                              # config overrides for every chapter
    python book/build.py --profile smoke --prepare-only --out _build/nbval   # for nbval

The intro chapter of the book (``book/intro.md``) says how to read and run the book.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# the venv's package (make book installs it first): the phantom sizes the chapters use too
from fuse4seg.book import (  # noqa: F401  (re-exported for the tests)
    PHANTOM_CASES,
    PHANTOM_SEED,
    phantom_case_count,
    phantom_cases,
    prepare_phantom,
)

REPO = Path(__file__).resolve().parents[1]


VENDOR_FILES: tuple[tuple[str, str], ...] = (
    # (source under node_modules/, destination under _vendor/) -- a folder is copied whole.
    ("mathjax/es5/tex-chtml-full.js", "mathjax/tex-chtml-full.js"),
    # MathJax loads its CommonHTML fonts relative to the script: [mathjax]/output/chtml/fonts.
    ("mathjax/es5/output/chtml/fonts/woff-v2", "mathjax/output/chtml/fonts/woff-v2"),
    ("requirejs/require.js", "requirejs/require.js"),
    ("@jupyter-widgets/html-manager/dist/embed-amd.js", "html-manager/embed-amd.js"),
)
"""What the rendered pages load, copied from ``node_modules/`` (npm, ``package.json``)."""

# The widget manager's CSS refers to Font Awesome files beside embed-amd.js (webpack assets).
HTML_MANAGER_ASSET_SUFFIXES = (".woff2", ".woff", ".ttf", ".eot", ".svg")

WIDGET_PATHS_JS = """\
// Written by book/build.py; loaded (see _config.yml, nb_ipywidgets_js) after require.js and
// before embed-amd.js. The widget bundles find their font files relative to their RequireJS
// module URL, which by default is resolved against the *page* (book/@jupyter-widgets/...):
// map the bundled module names onto this folder so the fonts load from _static/html-manager/.
(function () {
  var here = document.currentScript.src.split("?")[0].replace(/[^/]*$/, "");
  window.__jupyter_widgets_assets_path__ = here;
  window.requirejs.config({
    paths: {
      "@jupyter-widgets/html-manager/dist": here.slice(0, -1),
      "@jupyter-widgets/html-manager": here + "html-manager",
      "@jupyter-widgets/base": here + "base",
      "@jupyter-widgets/controls": here + "controls",
      "@jupyter-widgets/output": here + "output"
    }
  });
})();
"""
"""Contents of ``_vendor/html-manager/fuse4seg-paths.js`` (see the comment inside)."""


class BuildError(RuntimeError):
    """A step of the build failed; the message names the chapter or file and the cause."""


@dataclass(frozen=True)
class Chapter:
    """One table-of-contents entry that exists on disk.

    Attributes:
        docname: the toc name without suffix, e.g. ``"book/01_data"``.
        source: the Markdown file, ``<root>/<docname>.md``.
        is_notebook: ``True`` for a MyST Markdown notebook (executed), ``False`` for a page.
    """

    docname: str
    source: Path
    is_notebook: bool


# --------------------------------------------------------------------------------------------
# Table of contents and chapters
# --------------------------------------------------------------------------------------------


def toc_docnames(toc: Mapping[str, Any]) -> list[str]:
    """Every ``file`` of a Jupyter Book table of contents, root first, in reading order.

    Args:
        toc: the parsed ``_toc.yml`` (``root`` plus ``chapters`` / ``parts`` / ``sections``).

    Returns:
        Document names as written in the toc (no suffix), without duplicates.
    """
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    names.append(node[key])
            for key in ("parts", "chapters", "sections", "entries"):
                for child in node.get(key) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(toc)
    return list(dict.fromkeys(names))


def prune_toc(toc: Any, keep: set[str]) -> Any:
    """A copy of ``toc`` without the entries whose ``file`` is not in ``keep``.

    Entries with sub-entries keep the sub-entries that survive; an emptied list is removed.
    The root is kept as is (the caller checks that it exists).
    """
    if isinstance(toc, list):
        out = [prune_toc(item, keep) for item in toc]
        return [item for item in out if item is not None]
    if not isinstance(toc, Mapping):
        return toc
    if "file" in toc and toc["file"] not in keep:
        return None
    containers = ("parts", "chapters", "sections", "entries")
    out = {}
    for key, value in toc.items():
        if key in containers:
            value = prune_toc(value, keep)
            if not value:
                continue
        out[key] = value
    emptied = any(key in toc for key in containers) and not any(key in out for key in containers)
    if emptied and "file" not in out and "root" not in out:
        return None  # a part (or caption-only group) whose chapters are all missing
    return out


def resolve_docname(name: str, docnames: list[str]) -> str:
    """A toc entry from what a user typed: ``book/01_data``, ``book/01_data.md`` or ``01_data``.

    Raises:
        BuildError: no entry, or more than one, matches.
    """
    name = name.removesuffix(".md").removesuffix(".ipynb").strip("/")
    if name in docnames:
        return name
    matches = [d for d in docnames if d.rsplit("/", 1)[-1] == name]
    if len(matches) != 1:
        raise BuildError(f"--only {name!r}: not one entry of the toc {docnames}")
    return matches[0]


def is_notebook_markdown(path: Path) -> bool:
    """Whether a Markdown file is a jupytext/MyST notebook (front matter with ``kernelspec``)."""
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return False
    end = text.find("\n---", 3)
    if end < 0:
        return False
    try:
        header = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError as err:
        raise BuildError(f"{path}: the front matter is not valid YAML: {err}") from err
    return isinstance(header, Mapping) and "kernelspec" in header


def find_chapters(root: Path, toc: Mapping[str, Any]) -> tuple[list[Chapter], list[str]]:
    """Resolve the toc against the files under ``root``.

    Returns:
        ``(present, missing)``: the entries that exist as ``<root>/<docname>.md`` (in toc
        order) and the docnames that do not.
    """
    present, missing = [], []
    for docname in toc_docnames(toc):
        source = root / f"{docname}.md"
        if source.is_file():
            present.append(Chapter(docname, source, is_notebook_markdown(source)))
        else:
            missing.append(docname)
    return present, missing


# --------------------------------------------------------------------------------------------
# Parameters and execution
# --------------------------------------------------------------------------------------------


def declared_parameters(notebook: Path) -> list[str]:
    """Names assigned in the notebook's cell tagged ``parameters`` (papermill's inspection)."""
    import papermill

    return list(papermill.inspect_notebook(str(notebook)).keys())


def select_parameters(declared: Iterable[str], available: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters to pass to a chapter: those of ``available`` that it declares.

    Papermill injects every parameter it is given and only warns when the notebook does not
    declare one; passing each chapter only its own avoids both the warning and a silently
    unused value. Order follows ``available``.

    Args:
        declared: names in the chapter's ``parameters`` cell.
        available: everything the build can provide (listed in the module docstring).

    Returns:
        ``{name: value}`` for the names in both.
    """
    wanted = set(declared)
    return {name: value for name, value in available.items() if name in wanted}


def markdown_to_ipynb(source: Path, target: Path) -> None:
    """Convert a MyST Markdown notebook to ``.ipynb`` with jupytext (no outputs)."""
    import jupytext

    notebook = jupytext.read(source)
    notebook.metadata.setdefault(
        "kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"}
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    jupytext.write(notebook, target, fmt="ipynb")


UNIX_SOCKET_PATH_MAX = 100
"""Longest IPC socket path :func:`kernel_config` uses (Linux allows 107 bytes, macOS 103)."""


def kernel_config(folder: Path) -> Any:
    """The kernel manager's settings for a chapter's kernel: IPC sockets in ``folder``.

    jupyter_client talks to a kernel over TCP on localhost by default, unencrypted, and
    ipykernel warns about it on every start ("Kernel is running over TCP without
    encryption"). Unix-domain sockets in a private folder (``folder``, made by
    ``tempfile`` with mode 0700) carry the same messages without a port that another user of
    the machine can reach. Where they cannot work (Windows; a socket path longer than
    :data:`UNIX_SOCKET_PATH_MAX`, e.g. under a long ``TMPDIR``) this returns ``None``: TCP as
    before, warning included.
    """
    from traitlets.config import Config

    connection_file = Path(folder) / "kernel.json"
    longest_socket = f"{connection_file.with_suffix('')}-ipc-99999"
    if os.name != "posix" or len(os.fsencode(longest_socket)) > UNIX_SOCKET_PATH_MAX:
        return None
    return Config(
        {"KernelManager": {"transport": "ipc", "connection_file": str(connection_file)}}
    )


def execute_chapter(
    chapter: Chapter,
    executed: Path,
    available: Mapping[str, Any],
    cwd: Path,
    kernel_name: str = "python3",
    timeout: int | None = None,
    progress_bar: bool = False,
    prepare_only: bool = False,
) -> dict[str, Any]:
    """Convert a chapter with jupytext and execute it with papermill.

    Args:
        chapter: a notebook chapter (``chapter.is_notebook``).
        executed: where the executed ``.ipynb`` is written (also when a cell fails).
        available: every parameter the build provides; the chapter gets those it declares.
        cwd: the kernel's working directory.
        kernel_name: Jupyter kernel to run.
        timeout: per-cell limit in seconds (``None``: none).
        progress_bar: show papermill's per-cell progress bar.
        prepare_only: only inject the parameters (papermill's ``prepare_only``): ``executed``
            is then the parameterised notebook, not run.

    Returns:
        The parameters that were passed.

    Raises:
        BuildError: the chapter failed; the message names it, the cell and the error.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    with tempfile.TemporaryDirectory(prefix="fuse4seg-book-") as tmp:
        source_ipynb = Path(tmp) / f"{Path(chapter.docname).name}.ipynb"
        markdown_to_ipynb(chapter.source, source_ipynb)
        parameters = select_parameters(declared_parameters(source_ipynb), available)
        executed.parent.mkdir(parents=True, exist_ok=True)
        kernel = kernel_config(Path(tmp))  # None: TCP
        try:
            papermill.execute_notebook(
                str(source_ipynb),
                str(executed),
                parameters=parameters,
                kernel_name=kernel_name,
                cwd=str(cwd),
                progress_bar=progress_bar,
                log_output=False,
                execution_timeout=timeout,
                prepare_only=prepare_only,
                **({"config": kernel} if kernel is not None else {}),
            )
        except PapermillExecutionError as err:
            raise BuildError(
                f"chapter {chapter.docname} failed in cell {err.exec_count}: "
                f"{err.ename}: {err.evalue}\n  the executed notebook with the traceback: "
                f"{executed}"
            ) from err
        except Exception as err:  # kernel died, timeout, bad notebook, ...
            hint = (f" (a cell ran past the per-cell limit of {timeout} s; --timeout N sets it, "
                    "0 for none)" if "Timeout" in type(err).__name__ else "")
            raise BuildError(
                f"chapter {chapter.docname} failed: {type(err).__name__}: {err}{hint}"
            ) from err
    if not prepare_only:
        collapse_parameter_cells(executed)
    return parameters


def collapse_parameter_cells(notebook: Path) -> None:
    """Collapse the declared and the injected parameters cells of an executed chapter
    (``hide-input``: the reader sees a "Show code cell source" toggle, not two near-identical
    blocks of assignments); the injected one gets a Markdown label saying what it is."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        tags = cell.get("metadata", {}).setdefault("tags", [])
        if cell.cell_type == "code" and {"parameters", "injected-parameters"} & set(tags):
            if "hide-input" not in tags:
                tags.append("hide-input")
    for i, cell in enumerate(nb.cells):
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            label = nbformat.v4.new_markdown_cell(
                "*The parameters this build ran the chapter with (injected by papermill; "
                "they override the defaults above):*"
            )
            nb.cells.insert(i, label)
            break
    nbformat.write(nb, notebook)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


# PHANTOM_CASES, phantom_cases, phantom_case_count and prepare_phantom live in fuse4seg.book
# (the chapters use them too); imported above.


# --------------------------------------------------------------------------------------------
# Offline JavaScript (npm)
# --------------------------------------------------------------------------------------------


def ensure_node_modules(repo: Path = REPO) -> Path:
    """``node_modules/`` of ``repo``, installed with ``npm ci`` when it is missing.

    Raises:
        BuildError: npm is not installed, or ``npm ci`` failed.
    """
    node_modules = repo / "node_modules"
    # Two builds at once (two test workers, two terminals) must not both run `npm ci` in the
    # same folder: it deletes and rewrites node_modules/ and the two runs break each other
    # (seen in CI as ENOTEMPTY/ENOENT). One waits for the other, then finds the files there;
    # the check is made under the lock too, so no build reads files an install is writing.
    with _exclusive_lock(repo / ".npm-ci.lock"):
        if all((node_modules / source).exists() for source, _ in VENDOR_FILES):
            return node_modules
        _npm_ci(repo)
    return node_modules


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    """Hold an exclusive advisory lock on ``path`` (POSIX ``flock``).

    A no-op where there is no ``flock`` (Windows) or the lock file cannot be created (a
    read-only checkout): concurrent builds are then the user's call.
    """
    try:
        import fcntl

        handle = open(path, "a")  # noqa: SIM115 (closed below)
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _npm_ci(repo: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(
            "the book serves MathJax, RequireJS and the ipywidgets HTML manager itself and "
            f"installs them with npm from {repo / 'package-lock.json'}, but `npm` is not on "
            "PATH: install Node.js >= 18 with npm (e.g. `apt-get install nodejs npm`) and retry"
        )
    command = [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"]
    print(f"[book] {' '.join(command[1:])} in {repo}", flush=True)
    result = subprocess.run(command, cwd=repo)
    if result.returncode != 0:
        raise BuildError(f"`npm ci` failed in {repo} (exit status {result.returncode})")


BOOK_CSS = """\
/* fuse4seg: results tables with a column per method (chapter 06's per-case table has seven)
   or per score (Table 1: eight of "0.339" over "± 0.293") fit the article of a 1280-pixel
   window: tighter cells and a smaller font inside tables, a step smaller again for the
   ten-column Table 3 (measured in Chromium on the default book; tests/test_book_pages.py
   checks the smoke book's tables against their box). A table still wider than its box (a
   narrower window) scrolls sideways instead of being cut off. */
.bd-article table { font-size: 0.85rem; }
.bd-article table th, .bd-article table td { padding: 0.3rem 0.35rem; }
.bd-article table:has(th:nth-child(10)) { font-size: 0.8rem; }
.bd-article table code { overflow-wrap: anywhere; }  /* long run ids may break */
.bd-article .pst-scrollable-table-container { overflow-x: auto; }
/* Code at 12 px. In a 1280-pixel window a code cell then holds 86 characters (73 at the
   theme's 14 px) and a code block 88 (76), measured in Chromium; 86 is the chapters' line
   limit, so code does not scroll sideways (tests/test_chapters.py checks the limit). */
.bd-article pre { font-size: 0.75rem; }
/* Printed text (stdout, stderr) wraps at the cell's edge instead of scrolling: a sentence or
   a dict printed on one line stays readable. Code shown as code (IPython's Code) still
   scrolls, so a wrapped line is never mistaken for a new one. */
.bd-article div.cell_output .output.stream pre,
.bd-article div.cell_output .output.stderr pre { white-space: pre-wrap; overflow-wrap: anywhere; }
"""
"""Contents of ``_vendor/fuse4seg.css``, which ``_config.yml`` adds to every page
(``html_css_files``)."""


def copy_vendor(node_modules: Path, vendor: Path) -> list[Path]:
    """Copy :data:`VENDOR_FILES` (and the widget manager's font files) into ``vendor``.

    Returns:
        The files written.

    Raises:
        BuildError: a file is missing from ``node_modules`` (run ``npm ci``).
    """
    written: list[Path] = []
    for source_name, target_name in VENDOR_FILES:
        source, target = node_modules / source_name, vendor / target_name
        if not source.exists():
            raise BuildError(f"{source} is missing: run `npm ci` in {node_modules.parent}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
            written.extend(p for p in target.rglob("*") if p.is_file())
        else:
            shutil.copy2(source, target)
            written.append(target)
    dist = node_modules / "@jupyter-widgets/html-manager/dist"
    for asset in sorted(dist.iterdir()):
        if asset.suffix in HTML_MANAGER_ASSET_SUFFIXES:
            shutil.copy2(asset, vendor / "html-manager" / asset.name)
            written.append(vendor / "html-manager" / asset.name)
    paths_js = vendor / "html-manager" / "fuse4seg-paths.js"
    paths_js.write_text(WIDGET_PATHS_JS, encoding="utf-8")
    written.append(paths_js)
    css = vendor / "fuse4seg.css"
    css.write_text(BOOK_CSS, encoding="utf-8")
    written.append(css)
    return written


# --------------------------------------------------------------------------------------------
# Staging and HTML
# --------------------------------------------------------------------------------------------


INCLUDE = re.compile(r"^\s*```\{include\}\s+(\S+)\s*$", re.MULTILINE)
"""A MyST ``{include}`` directive's first line; its argument is a path relative to the page."""


def included_files(page: Path) -> list[Path]:
    """The files a plain page pulls in with ``{include}`` (staged beside it, at the same path
    relative to the book's root, so the directive finds them in the staging tree).

    Raises:
        BuildError: an included file is missing (named with the page).
    """
    found = []
    for target in INCLUDE.findall(Path(page).read_text("utf-8")):
        path = (Path(page).parent / target).resolve()
        if not path.is_file():
            raise BuildError(f"{page}: includes {target}, which does not exist ({path})")
        found.append(path)
    return found


def stage_source(
    root: Path,
    staging: Path,
    toc: Mapping[str, Any],
    pages: list[Chapter],
    notebooks: Mapping[str, Path],
) -> None:
    """Lay out the tree ``jupyter-book build`` reads, replacing ``staging``: ``_config.yml``
    and the local Sphinx extensions it names, the toc, the pages and the executed notebooks.

    Args:
        root: the book's root (``_config.yml`` lives there).
        staging: the staging folder (emptied first).
        toc: the pruned table of contents to write as ``_toc.yml``.
        pages: plain Markdown pages, copied as they are.
        notebooks: ``{docname: executed .ipynb}``.
    """
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    shutil.copy2(root / "_config.yml", staging / "_config.yml")
    (staging / "_toc.yml").write_text(yaml.safe_dump(dict(toc), sort_keys=False), "utf-8")
    # the Sphinx extensions of the book's own (sphinx.local_extensions: name -> folder)
    config = yaml.safe_load((root / "_config.yml").read_text("utf-8")) or {}
    for name, folder in ((config.get("sphinx") or {}).get("local_extensions") or {}).items():
        source = root / folder / f"{name}.py"
        if not source.is_file():
            raise BuildError(f"{root / '_config.yml'}: local extension {name!r} is not in "
                             f"{root / folder} ({name}.py missing)")
        (staging / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, staging / folder / f"{name}.py")
    # Everything beside the pages (figures, bibliography, _static) of each toc folder, minus
    # the Markdown notebooks (their executed .ipynb replaces them) and build artefacts.
    folders = sorted(
        {Path(page.docname).parent for page in pages} | {Path(name).parent for name in notebooks}
    )
    for folder in folders:
        if folder == Path("."):
            continue
        src = root / folder

        def ignore(directory: str, names: list[str]) -> set[str]:
            skip = set()
            for name in names:
                path = Path(directory) / name
                if name in ("__pycache__", ".ipynb_checkpoints", "build.py"):
                    skip.add(name)
                elif path.suffix == ".ipynb":
                    skip.add(name)
                elif path.suffix == ".md" and path.is_file() and is_notebook_markdown(path):
                    skip.add(name)
            return skip

        shutil.copytree(src, staging / folder, ignore=ignore, dirs_exist_ok=True)
    for page in pages:  # pages at the root, or anywhere the copy above did not reach
        target = staging / f"{page.docname}.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(page.source, target)
        for included in included_files(page.source):  # e.g. benchmarks/RESULTS.md
            if not included.is_relative_to(root.resolve()):
                raise BuildError(f"{page.source}: includes {included}, outside the book's "
                                 f"root {root}")
            rel = included.relative_to(root.resolve())
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(included, staging / rel)
    for docname, executed in notebooks.items():
        target = staging / f"{docname}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(executed, target)


def jupyter_book_command() -> list[str]:
    """The ``jupyter-book`` executable of this Python environment."""
    script = Path(sys.executable).parent / "jupyter-book"
    if script.is_file():
        return [str(script)]
    found = shutil.which("jupyter-book")
    if found is None:
        raise BuildError("jupyter-book is not installed: `pip install -e .[book]`")
    return [found]


def build_html(staging: Path, html: Path, strict: bool = False) -> None:
    """Run ``jupyter-book build`` on ``staging`` and move the site to ``html``.

    Raises:
        BuildError: jupyter-book failed (its output is shown above the message).
    """
    jb_out = staging.parent / "jupyter-book"
    if jb_out.exists():
        shutil.rmtree(jb_out)
    command = [
        *jupyter_book_command(),
        "build",
        str(staging),
        "--path-output",
        str(jb_out),
        "--all",
    ]
    if strict:
        command += ["-W", "--keep-going"]
    result = subprocess.run(command, cwd=staging)
    site = jb_out / "_build" / "html"
    if result.returncode != 0 or not (site / "index.html").is_file():
        raise BuildError(f"jupyter-book build failed (exit status {result.returncode})")
    if html.exists():
        shutil.rmtree(html)
    html.parent.mkdir(parents=True, exist_ok=True)
    os.replace(site, html)
    shutil.rmtree(jb_out)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="book/build.py",
        description="Execute the chapters of the fuse4seg book with papermill and build the "
        "HTML book (offline: MathJax and the widget manager are served locally).",
    )
    parser.add_argument("--profile", default="default", help="smoke | default | paper")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--brats-dir", type=Path, help="BraTS data; given, chapters use it instead of the phantom"
    )
    parser.add_argument("--harvard-dir", type=Path, help="Harvard fusion pairs (optional)")
    parser.add_argument("--gfp-dir", type=Path, help="GFP/PC fusion pairs (optional)")
    parser.add_argument(
        "--data-dir", type=Path, help="phantom folder (default <root>/_data/phantom)"
    )
    parser.add_argument(
        "--phantom-cases", type=int, help="phantom cases to write (default: by profile)"
    )
    parser.add_argument(
        "--root", type=Path, default=REPO, help="book root with _config.yml and _toc.yml"
    )
    parser.add_argument("--out", type=Path, help="build folder (default <root>/_build)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="DOCNAME",
        help="build only these toc entries (repeatable; e.g. book/01_data); the root page is "
        "always kept",
    )
    parser.add_argument("--no-html", action="store_true", help="execute chapters only")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="write the chapters with their parameters injected to <out>/prepared/ (absolute "
        "paths), execute nothing, no HTML (make test runs them with nbval)",
    )
    parser.add_argument("--strict", action="store_true", help="turn Sphinx warnings into errors")
    parser.add_argument(
        "--timeout", type=int, default=None,
        help="per-cell time limit in seconds (default: the profile's, CELL_TIMEOUT; 0 = none)",
    )
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
        help="a config override passed to every chapter as its `overrides` parameter "
        "(repeatable; as `fuse4seg train --set`), e.g. --set train.rollout_epochs=2",
    )
    return parser.parse_args(argv)


CELL_TIMEOUT = {"smoke": 900, "default": 3600, "paper": None}
"""Default per-cell limit (s) by profile. The longest cell of a smoke book takes about a minute
and of a default book about thirteen (chapter 06's training of 21 runs over three seeds: 12.7
min of wall time at 871c02d, ``benchmarks/RESULTS.md``, "Over three seeds"); a cell that runs
past the limit fails the build with the chapter's name instead of holding CI until its own
limit. The paper profile trains for hours in one cell: no limit. It does not bound every stall:
when chapter 01's slice viewer still printed into an ipywidgets Output widget, the cell
sometimes waited forever with the kernel idle, and nbclient's wait did not end at this limit
either (seen once, past 900 s); that stall was removed at its cause
(:func:`fuse4seg.widgets.slice_viewer`)."""


def cell_timeout(profile: str, given: int | None) -> int | None:
    """The per-cell limit: ``--timeout`` if given (0 = none), else the profile's."""
    if given is not None:
        if given < 0:
            raise BuildError(f"--timeout {given}: give seconds >= 0 (0 = no limit)")
        return given or None
    return CELL_TIMEOUT.get(profile)


def chapter_path(path: Path, root: Path) -> str:
    """How a folder is passed to a chapter: relative to ``root`` (the kernel's working folder)
    when it lies inside it, so the executed pages do not show the build machine's paths;
    absolute otherwise."""
    path, root = Path(path).resolve(), Path(root).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _check_dir(option: str, path: Path | None) -> Path | None:
    if path is None:
        return None
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise BuildError(f"{option} {path}: no such folder")
    return path


def clear_stale_runs(runs_dir: Path) -> list[str]:
    """Remove the run folders in ``runs_dir`` whose ``run.json`` records a code digest other
    than this package's (:func:`fuse4seg.utils.code_digest`), and return their names, sorted.

    The chapters would train such a run again anyway (``fuse4seg.train.runs.check_code``), and
    each would print the package's "trained by other fuse4seg code" notice into the page: build
    history, not something a reader of the book needs. A folder without a recorded digest is
    left to the trainer. Each folder goes through ``fuse4seg.train.runs.remove_run`` (renamed,
    then deleted), so an interruption leaves no half-deleted run under its name.
    """
    from fuse4seg.train.runs import read_run_json, remove_run
    from fuse4seg.utils import code_digest

    if not runs_dir.is_dir():
        return []
    digest, removed = code_digest(), []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        code = read_run_json(run_dir).get("code")
        if code and code != digest:
            remove_run(run_dir)
            removed.append(run_dir.name)
    return removed


def checkout_note(before: str, after: str) -> str | None:
    """A warning when the checkout's commit (:func:`fuse4seg.utils.git_commit`) was not the
    same at the end of the chapters as at the start: each chapter prints the commit it ran
    at, so the pages would show two (a review found chapters 01–02 at one commit and 03–07 at
    the next, from a commit made during a build). ``None`` when it did not change."""
    if before == after:
        return None
    return (f"WARNING: the checkout changed while the chapters ran (commit {before} at the "
            f"start, {after} at the end), so the pages show more than one commit; build "
            "again from a checkout that stays unchanged")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[book {time.perf_counter() - start:7.1f} s] {message}", flush=True)

    try:
        root = args.root.resolve()
        out = (args.out or root / "_build").resolve()
        for name in ("_config.yml", "_toc.yml"):
            if not (root / name).is_file():
                raise BuildError(f"{root / name} is missing")
        toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
        if not isinstance(toc, Mapping) or "root" not in toc:
            raise BuildError(f"{root / '_toc.yml'}: no `root` entry")
        from fuse4seg.config import PROFILES, get_config, parse_overrides

        if args.profile not in PROFILES:
            raise BuildError(f"--profile {args.profile!r}: choose one of {sorted(PROFILES)}")
        overrides = parse_overrides(args.settings)
        get_config(args.profile, overrides)  # an unknown name or bad value stops the build here
        cases = args.phantom_cases or phantom_cases(args.profile)
        timeout = cell_timeout(args.profile, args.timeout)
        if cases < 1:
            raise BuildError(f"--phantom-cases {cases}: must be >= 1")
        present, missing = find_chapters(root, toc)
        for docname in missing:
            print(f"WARNING: {docname}.md does not exist yet; skipped", file=sys.stderr)
        if toc["root"] in missing:
            raise BuildError(f"the root page {toc['root']}.md is missing")
        if args.only:
            only = {resolve_docname(name, toc_docnames(toc)) for name in args.only}
            present = [c for c in present if c.docname in only or c.docname == toc["root"]]
        notebooks = [c for c in present if c.is_notebook]
        pages = [c for c in present if not c.is_notebook]

        def place(path: Path | None) -> str | None:
            """A folder as the chapters get it (absolute for notebooks run elsewhere)."""
            if path is None:
                return None
            return str(path.resolve()) if args.prepare_only else chapter_path(path, root)

        brats_dir = place(_check_dir("--brats-dir", args.brats_dir))
        available: dict[str, Any] = {
            "profile": args.profile,
            "data_dir": brats_dir,
            "brats_dir": brats_dir,
            "harvard_dir": place(_check_dir("--harvard-dir", args.harvard_dir)),
            "gfp_dir": place(_check_dir("--gfp-dir", args.gfp_dir)),
            "device": args.device,
            "runs_dir": place(out / "runs"),
            "cache_dir": place(out / "cache"),
        }
        if overrides:  # else each chapter keeps its own default ({})
            available["overrides"] = overrides
        log(
            f"profile {args.profile}, {len(notebooks)} chapter(s) to run, {len(pages)} page(s), "
            f"{len(missing)} missing"
        )

        # Data: the phantom, only when a chapter reads data_dir and no BraTS folder is given.
        if brats_dir is None:
            data_dir = (args.data_dir or root / "_data" / "phantom").resolve()
            available["data_dir"] = place(data_dir)
            needs_data = False
            with tempfile.TemporaryDirectory(prefix="fuse4seg-book-") as tmp:
                for chapter in notebooks:
                    probe = Path(tmp) / f"{Path(chapter.docname).name}.ipynb"
                    markdown_to_ipynb(chapter.source, probe)
                    needs_data = needs_data or "data_dir" in declared_parameters(probe)
            if needs_data:
                # cases in parallel processes (one case is ~1 GB of work arrays at most)
                status = prepare_phantom(data_dir, cases, workers=min(4, os.cpu_count() or 1))
                if status == "foreign":
                    log(f"using the data in {data_dir} (not a phantom folder: left as it is)")
                elif status == "kept":
                    log(f"using the phantom in {data_dir} ({cases} cases)")
                else:
                    log(f"{status} the phantom ({cases} cases, seed {PHANTOM_SEED}) in {data_dir}")

        # Runs trained by other package code: gone before any chapter, which would train each
        # again anyway and print the package's notice about it into the page.
        if not args.prepare_only:
            stale = clear_stale_runs(out / "runs")
            if stale:
                log(f"removed {len(stale)} run(s) trained by other fuse4seg code from "
                    f"{out / 'runs'}: {', '.join(stale)}")

        # Chapters.
        from fuse4seg.utils import git_commit

        commit = git_commit(root)
        log(f"checkout at commit {commit}")
        executed: dict[str, Path] = {}
        folder = "prepared" if args.prepare_only else "executed"
        for index, chapter in enumerate(notebooks, 1):
            target = out / folder / f"{chapter.docname}.ipynb"
            chapter_start = time.perf_counter()
            log(f"[{index}/{len(notebooks)}] {chapter.docname} ...")
            passed = execute_chapter(
                chapter,
                target,
                available,
                cwd=root,
                kernel_name=args.kernel,
                timeout=timeout,
                progress_bar=sys.stderr.isatty(),
                prepare_only=args.prepare_only,
            )
            log(
                f"[{index}/{len(notebooks)}] {chapter.docname} "
                f"{'prepared' if args.prepare_only else 'done'} in "
                f"{time.perf_counter() - chapter_start:.1f} s (parameters: "
                f"{', '.join(passed) or 'none'})"
            )
            executed[chapter.docname] = target
        note = checkout_note(commit, git_commit(root))
        if note:
            log(note)

        if args.prepare_only:
            log(f"chapters prepared in {out / folder} (not run); --prepare-only: no HTML built")
            return 0
        if args.no_html:
            log("chapters done; --no-html: no HTML built")
            return 0

        # Staging tree + offline JavaScript + HTML.
        keep = {c.docname for c in present}
        staging = out / "src"
        stage_source(root, staging, prune_toc(toc, keep), pages, executed)
        node_modules = ensure_node_modules(REPO)
        copied = copy_vendor(node_modules, staging / "_vendor")
        log(f"staged {len(keep)} document(s) and {len(copied)} vendored file(s) in {staging}")
        build_html(staging, out / "html", strict=args.strict)
        log(f"HTML book: {out / 'html' / 'index.html'}")
        return 0
    except (BuildError, ValueError) as err:
        print(f"book/build.py: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
