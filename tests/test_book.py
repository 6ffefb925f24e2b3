"""The book build (book/build.py): toc handling, parameter filtering, failures, offline HTML.

The browser test builds a one-chapter book (a formula and an ipywidgets slider) through the same
code path as ``make book``, serves it on 127.0.0.1 and loads it in headless Chromium driven over
the DevTools protocol (``--remote-debugging-pipe``, no extra package). It asserts that the page
requests nothing from a non-local host, that every local request succeeds, that MathJax typeset
the formulas and that the widget manager rendered the slider. Chromium also gets
``--host-resolver-rules`` that send every other host nowhere, so the test can never reach the
network even if the book regresses.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml
from chromium import CHROMIUM, CHROMIUM_FLAGS, DevTools, assert_offline, serve
from conftest import load_book_build

REPO = Path(__file__).resolve().parents[1]


# Every test here that starts a Jupyter kernel runs on one xdist worker ("kernels" group, with
# `--dist loadgroup`): two kernels launched at once by two workers once left a chapter waiting
# forever for a reply (seen in `make test`), which a per-cell timeout now also bounds.
pytestmark = pytest.mark.xdist_group("kernels")

build = load_book_build()

HEADER = """\
---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
"""

TINY_CHAPTER = (
    HEADER
    + """
# A tiny chapter

The energy is $E = m c^2$ and

$$
\\frac{\\partial \\mathcal{L}}{\\partial \\theta_f} = \\sum_{k=1}^{K} \\alpha_k .
$$

```{code-cell} ipython3
:tags: [parameters]

profile = "default"
device = "auto"
```

```{code-cell} ipython3
import ipywidgets as widgets

print(f"profile={profile} device={device}")
widgets.IntSlider(value=3, min=0, max=10, description="K")
```
"""
)


def _write_book(root: Path, chapters: dict[str, str]) -> None:
    """A book root with the repository's _config.yml and the extension it names, a toc and
    the given chapters."""
    (root / "book").mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "_config.yml", root / "_config.yml")
    shutil.copytree(REPO / "book" / "_ext", root / "book" / "_ext", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "book" / "intro.md").write_text("# Tiny book\n\nInline $a^2 + b^2 = c^2$.\n")
    toc = {
        "format": "jb-book",
        "root": "book/intro",
        "chapters": [{"file": f"book/{name}"} for name in chapters],
    }
    (root / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    for name, text in chapters.items():
        if text is not None:
            (root / "book" / f"{name}.md").write_text(text)


# --------------------------------------------------------------------------------------------
# Fast tests
# --------------------------------------------------------------------------------------------


def test_repository_toc_lists_the_chapters_in_order():
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    assert build.toc_docnames(toc) == [
        "book/intro",
        "book/01_data",
        "book/02_fusion_leader",
        "book/03_segmentation_follower",
        "book/04_bilevel_training",
        "book/05_fusion_benchmarks",
        "book/06_results",
        "book/07_at_scale",
        "book/appendix_fusion_metrics",
        "book/records",
        "book/api",
    ]
    intro = REPO / "book" / "intro.md"
    assert intro.is_file() and not build.is_notebook_markdown(intro)


def test_repository_config_renders_offline():
    config = yaml.safe_load((REPO / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    sphinx = config["sphinx"]["config"]
    assert sphinx["html_static_path"] == ["_vendor"]
    scripts = [sphinx["mathjax_path"], *sphinx["nb_ipywidgets_js"]]
    scripts += [v for attrs in sphinx["nb_ipywidgets_js"].values() for v in attrs.values()]
    assert not [s for s in scripts if "://" in s], "a script would load from a remote host"
    vendored = {target for _, target in build.VENDOR_FILES}
    assert sphinx["mathjax_path"] in vendored
    assert "requirejs/require.js" in sphinx["nb_ipywidgets_js"]
    assert "html-manager/embed-amd.js" in sphinx["nb_ipywidgets_js"]


def test_prune_toc_drops_missing_entries_and_empty_parts():
    toc = {
        "format": "jb-book",
        "root": "intro",
        "parts": [
            {"caption": "A", "chapters": [{"file": "a1"}, {"file": "a2"}]},
            {"caption": "B", "chapters": [{"file": "b1", "sections": [{"file": "b1s"}]}]},
        ],
    }
    assert build.toc_docnames(toc) == ["intro", "a1", "a2", "b1", "b1s"]
    assert build.prune_toc(toc, {"intro", "a2", "b1s"}) == {
        "format": "jb-book",
        "root": "intro",
        "parts": [{"caption": "A", "chapters": [{"file": "a2"}]}],
    }
    assert build.prune_toc(toc, {"intro", "b1"})["parts"] == [
        {"caption": "B", "chapters": [{"file": "b1"}]}
    ]
    link = {"url": "https://example.org", "title": "elsewhere"}
    assert build.prune_toc({"root": "intro", "chapters": [link]}, {"intro"}) == {
        "root": "intro",
        "chapters": [link],
    }


def test_resolve_docname_accepts_short_names():
    names = ["book/intro", "book/01_data", "other/01_data", "book/02_x"]
    assert build.resolve_docname("book/02_x.md", names) == "book/02_x"
    assert build.resolve_docname("02_x", names) == "book/02_x"
    with pytest.raises(build.BuildError, match="not one entry"):
        build.resolve_docname("01_data", names)  # ambiguous
    with pytest.raises(build.BuildError, match="not one entry"):
        build.resolve_docname("99", names)


def test_find_chapters_separates_notebooks_pages_and_missing(tmp_path):
    _write_book(tmp_path, {"01_tiny": TINY_CHAPTER, "02_missing": None, "03_page": "# Page\n"})
    toc = yaml.safe_load((tmp_path / "_toc.yml").read_text())
    present, missing = build.find_chapters(tmp_path, toc)
    assert [(c.docname, c.is_notebook) for c in present] == [
        ("book/intro", False),
        ("book/01_tiny", True),
        ("book/03_page", False),
    ]
    assert missing == ["book/02_missing"]


def test_select_parameters_passes_only_declared_names(tmp_path):
    chapter = tmp_path / "c.md"
    chapter.write_text(
        HEADER
        + """
```{code-cell} ipython3
:tags: [parameters]

profile = "default"
data_dir = "_data/phantom"
device = "auto"
overrides = {}
```

```{code-cell} ipython3
print(profile)
```
"""
    )
    notebook = tmp_path / "c.ipynb"
    build.markdown_to_ipynb(chapter, notebook)
    declared = build.declared_parameters(notebook)
    assert declared == ["profile", "data_dir", "device", "overrides"]
    available = {
        "profile": "smoke",
        "data_dir": "/data/phantom",
        "brats_dir": None,
        "harvard_dir": "/data/harvard",
        "device": "cpu",
        "runs_dir": "/runs",
    }
    assert build.select_parameters(declared, available) == {
        "profile": "smoke",
        "data_dir": "/data/phantom",
        "device": "cpu",
    }
    assert build.select_parameters([], available) == {}


def test_clear_stale_runs_removes_only_runs_of_other_code(tmp_path, monkeypatch):
    monkeypatch.setattr("fuse4seg.utils.code_digest", lambda n=12: "this-code")
    runs = tmp_path / "runs"
    for name, record in {
        "current": {"code": "this-code"},
        "old-a": {"code": "other-code"},
        "old-b": {"code": "older-code", "finished": {"epochs": 3}},
        "unrecorded": {"method": "average"},  # no digest yet: the trainer's to judge
    }.items():
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "checkpoints" / "last.pt").write_bytes(b"x")
        (runs / name / "run.json").write_text(json.dumps(record))
    (runs / "no-record").mkdir()
    (runs / "notes.txt").write_text("a file, not a run")
    assert build.clear_stale_runs(runs) == ["old-a", "old-b"]
    assert sorted(p.name for p in runs.iterdir()) == [
        "current", "no-record", "notes.txt", "unrecorded"
    ]
    assert build.clear_stale_runs(runs) == []
    assert build.clear_stale_runs(tmp_path / "missing") == []


def test_chapter_path_is_relative_inside_the_root(tmp_path):
    assert build.chapter_path(tmp_path / "_data" / "phantom", tmp_path) == "_data/phantom"
    assert build.chapter_path(tmp_path, tmp_path) == "."
    outside = tmp_path.parent / "elsewhere"
    assert build.chapter_path(outside, tmp_path) == str(outside.resolve())


def test_phantom_cases_by_profile():
    assert build.phantom_cases("smoke") < build.phantom_cases("default")
    with pytest.raises(ValueError, match="--profile 'tiny'"):
        build.phantom_cases("tiny")


def test_book_seeds_per_profile_and_as_given():
    from fuse4seg.book import BOOK_SEEDS, book_seeds
    from fuse4seg.config import PROFILES

    assert set(BOOK_SEEDS) == set(PROFILES)  # a new profile must say how many seeds it trains
    assert book_seeds("default") == [0, 1, 2]  # three runs per method where they take minutes
    assert book_seeds("smoke") == [0] and book_seeds("paper") == [0]
    assert book_seeds("smoke", (4, 2)) == [4, 2]  # the reader's seeds win, in their order
    with pytest.raises(ValueError, match="profile 'tiny'"):
        book_seeds("tiny")
    with pytest.raises(ValueError, match="distinct seeds"):
        book_seeds("default", [1, 1])
    with pytest.raises(ValueError, match="distinct seeds"):
        book_seeds("default", [])


def test_chapter_6_reads_a_seed_override_as_its_one_seed():
    """Chapter 6 trains one run per seed of ``seeds``, each run with its own ``train.seed``,
    so an ``overrides`` seed was replaced without a word (helper review)."""
    from fuse4seg.book import book_seeds_of
    from fuse4seg.config import get_config

    plain = get_config("default")
    assert book_seeds_of(plain, None, {}) == [0, 1, 2]
    assert book_seeds_of(plain, [3, 4], {}) == [3, 4]
    for name in ("seed", "train.seed"):
        config = get_config("default", {name: 5})
        assert book_seeds_of(config, None, {name: 5}) == [5]
        assert book_seeds_of(config, [5], {name: 5}) == [5]
        with pytest.raises(ValueError, match=r"seeds=\[0, 1\] and overrides train.seed=5 "
                           "disagree: this chapter trains one run per seed of `seeds`"):
            book_seeds_of(config, [0, 1], {name: 5})


def test_a_chapter_runs_on_its_device_parameter_or_the_device_override():
    """Chapters 2, 3, 5 and 7 ran on their ``device`` parameter and recorded a
    ``train.device`` override they ignored; chapter 4 honoured it only with ``device="auto"``
    (helper review). Now every chapter runs where both agree, and refuses them disagreeing."""
    from fuse4seg.book import chapter_device
    from fuse4seg.config import get_config

    plain, cpu = get_config("smoke"), get_config("smoke", {"train.device": "cpu"})
    assert chapter_device("auto", plain) == "auto" and chapter_device("cuda", plain) == "cuda"
    assert chapter_device("auto", cpu) == "cpu" and chapter_device("cpu", cpu) == "cpu"
    with pytest.raises(ValueError, match="device='cuda' and overrides train.device='cpu' "
                       "disagree: give one"):
        chapter_device("cuda", cpu)


def test_chapters_4_and_6_train_their_runs_alike(monkeypatch):
    """chapter_workers: on a CPU ``workers`` runs at once (0: one per core), so chapter 4's runs,
    which chapter 6 reuses, train on the thread count of chapter 6's own (a review found them
    on two threads beside one-thread rivals); on a GPU one; a bad count, or a device training
    would refuse, is refused."""
    import torch

    from fuse4seg.book import chapter_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert chapter_workers(0, "cpu") == 6 and chapter_workers(0, "auto") == 6
    assert chapter_workers(2, "cpu") == 2 and chapter_workers(1, "auto") == 1
    with pytest.raises(ValueError, match="'cuda' requested but CUDA is not available"):
        chapter_workers(0, "cuda")
    with pytest.raises(ValueError, match="'gpu': not a device"):
        chapter_workers(0, "gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert chapter_workers(0, "auto") == 1 and chapter_workers(4, "cpu") == 4
    assert chapter_workers(0, "cuda") == 1 and chapter_workers(3, "cuda:1") == 1
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"workers=.*: give a whole number >= 0"):
            chapter_workers(bad, "cpu")
    # both chapters declare the parameter and train through it
    for chapter in ("04_bilevel_training.md", "06_results.md"):
        text = (REPO / "book" / chapter).read_text()
        assert "\nworkers = 0  # runs trained at once on a CPU" in text, chapter
        assert "chapter_workers(workers, device)" in text, chapter
        assert "train_seeds(" not in text, chapter


def test_prepare_phantom_writes_keeps_and_rewrites(tmp_path, monkeypatch):
    from fuse4seg.data import phantom

    calls, used = [], []

    def fake_writer(out, cases, seed, workers=1):  # the real one takes seconds per case
        assert workers >= 1
        calls.append((cases, seed))
        used.append(workers)
        for i in range(cases):
            (Path(out) / f"Phantom_{i:05d}").mkdir(parents=True)

    monkeypatch.setattr(phantom, "write_phantom_dataset", fake_writer)
    data = tmp_path / "_data" / "phantom"
    assert build.prepare_phantom(data, cases=3) == "written"
    assert build.phantom_case_count(data) == 3
    assert build.prepare_phantom(data, cases=3) == "kept"
    assert build.prepare_phantom(data, cases=2, workers=2) == "rewritten"
    assert used == [1, 2]  # the workers reach the writer
    assert sorted(p.name for p in data.iterdir()) == ["Phantom_00000", "Phantom_00001"]
    assert calls == [(3, 0), (2, 0)]
    assert sorted(p.name for p in data.parent.iterdir()) == ["phantom"]  # no leftovers

    own = tmp_path / "own"
    (own / "BraTS2021_00001").mkdir(parents=True)
    assert build.phantom_case_count(own) is None
    assert build.prepare_phantom(own, cases=2) == "foreign"
    assert calls == [(3, 0), (2, 0)]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        build.prepare_phantom(tmp_path / "file", cases=2)


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(build.BuildError, match="`npm` is not on PATH"):
        build.ensure_node_modules(tmp_path)


def test_concurrent_builds_run_npm_ci_once(tmp_path, monkeypatch):
    """Two builds that find node_modules/ missing: one installs, the other waits and reuses it."""
    calls, running, overlaps = [], [], []

    def fake_npm_ci(repo):
        overlaps.append(bool(running))
        running.append(1)
        time.sleep(0.3)
        for source, _ in build.VENDOR_FILES:
            target = repo / "node_modules" / source
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("// stub")
        calls.append(repo)
        running.pop()

    monkeypatch.setattr(build, "_npm_ci", fake_npm_ci)
    found, errors = [], []  # a thread's exception is otherwise only printed

    def one_build():
        try:
            found.append(build.ensure_node_modules(tmp_path))
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=one_build) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and found == [tmp_path / "node_modules"] * 2  # both builds get it
    assert calls == [tmp_path]
    assert overlaps == [False]


def test_kernel_tests_share_one_worker(request):
    """`make test` runs the kernel-starting tests on one xdist worker (`--dist loadgroup`).

    pytest 9.2 with pytest-xdist 3.8 silently dropped the group (xdist renames the node id, which
    pytest 9.2 no longer reads), so two workers ran `npm ci` in one folder at once and CI failed.
    Under xdist without ``--dist loadgroup`` (a review found ``make test-fast`` so) it fails,
    where it used to skip; in one process (plain ``pytest``) nothing runs at once, so it skips.
    """
    if not hasattr(request.config, "workerinput"):
        pytest.skip("one process (no xdist worker): nothing runs at once")
    loadgroup = request.config.getoption("dist", "no") == "loadgroup" or getattr(
        request.config.option, "loadgroup", False)
    assert loadgroup, "xdist without --dist loadgroup: the kernel tests' group is not kept"
    assert request.node.nodeid.endswith("@kernels"), request.node.nodeid


def test_copy_vendor_reports_a_missing_npm_file(tmp_path):
    with pytest.raises(build.BuildError, match="npm ci"):
        build.copy_vendor(tmp_path / "node_modules", tmp_path / "vendor")


def test_main_rejects_bad_input(tmp_path, capsys):
    _write_book(tmp_path, {"01_tiny": TINY_CHAPTER})
    assert build.main(["--root", str(tmp_path), "--only", "book/99_nope", "--no-html"]) == 1
    assert "book/99_nope" in capsys.readouterr().err
    assert build.main(["--root", str(tmp_path), "--brats-dir", str(tmp_path / "x")]) == 1
    assert "--brats-dir" in capsys.readouterr().err
    assert build.main(["--root", str(tmp_path), "--profile", "fast"]) == 1
    assert "--profile 'fast'" in capsys.readouterr().err
    (tmp_path / "_toc.yml").unlink()
    assert build.main(["--root", str(tmp_path)]) == 1
    assert "_toc.yml is missing" in capsys.readouterr().err


def test_stage_source_replaces_notebooks_by_their_executed_copy(tmp_path):
    root = tmp_path / "root"
    _write_book(root, {"01_tiny": TINY_CHAPTER})
    (root / "book" / "figure.png").write_bytes(b"png")
    (root / "book" / "__pycache__").mkdir()
    executed = tmp_path / "01_tiny.ipynb"
    executed.write_text("{}")
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    present, _ = build.find_chapters(root, toc)
    staging = tmp_path / "src"
    build.stage_source(
        root, staging, toc, [c for c in present if not c.is_notebook], {"book/01_tiny": executed}
    )
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    assert files == [
        "_config.yml",
        "_toc.yml",
        "book/01_tiny.ipynb",
        "book/_ext/prose_attributes.py",
        "book/_ext/unique_scripts.py",
        "book/figure.png",
        "book/intro.md",
    ]
    # a local extension that _config.yml names must be there
    shutil.rmtree(root / "book" / "_ext")
    with pytest.raises(build.BuildError, match="local extension 'prose_attributes' is not in"):
        build.stage_source(root, staging, toc, [], {})


def test_stage_source_copies_what_a_page_includes(tmp_path):
    root = tmp_path / "root"
    _write_book(root, {"01_tiny": TINY_CHAPTER})
    (root / "notes").mkdir()
    (root / "notes" / "log.md").write_text("# Log\n\nmeasured 1.5 s\n")
    page = root / "book" / "records.md"
    page.write_text("# Records\n\n```{include} ../notes/log.md\n:heading-offset: 1\n```\n")
    assert build.included_files(page) == [(root / "notes" / "log.md").resolve()]
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    toc["chapters"].append({"file": "book/records"})
    present, _ = build.find_chapters(root, toc)
    staging = tmp_path / "src"
    build.stage_source(root, staging, toc, [c for c in present if not c.is_notebook], {})
    assert (staging / "notes" / "log.md").read_text() == "# Log\n\nmeasured 1.5 s\n"
    page.write_text("```{include} ../notes/missing.md\n```\n")
    with pytest.raises(build.BuildError, match="records.md: includes ../notes/missing.md"):
        build.included_files(page)


def test_prepare_only_injects_the_parameters_and_runs_nothing(tmp_path):
    """`make test`'s nbval input: parameterised chapters, absolute folders, no outputs."""
    chapter = TINY_CHAPTER.replace('device = "auto"\n', 'device = "auto"\nruns_dir = "runs"\n')
    _write_book(tmp_path, {"01_tiny": chapter})
    out = tmp_path / "out"
    argv = ["--root", str(tmp_path), "--profile", "smoke", "--device", "cpu", "--out", str(out)]
    assert build.main([*argv, "--prepare-only"]) == 0
    notebook = json.loads((out / "prepared" / "book" / "01_tiny.ipynb").read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code[1]["metadata"]["tags"] == ["injected-parameters"]
    assert "".join(code[1]["source"]).splitlines() == [
        "# Parameters",
        'profile = "smoke"',
        'device = "cpu"',
        f'runs_dir = "{(out / "runs").resolve()}"',
    ]
    assert not any(cell["outputs"] for cell in code)
    assert sorted(p.name for p in out.iterdir()) == ["prepared"]


def test_a_commit_made_while_the_chapters_run_is_reported(tmp_path, monkeypatch, capsys):
    """The chapters print the commit they ran at; a review found one build's pages at two
    commits (a commit made mid-build). build.py logs the commit at the start and warns when
    it is not the same at the end."""
    import fuse4seg.utils

    _write_book(tmp_path, {"01_tiny": TINY_CHAPTER})
    argv = ["--root", str(tmp_path), "--profile", "smoke", "--device", "cpu", "--out",
            str(tmp_path / "out"), "--prepare-only"]
    commits = iter(["aaa", "bbb-dirty"])
    monkeypatch.setattr(fuse4seg.utils, "git_commit", lambda cwd=None: next(commits))
    assert build.main(argv) == 0
    out = capsys.readouterr().out
    assert "checkout at commit aaa" in out
    assert ("WARNING: the checkout changed while the chapters ran (commit aaa at the start, "
            "bbb-dirty at the end)") in out
    monkeypatch.setattr(fuse4seg.utils, "git_commit", lambda cwd=None: "ccc")
    assert build.main(argv) == 0
    out = capsys.readouterr().out
    assert "checkout at commit ccc" in out and "WARNING" not in out


def test_set_passes_overrides_to_the_chapters_that_declare_them(tmp_path):
    """``--set NAME=VALUE`` becomes the ``overrides`` parameter (values parsed as YAML) of a
    chapter that declares it; a chapter that does not declare it gets none."""
    declares = TINY_CHAPTER.replace('device = "auto"\n', 'device = "auto"\noverrides = {}\n')
    _write_book(tmp_path, {"01_tiny": declares, "02_plain": TINY_CHAPTER})
    out = tmp_path / "out"
    argv = ["--root", str(tmp_path), "--profile", "smoke", "--device", "cpu", "--out", str(out),
            "--prepare-only", "--set", "train.rollout_epochs=2", "--set",
            "model.fusion=fuse4seg_paper"]
    assert build.main(argv) == 0

    def injected(name: str) -> list[str]:
        notebook = json.loads((out / "prepared" / "book" / f"{name}.ipynb").read_text())
        cells = [c for c in notebook["cells"] if "injected-parameters" in
                 c["metadata"].get("tags", [])]
        return "".join(cells[0]["source"]).splitlines()

    assert injected("01_tiny")[-1] == (
        'overrides = {"train.rollout_epochs": 2, "model.fusion": "fuse4seg_paper"}'
    )
    assert not any(line.startswith("overrides") for line in injected("02_plain"))


def test_set_refuses_an_unknown_setting_before_any_chapter(tmp_path, capsys):
    _write_book(tmp_path, {"01_tiny": TINY_CHAPTER})
    out = tmp_path / "out"
    base = ["--root", str(tmp_path), "--profile", "smoke", "--out", str(out), "--no-html"]
    assert build.main([*base, "--set", "train.nope=1"]) == 1
    assert "unknown setting 'train.nope'" in capsys.readouterr().err
    assert build.main([*base, "--set", "train.rollout_epochs"]) == 1
    assert "--set expects NAME=VALUE" in capsys.readouterr().err
    assert build.main([*base, "--set", "train.rollout_epochs=-3"]) == 1
    assert "epochs must be >= 0" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_a_failing_chapter_stops_the_build_with_its_name(tmp_path, capsys):
    broken = HEADER + '\n```{code-cell} ipython3\nraise RuntimeError("boom 42")\n```\n'
    _write_book(tmp_path, {"01_broken": broken})
    status = build.main(["--root", str(tmp_path), "--profile", "smoke", "--no-html"])
    err = capsys.readouterr().err
    assert status == 1
    assert "book/01_broken" in err and "RuntimeError: boom 42" in err
    assert (tmp_path / "_build" / "executed" / "book" / "01_broken.ipynb").is_file()


@pytest.mark.slow
def test_chapter_kernels_talk_over_private_unix_sockets(tmp_path, capfd):
    probe = HEADER + (
        "\n```{code-cell} ipython3\nfrom ipykernel.kernelapp import IPKernelApp\n"
        "print(IPKernelApp.instance().transport)\n```\n"
    )
    _write_book(tmp_path, {"01_probe": probe})
    status = build.main(["--root", str(tmp_path), "--profile", "smoke", "--no-html"])
    err = capfd.readouterr().err
    assert status == 0, err
    executed = tmp_path / "_build" / "executed" / "book" / "01_probe.ipynb"
    outputs = [o for c in json.loads(executed.read_text())["cells"] for o in c.get("outputs", [])]
    assert ["".join(o["text"]) for o in outputs if o.get("name") == "stdout"] == ["ipc\n"]
    assert "without encryption" not in err  # ipykernel's warning for TCP


def test_kernel_config_falls_back_to_tcp_where_a_socket_path_is_too_long(tmp_path):
    config = build.kernel_config(tmp_path)
    if os.name != "posix":
        assert config is None
        return
    assert config.KernelManager.transport == "ipc"
    assert config.KernelManager.connection_file == str(tmp_path / "kernel.json")
    assert build.kernel_config(tmp_path / ("x" * build.UNIX_SOCKET_PATH_MAX)) is None


def test_cell_timeout_defaults_by_profile():
    assert build.cell_timeout("smoke", None) == 900
    assert build.cell_timeout("default", None) == 3600
    assert build.cell_timeout("paper", None) is None  # hours of training in one cell
    assert build.cell_timeout("smoke", 0) is None and build.cell_timeout("paper", 60) == 60
    with pytest.raises(build.BuildError, match="--timeout -1"):
        build.cell_timeout("smoke", -1)


@pytest.mark.slow
def test_a_cell_past_the_limit_fails_the_build_with_its_name(tmp_path, capsys):
    stuck = HEADER + "\n```{code-cell} ipython3\nimport time\ntime.sleep(60)\n```\n"
    _write_book(tmp_path, {"01_stuck": stuck})
    started = time.perf_counter()
    status = build.main(["--root", str(tmp_path), "--profile", "smoke", "--no-html",
                         "--timeout", "3"])
    err = capsys.readouterr().err
    assert status == 1 and time.perf_counter() - started < 50
    assert "book/01_stuck" in err and "per-cell limit of 3 s" in err


# --------------------------------------------------------------------------------------------
# Headless Chromium over the DevTools protocol (pipe transport)
# --------------------------------------------------------------------------------------------


PAGE_STATE_JS = """JSON.stringify({
  ready: document.readyState,
  math: document.querySelectorAll("mjx-container").length,
  rawMath: document.querySelectorAll(".math:not(:has(mjx-container))").length,
  sliders: document.querySelectorAll(".widget-hslider").length,
  sliderText: Array.from(document.querySelectorAll(".widget-hslider")).map(e => e.innerText),
})"""


def _load_page(url: str, tmp: Path, expect_math: int, expect_sliders: int) -> tuple[dict, list]:
    """Load ``url`` and wait until the math and widgets are rendered (or 60 s pass)."""
    tmp.mkdir(parents=True, exist_ok=True)
    browser = DevTools(
        [*CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}"], tmp / "chromium.log"
    )
    try:
        session = browser.page_session()
        browser.send("Page.navigate", {"url": url}, session=session)
        state: dict = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            result = browser.send(
                "Runtime.evaluate",
                {"expression": PAGE_STATE_JS, "returnByValue": True},
                session=session,
            )
            state = json.loads(result["result"]["value"])
            if (
                state["ready"] == "complete"
                and state["math"] >= expect_math
                and state["sliders"] >= expect_sliders
            ):
                time.sleep(1.0)  # let late requests (fonts) start, so they are recorded
                break
            time.sleep(0.25)
        events = []
        while not browser.events.empty():
            events.append(browser.events.get())
        return state, events
    finally:
        browser.close()


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory) -> Path:
    """A one-chapter book built by book/build.py (papermill, staging, jupyter-book)."""
    if not (REPO / "node_modules").is_dir() and shutil.which("npm") is None:
        pytest.skip("node_modules/ is absent and npm is not installed (needed for MathJax)")
    root = tmp_path_factory.mktemp("tinybook")
    _write_book(root, {"01_tiny": TINY_CHAPTER, "02_not_written_yet": None})
    status = build.main(["--root", str(root), "--profile", "smoke", "--device", "cpu"])
    assert status == 0, "book/build.py failed on the tiny book"
    return root / "_build" / "html"


@pytest.mark.slow
def test_tiny_book_build_layout(tiny_site):
    chapter = tiny_site / "book" / "01_tiny.html"
    assert chapter.is_file() and (tiny_site / "index.html").is_file()
    assert not (tiny_site / "book" / "02_not_written_yet.html").exists()
    html = chapter.read_text()
    assert "profile=smoke device=cpu" in html  # the parameters reached the chapter
    assert "application/vnd.jupyter.widget-state+json" in html
    for script in ("mathjax/tex-chtml-full.js", "requirejs/require.js",
                   "html-manager/embed-amd.js"):
        assert f'src="../_static/{script}' in html, script  # the bundled copy, no CDN
    assert "cdn.jsdelivr.net" not in html and "cdnjs.cloudflare.com" not in html
    assert (tiny_site / "_static" / "mathjax" / "output" / "chtml" / "fonts").is_dir()


@pytest.mark.slow
@pytest.mark.browser
def test_tiny_book_renders_offline_in_chromium(tiny_site, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium); .ci/run installs it")
    server = serve(tiny_site)
    host, port = server.server_address[:2]
    try:
        chapter_url = f"http://{host}:{port}/book/01_tiny.html"
        chapter, chapter_events = _load_page(
            chapter_url, tmp_path / "chapter", expect_math=2, expect_sliders=1
        )
        intro_url = f"http://{host}:{port}/book/intro.html"
        intro, intro_events = _load_page(
            intro_url, tmp_path / "intro", expect_math=1, expect_sliders=0
        )
    finally:
        server.shutdown()
        server.server_close()

    requested = assert_offline(chapter_url, chapter_events)
    assert any("/_static/mathjax/output/chtml/fonts/" in u for u in requested)
    assert_offline(intro_url, intro_events)

    # MathJax typeset the inline and the display formula (and left none raw).
    assert chapter["math"] >= 2 and chapter["rawMath"] == 0, chapter
    assert intro["math"] == 1 and intro["rawMath"] == 0, intro
    # The widget manager rendered the slider from the saved widget state (value 3).
    assert chapter["sliders"] == 1, chapter
    assert "K" in chapter["sliderText"][0] and "3" in chapter["sliderText"][0], chapter


def test_parameter_cells_are_collapsed_and_the_injected_one_labelled(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("profile = 'default'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("profile = 'smoke'", metadata={"tags": ["injected-parameters"]}),
        nbformat.v4.new_code_cell("print(profile)"),
    ]
    path = tmp_path / "ch.ipynb"
    nbformat.write(nb, path)
    build.collapse_parameter_cells(path)
    out = nbformat.read(path, as_version=4)
    assert [c.cell_type for c in out.cells] == ["code", "markdown", "code", "code"]
    assert "hide-input" in out.cells[0].metadata["tags"]
    assert "hide-input" in out.cells[2].metadata["tags"]
    assert "injected by papermill" in out.cells[1].source
    assert "hide-input" not in out.cells[3].metadata.get("tags", [])


def test_each_page_gets_each_script_once():
    """book/_ext/unique_scripts.py: Jupyter Book's setup adds two inline scripts twice, once
    with the file name None and once with "" (a review found ``const THEBE_JS_URL`` declared
    twice on every page: a SyntaxError). The first of each is kept, in order; scripts that
    differ in file or attributes all stay."""
    import importlib.util

    from sphinx.builders.html._assets import _JavaScript

    path = REPO / "book" / "_ext" / "unique_scripts.py"
    spec = importlib.util.spec_from_file_location("unique_scripts", path)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    config = yaml.safe_load((REPO / "_config.yml").read_text())
    assert config["sphinx"]["local_extensions"]["unique_scripts"] == "book/_ext"
    thebe = "const THEBE_JS_URL = 'x'"
    scripts = [_JavaScript("_static/a.js"), _JavaScript(None, body=thebe),
               _JavaScript("_static/b.js", **{"async": "async"}), _JavaScript("", body=thebe),
               _JavaScript(None, body="var other = 1"), _JavaScript("_static/a.js", priority=900)]
    context = {"script_files": scripts}
    ext.drop_repeated_scripts(None, "page", "page.html", context, None)
    assert [(s.filename, s.attributes) for s in context["script_files"]] == [
        ("_static/a.js", {}), (None, {"body": thebe}), ("_static/b.js", {"async": "async"}),
        (None, {"body": "var other = 1"})]
    empty: dict = {}
    ext.drop_repeated_scripts(None, "page", "page.html", empty, None)
    assert empty == {}


def test_an_attribute_docstring_of_prose_keeps_its_first_line():
    """book/_ext/prose_attributes.py: napoleon would read "fractions (ours: the paper ...)" as
    the type "fractions (ours"; such a docstring comes out as written, while a Google-style
    inline type (``numpy.ndarray: ...``) is left to napoleon. Checked with napoleon itself."""
    import importlib.util

    from sphinx.ext.napoleon import Config as NapoleonConfig
    from sphinx.ext.napoleon.docstring import GoogleDocstring

    path = Path(__file__).resolve().parents[1] / "book" / "_ext" / "prose_attributes.py"
    spec = importlib.util.spec_from_file_location("prose_attributes", path)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    config = yaml.safe_load((path.parents[2] / "_config.yml").read_text())
    assert config["sphinx"]["local_extensions"]["prose_attributes"] == "book/_ext"

    def rendered(doc: list[str], name: str) -> list[str]:
        lines = list(doc)
        ext.note_prose(None, "attribute", name, None, {}, lines)
        lines[:] = GoogleDocstring(lines, NapoleonConfig(), what="attribute", name=name).lines()
        ext.restore_prose(None, "attribute", name, None, {}, lines)
        return lines

    prose = ["Patient-level train / validation / test fractions (ours: the paper gives no "
             "split)."]
    assert rendered(prose, "a.b") == prose
    assert not any(":type:" in line for line in rendered(prose, "a.c"))
    typed = rendered(["numpy.ndarray: the image, (H, W)."], "a.d")
    assert ":type: numpy.ndarray" in typed and "the image, (H, W)." in typed[0]
    # a colon inside code is not the prose's: ``None``'s first line reads as a type
    assert ext._type_like("``None``") and not ext._type_like("fractions (ours")
    assert ext._type_like("str | None") and ext._type_like("(extra, span)")


def test_run_hours_adds_each_stage_of_each_run_by_hand():
    """run_hours (chapter 7's GPU hours of make full): S steps per epoch of every stage, at the
    measured warm-up and outer steps; a fixed rule's rollout step as K warm-up steps; the
    disjoint fusion stage as an outer step; the frozen leader's forward where its x_f do not
    fit the cache; full = the fuse4seg run; A and B without the shared warm-up; every
    estimate named."""
    from fuse4seg.book import run_hours
    from fuse4seg.config import get_config

    paper = get_config("paper")  # B 8, K 5, warm-up 40, rollout 120 epochs, 240x240
    t = paper.train
    assert (t.batch_size, t.inner_steps, t.warmup_epochs, t.rollout_epochs) == (8, 5, 40, 120)
    methods = ["average", "disjoint_ae", "direct2ch", "fuse4seg"]
    rows = run_hours(paper, 80, 1.0, 10.0, methods, ["baseline", "A", "B", "full"])
    hours = {r["run"]: r["hours"] * 3600 for r in rows}  # seconds; S = 80 / 8 = 10
    assert hours == pytest.approx({
        "fuse4seg": 40 * 10 * 1 + 120 * 10 * 10,
        "average": 40 * 10 * 1 + 120 * 10 * 5 * 1,
        "direct2ch": 40 * 10 * 1 + 120 * 10 * 5 * 1,
        "disjoint_ae": 120 * 10 * 10 + 40 * 10 * 1 + 120 * 10 * 5,
        "baseline": 120 * 10 * 10 + 40 * 10 * 1 + 120 * 10 * 5,
        "A": 120 * 10 * 10, "B": 120 * 10 * 10,
    })
    by_run = {r["run"]: r for r in rows}
    assert by_run["fuse4seg"]["estimates"] == [] == by_run["A"]["estimates"]
    assert by_run["average"]["estimates"] == ["a rollout step as K warm-up steps"]
    assert by_run["disjoint_ae"]["estimates"] == ["a fusion step as an outer step",
                                                  "a rollout step as K warm-up steps"]
    assert by_run["direct2ch"]["estimates"][0].startswith("its follower (convnext, 2 chan")
    assert by_run["A"]["stages"] == [("rollout", 120)] and by_run["A"]["steps"] == 1200
    # without fuse4seg among the methods, full trains the warm-up and A reuses it
    alone = {r["run"]: r for r in run_hours(paper, 80, 1.0, 10.0, [], ["full", "A"])}
    assert alone["full"]["stages"] == [("warmup", 40), ("rollout", 120)]
    assert alone["A"]["stages"] == [("rollout", 120)]
    # two GPUs halve S (an epoch is a pass over the slices in batches of B per GPU)
    two = run_hours(paper, 80, 1.0, 10.0, ["fuse4seg"], world=2)[0]
    assert two["hours"] * 3600 == pytest.approx(40 * 5 + 120 * 5 * 10)
    # ... and under torchrun no run shares a warm-up (train() shares in one process only),
    # nor does a plan without a rollout
    torchrun = run_hours(paper, 80, 1.0, 10.0, ["fuse4seg"], ["A"], world=2)
    assert torchrun[1]["stages"] == [("warmup", 40), ("rollout", 120)]
    no_rollout = get_config("paper", {"train.rollout_epochs": 0})
    assert run_hours(no_rollout, 80, 1.0, 10.0, ["fuse4seg"], ["A"])[1]["stages"] == [
        ("warmup", 40)]
    # 100,000 slices of 240x240 x_f (23 GB) do not fit the frozen leader's 1 GiB cache: the
    # disjoint runs fuse every step, one forward on B slices per warm-up step, on B/2 per
    # rollout step; the other methods do not care
    with pytest.raises(ValueError, match="do not fit the frozen leader's cache"):
        run_hours(paper, 100_000, 1.0, 10.0, ["disjoint_ae"])
    big = {r["run"]: r for r in run_hours(paper, 100_000, 1.0, 10.0, ["disjoint_ae",
                                          "average"], t_leader_forward=2.0)}
    S = 12_500
    assert big["disjoint_ae"]["hours"] * 3600 == pytest.approx(
        S * (120 * 10 + 40 * (1 + 2) + 120 * (5 * 1 + 1)))
    assert "the frozen leader's forward every step" in big["disjoint_ae"]["estimates"]
    assert big["average"]["hours"] * 3600 == pytest.approx(S * (40 + 120 * 5))
    for bad in ({"n_slices": 0}, {"t_warm": 0.0}, {"t_leader_forward": -1.0}):
        args = {"n_slices": 80, "t_warm": 1.0, "t_outer": 10.0, **bad}
        with pytest.raises(ValueError, match="each must be positive"):
            run_hours(paper, methods=["fuse4seg"], **args)
