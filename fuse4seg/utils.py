"""Small shared helpers: seeding, devices, atomic writes, run provenance."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "case_map",
    "atomic_write_bytes",
    "atomic_write_json",
    "DATA_FILES",
    "RUN_FOLDERS",
    "RUN_RECORDS",
    "check_not_an_input",
    "check_output_file",
    "check_output_folder",
    "missing_folders",
    "probe_writable",
    "remove_empty_folders",
    "atomic_write_text",
    "ENV_SWITCHES",
    "check_env_switches",
    "code_digest",
    "code_text",
    "env_setting",
    "env_switches",
    "environment_summary",
    "file_sha256",
    "git_commit",
    "resolve_device",
    "run_folder_of",
    "set_seed",
]


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; on CPU this makes a run bit-for-bit repeatable."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def resolve_device(name: str = "auto"):
    """``"auto"`` → CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


ENV_SWITCHES: dict[str, tuple[str, ...]] = {
    "FUSE4SEG_EAGER": ("0", "1"),  # 1: eager even where train.compile asks to compile
    "FUSE4SEG_MALLOC": ("system",),  # glibc's malloc defaults (engine.tune_malloc)
    "FUSE4SEG_ADAMW": ("loop",),  # torch's default AdamW on a CPU (engine.adamw)
    "FUSE4SEG_LEADER_LAYOUT": ("nchw",),  # the leader's weights NCHW on a CPU (place_leader)
    "FUSE4SEG_CONVNEXT": ("autograd",),  # the follower's blocks as autograd runs them (CPU)
    "FUSE4SEG_GATE": ("strided",),  # GELU on the leader's strided gate (GatedFeedForward, CPU)
    "FUSE4SEG_GRN_NORM": ("vector_norm",),  # torch.linalg.vector_norm in _FoldedMLP (CPU)
    "FUSE4SEG_ATTENTION": ("autograd",),  # the leader's attention as autograd runs it (CPU)
}
"""The environment variables that switch the package's speed measures off, and the values each
takes (unset or empty: the default)."""


def env_setting(name: str) -> str:
    """The switch ``name`` of :data:`ENV_SWITCHES`, stripped and lower-cased; ``""`` when it is
    unset or empty.

    A value the switch does not take raises ``ValueError`` naming the variable and the values
    it takes, so a misspelt switch (``FUSE4SEG_ADAMW=lop``) stops the run instead of leaving
    the default silently in force.
    """
    return _switch_value(name, os.environ.get(name, ""), "environment variable ")


def _switch_value(name: str, raw: str, where: str = "") -> str:
    """``raw`` as the switch ``name`` reads it (stripped, lower-cased), or a ``ValueError``
    that names ``where`` + the switch, the value and the values it takes."""
    allowed = ENV_SWITCHES[name]
    value = raw.strip().lower()
    if value and value not in allowed:
        raise ValueError(f"{where}{name}={raw!r}: expected one of {', '.join(allowed)}, "
                         f"or leave it unset")
    return value


@contextlib.contextmanager
def env_switches(settings: dict[str, str]):
    """Set switches of :data:`ENV_SWITCHES` inside a ``with`` block, and put each of them
    back as it was (set to its old value, or unset) on leaving it, even on an error. Other
    variables are left as the block leaves them: a folder a call inside sets for itself
    (``TORCHINDUCTOR_CACHE_DIR``, :func:`fuse4seg.train.engine.compile_net`) stays set.

    ``settings`` maps a switch to one of the values it takes (read as :func:`env_setting`
    reads it: case and surrounding spaces do not count), or to ``""`` to unset it (the
    default). An unknown name or value raises ``ValueError`` before anything is set. The
    benchmarks run the code before a CPU change this way (``FUSE4SEG_ATTENTION=autograd``);
    a switch read when a network or an optimiser is built must be set while it is built, one
    read at each call while the call runs.
    """
    wanted = {}
    for name, value in settings.items():
        if name not in ENV_SWITCHES:
            raise ValueError(f"{name}: not a fuse4seg switch (the switches: "
                             f"{', '.join(ENV_SWITCHES)})")
        wanted[name] = _switch_value(name, value)  # as env_setting reads it
    saved = {name: os.environ.get(name) for name in wanted}
    try:
        for name, value in wanted.items():
            if value:
                os.environ[name] = value
            else:
                os.environ.pop(name, None)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


OTHER_VARIABLES = ("FUSE4SEG_COMMIT", "FUSE4SEG_SHARED_DATA", "FUSE4SEG_SMOKE_BOOK")
"""``FUSE4SEG_*`` variables that are no switch of the package: the tests' and the GPU check's
(``tests/conftest.py``, ``benchmarks/gpu_check.sh``)."""

_WARNED_VARIABLES: set[str] = set()


def check_env_switches() -> None:
    """:func:`env_setting` of every switch: the training engine calls this before it builds
    anything, so a bad value fails at once, even for a switch read only later or only once per
    process. A ``FUSE4SEG_*`` variable that is neither a switch nor one of
    ``OTHER_VARIABLES`` (``FUSE4SEG_ADAM=loop``, a misspelt switch, which would leave the
    default in force) is warned about, once per process, with the closest switch."""
    import difflib
    import warnings

    for name in ENV_SWITCHES:
        env_setting(name)
    for name in sorted(os.environ):
        if (not name.startswith("FUSE4SEG_") or name in ENV_SWITCHES
                or name in OTHER_VARIABLES or name in _WARNED_VARIABLES):
            continue
        _WARNED_VARIABLES.add(name)
        close = difflib.get_close_matches(name, list(ENV_SWITCHES), n=1, cutoff=0.7)
        hint = f"did you mean {close[0]}? " if close else ""
        warnings.warn(f"environment variable {name}: no fuse4seg switch has this name, so it "
                      f"changes nothing ({hint}the switches: {', '.join(ENV_SWITCHES)})",
                      stacklevel=2)


def file_mode() -> int:
    """The mode a new file gets under this process's umask (``0o666 & ~umask``; ``mkstemp``
    makes 0600 files, which another user of a shared cache could not read)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_temp(path: Path, write) -> str:
    """A temporary file beside ``path`` holding what ``write(fh)`` writes, flushed to disk and
    with the usual mode; removed again if writing fails."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # name the file the user asked for, not a temporary one
        raise OSError(err.errno, f"cannot write there ({err.strerror})", str(path)) from err
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600 files; give the usual mode
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _keep_copy(path: Path) -> str:
    """A hidden copy of ``path`` beside it: a hard link (no bytes copied), or a copy where the
    file system has no links."""
    fd, old = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
    os.close(fd)
    try:
        os.unlink(old)
        try:
            os.link(path, old)
        except OSError:
            shutil.copy2(path, old)
    except BaseException:
        if os.path.lexists(old):
            os.unlink(old)
        raise
    return old


def atomic_replace_files(files: dict[Path, bytes | None]) -> None:
    """Replace several files together: afterwards every file holds its new bytes (a ``None``
    file is gone); after a failure or an interruption (an exception: Ctrl-C, SIGTERM through
    the command line) every file is as it was. (A pair such as ``predict``'s
    ``fused.nii.gz`` and ``seg.nii.gz`` then never mixes two models' outputs, and a failed
    write of the second file does not lose the first one's earlier version.)

    Each new file is first written to a temporary file beside its target. Then each existing
    target gets a hidden copy (a hard link), and the new files are renamed over the targets
    (a ``None`` target is removed last), so no target is ever missing while this runs; a
    failure renames the copies back. A process killed outright (SIGKILL, power loss) between
    two renames can still leave one new file beside one old one, and the old one's hidden
    ``.NAME.*.old`` copy.

    Raises:
        OSError: its ``filename`` is the file (not a temporary one) that could not be
            written or replaced, its ``strerror`` the system's.
    """
    files = {Path(p): data for p, data in files.items()}
    temps: dict[Path, str] = {}
    kept: dict[Path, str] = {}
    placed: list[Path] = []
    current = None
    try:
        for current, data in files.items():
            if data is not None:
                temps[current] = _write_temp(current, lambda fh, data=data: fh.write(data))
        for current in files:
            if os.path.lexists(current):
                kept[current] = _keep_copy(current)
        for current, tmp in temps.items():
            placed.append(current)  # first: undone even if the rename is all that ran
            os.replace(tmp, current)
        for current, data in files.items():
            if data is None and os.path.lexists(current):
                placed.append(current)
                os.unlink(current)
    except BaseException as exc:
        for path in placed:  # each step of the way back goes on when one fails
            try:
                if path in kept:  # (a no-op where the rename never ran: rename(2) leaves
                    os.replace(kept[path], path)  # two links of one file as they are)
                else:
                    path.unlink(missing_ok=True)
            except OSError:
                pass
        for leftover in (*temps.values(), *kept.values()):  # copies put back are gone
            try:
                if os.path.lexists(leftover):
                    os.unlink(leftover)
            except OSError:
                pass
        if isinstance(exc, OSError) and current is not None:
            reason = os.strerror(exc.errno) if exc.errno else exc.strerror
            raise OSError(exc.errno, reason, str(current)) from exc
        raise
    for old in kept.values():
        try:
            os.unlink(old)
        except OSError:
            pass


def check_output_file(path: str | Path, flag: str, inputs=(), runs=()) -> None:
    """Check, before any work, that ``path`` can be written by :func:`atomic_write_bytes`,
    and does not overwrite what the command reads (``inputs``, ``runs``:
    :func:`check_not_an_input`).

    The file need not exist; its folder is made when the file is written, so the nearest
    existing folder above it must be a folder this process can write to (probed with a real
    temporary file: ``os.access`` says yes to root even on a read-only mount). Nothing is
    created.

    Raises:
        ValueError: ``path`` is a folder, a component of it is a file, or the folder is not
            writable; the message starts with ``flag`` and the path.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name")
    check_not_an_input(path, flag, inputs, runs)
    _probe_nearest_folder(path, path.parent, flag)


RUN_RECORDS = ("run.json", "config.yaml", "metrics.jsonl", "train.json", "val.json",
               "test.json", "all.json")
"""The files of a run folder that its tools read back (:mod:`fuse4seg.train.runs`, and
``fuse4seg.study.evaluate_cached``'s ``<split>.json``)."""

RUN_FOLDERS = ("checkpoints", "glassbox")
"""The subfolders of a run folder that its tools write and read back."""

DATA_FILES = (".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy",
              ".npz", "manifest.json")
"""What the readers of a data folder read (volumes, images, a cache's arrays and manifest):
names an output inside an input folder may not end with."""


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder ``path`` names: itself when it is a folder, ``RUN`` for a checkpoint
    file in ``RUN/checkpoints/``, else ``None`` (a checkpoint file elsewhere). Resolved, so a
    relative ``best.pt`` read inside ``RUN/checkpoints`` finds ``RUN``."""
    path = Path(path).resolve()
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else None


def check_not_an_input(path: str | Path, flag: str, inputs=(), runs=(),
                       folder: bool = False) -> None:
    """Refuse an output ``path`` that would overwrite what the command reads.

    Outputs are written by renaming a temporary file onto ``path`` (:func:`atomic_write_bytes`),
    which replaces the folder entry ``path`` names (a link itself, not what it points to), so
    that entry is what is compared.

    Args:
        inputs: ``(flag, path)`` pairs (a ``None`` path is skipped): files and data folders.
            Refused: the input itself (also when the input is given through a link); inside an
            input folder, a file named like data (:data:`DATA_FILES`) or, with ``folder``, any
            path. Other files there are fine, on every run (``--json DATA/scores.json``).
        runs: ``(flag, run folder or checkpoint)`` pairs: the run folder itself, its records
            (:data:`RUN_RECORDS`, :data:`RUN_FOLDERS`) and anything in its subfolders are
            refused; other files there are fine (``evaluate --json RUN/scores.json``, again and
            again). A checkpoint file counts as an input, and one in ``RUN/checkpoints/`` makes
            ``RUN`` a run folder too.
        folder: ``path`` is an output folder, not a file.

    Raises:
        ValueError: starts with ``flag`` and ``path`` and names the input.
    """
    path = Path(path)
    entry = path.parent.resolve() / path.name  # what the rename replaces

    def refuse(what: str, name: str, source: Path, advice: str = "write the output elsewhere"
               ) -> None:
        raise ValueError(f"{flag} {path}: {what} {name} {source}; {advice}")

    for name, source in inputs:
        if source is None:
            continue
        source = Path(source)
        if entry in (source.parent.resolve() / source.name, source.resolve()):
            refuse("is the input", name, source)
        if not (source.is_dir() and entry.is_relative_to(source.resolve())):
            continue
        if folder:
            refuse("lies inside the input", name, source)
        data = next((end for end in DATA_FILES if path.name.lower().endswith(end)), None)
        if data:  # an input's reader would take it for one of its files (or it is one)
            refuse(f"is named like data ({data}) inside the input", name, source,
                   "the input's readers would take it for one of its files: give it another "
                   "name or write it elsewhere")
    for name, run in runs:
        run = Path(run) if run is not None else None
        if run is not None and not run.is_dir():
            check_not_an_input(path, flag, [(name, run)], folder=folder)
        run = run_folder_of(run) if run is not None else None  # RUN/checkpoints/best.pt: RUN
        if run is None or not run.is_dir() or not entry.is_relative_to(run):
            continue
        inner = entry.relative_to(run).parts
        if not inner or len(inner) > 1 or inner[0] in RUN_RECORDS + RUN_FOLDERS:
            refuse("would overwrite the records of the run", name, run)


def check_output_folder(path: str | Path, flag: str, inputs=(), runs=()) -> None:
    """Check, before any work, that ``path`` is (or can become) a folder this process writes in,
    outside what the command reads (``inputs``, ``runs``: :func:`check_not_an_input`).

    Nothing is created: the nearest existing folder at or above ``path`` is probed with a real
    temporary file (:func:`probe_writable`).

    Raises:
        ValueError: ``path`` is a file, a component of it is a file, or the folder is not
            writable; the message starts with ``flag`` and the path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: is a file, not a folder")
    check_not_an_input(path, flag, inputs, runs, folder=True)
    _probe_nearest_folder(path, path, flag)


def _probe_nearest_folder(path: Path, start: Path, flag: str) -> None:
    """Probe the nearest existing folder at or above ``start`` (where ``path`` will be made)
    with :func:`probe_writable`; a file in its place is a ValueError naming ``flag path``."""
    ancestor = start
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {path}: {ancestor} is a file, not a folder")
    probe_writable(ancestor, f"{flag} {path}")


def missing_folders(path: str | Path) -> list[Path]:
    """The folders of ``path``'s chain (``path`` itself first, then its parents) that do not
    exist yet: what a ``mkdir(parents=True)`` of it would create. Pair with
    :func:`remove_empty_folders` so that a failed command leaves no empty folder chain."""
    path = Path(path)
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first, as :func:`missing_folders` lists them) while they
    are empty folders; stop at the first one that is not."""
    for folder in folders:
        if not folder.is_dir() or any(folder.iterdir()):
            break
        folder.rmdir()


def probe_writable(folder: str | Path, what: str) -> None:
    """Check that a file can be made in the existing ``folder``, with a real temporary file
    (``os.access`` says yes to root even on a read-only mount); nothing is left behind.

    Raises:
        ValueError: ``"{what}: cannot write in {folder} (reason)"``.
    """
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{what}: cannot write in {folder} ({err.strerror})") from err


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename: never half-written."""
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def git_commit(cwd: Path | None = None) -> str:
    """The current git commit of the package's checkout (``"unknown"`` outside git)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read 1 MiB at a time (a checkpoint's identity)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_digest(n: int = 12, root: str | Path | None = None) -> str:
    """SHA-256 (first ``n`` hex digits) of the installed package's code.

    Unlike :func:`git_commit` it also works outside git (a wheel) and ignores changes outside
    the package (chapters, tests). Run folders record it, so a finished run made by other code
    is recognised (``fuse4seg.train.train(..., restart_if_code_changed=True)``), and the book
    says when its stored learning curves were made by other code.

    What is hashed is each ``.py`` file's **code** (:func:`code_text`): its docstrings
    (attribute docstrings included) and comments are left out, since they change no number
    (the one reader of a docstring at run time is the command line's help). So a corrected
    docstring, or a benchmark ratio quoted in one, does not mark every run and the stored
    curves as made by other code; an edit of code does, a change of indentation or of a
    string that is not a docstring included. Blank lines, trailing spaces and line endings
    (a CRLF checkout hashes like an LF one) do not count either. Regular ``.py`` files only,
    skipping any path with a part that starts with a dot (editor lock files,
    ``.ipynb_checkpoints``). It reads the files on disk
    (``root``, default this package's folder), not the modules a running kernel has already
    imported.
    """
    import hashlib

    base = Path(root) if root is not None else Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        raw = path.read_bytes()
        key = hashlib.sha256(raw).digest()
        if key not in _CODE_HASHES:  # parsing is the slow part: once per distinct file
            text = code_text(raw).encode("utf-8", errors="surrogateescape")
            _CODE_HASHES[key] = hashlib.sha256(text).digest()
        h.update(rel.as_posix().encode() + b"\0" + _CODE_HASHES[key])
    return h.hexdigest()[:n]


_CODE_HASHES: dict[bytes, bytes] = {}  # SHA-256 of a file's bytes -> of its code_text


def code_text(source: bytes | str) -> str:
    """``source`` (a Python file) without its docstrings, comments and blank lines.

    A docstring here is any statement that is a string literal alone: the one that opens a
    module, class or function body, and the attribute docstrings after a setting or a
    constant (``config.py``'s fields), which Python evaluates and throws away. They are cut
    at the positions Python's ``ast`` gives, comments at those of ``tokenize``; then blank
    lines and each line's trailing spaces go, except inside a string that is code (a
    multi-line string in an expression keeps its blank lines and spaces: they are its value).
    A file that does not parse (or tokenize) is kept whole, with normalised line endings, so
    its digest still changes with any edit; bytes are read in the file's declared encoding
    (UTF-8 by default), and a file they do not decode in is kept whole too.
    """
    import ast
    import io
    import tokenize

    readable = True
    if isinstance(source, bytes):
        try:  # the file's own encoding (PEP 263), UTF-8 unless it declares another
            source = source.decode(tokenize.detect_encoding(io.BytesIO(source).readline)[0])
        except (SyntaxError, LookupError, UnicodeDecodeError):
            source, readable = source.decode("utf-8", errors="surrogateescape"), False
    source = source.removeprefix("\ufeff")
    lines = source.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not readable:
        return "\n".join(lines)
    try:
        tree = ast.parse("\n".join(lines))
        cuts = []  # (line, column, end line, end column): 0-based lines, str columns
        for node in ast.walk(tree):
            if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)):
                # ast's columns count UTF-8 bytes; turn them into str columns
                start, end = node.lineno - 1, node.end_lineno - 1
                cuts.append((start, _str_col(lines[start], node.col_offset),
                             end, _str_col(lines[end], node.end_col_offset)))
        strings = []  # (line, column, end line) of each string token over several lines
        opened = []  # where each f-string began (Python 3.12+ splits them into tokens)
        f_start = getattr(tokenize, "FSTRING_START", -1)
        f_end = getattr(tokenize, "FSTRING_END", -1)
        for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines)).readline):
            (row, col), (end_row, end_col) = tok.start, tok.end
            if tok.type == tokenize.COMMENT:
                cuts.append((row - 1, col, end_row - 1, end_col))
            elif tok.type == f_start:
                opened.append((row - 1, col))
            elif tok.type == tokenize.STRING or (tok.type == f_end and opened):
                first, first_col = opened.pop() if tok.type == f_end else (row - 1, col)
                if end_row - 1 > first:
                    strings.append((first, first_col, end_row - 1))
    except (SyntaxError, tokenize.TokenError, ValueError):
        return "\n".join(lines)
    # lines inside a string that is code, its last excepted, keep their spaces and blankness
    verbatim = {i for first, col, last in strings
                if not any((s, c) <= (first, col) < (e, ec) for s, c, e, ec in cuts)
                for i in range(first, last)}
    for start, col, end, end_col in sorted(cuts, reverse=True):
        lines[start] = lines[start][:col] + lines[end][end_col:]
        lines[start + 1:end + 1] = [""] * (end - start)  # line numbers stay as they were
    return "\n".join(line if i in verbatim else line.rstrip()
                     for i, line in enumerate(lines) if i in verbatim or line.strip())


def _str_col(line: str, byte_col: int) -> int:
    """The str column of UTF-8 byte column ``byte_col`` in ``line``."""
    return len(line.encode("utf-8", errors="surrogateescape")[:byte_col].decode(
        "utf-8", errors="surrogateescape"))


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what Python's ``platform``
    module knows (``platform.processor()`` is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_summary(device: str = "auto") -> dict[str, str]:
    """Versions, commit and device: what every chapter prints in its setup cell.

    ``device`` names the GPU, or the CPU's model, its cores and torch's thread count: a
    CPU run's numbers depend on both (chapter 6, "Training every method and variant")."""
    import torch

    import fuse4seg

    dev = resolve_device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = (f"{cpu_name()}, {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} torch threads")
    return {
        "fuse4seg": fuse4seg.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "commit": git_commit(),
        "device": f"{dev} ({name})",
    }


def _default_sigterm() -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def case_map(fn, items: list, workers: int = 1, progress: bool = False, desc: str = ""):
    """``fn`` over ``items`` in order, in ``workers`` processes when > 1, with a progress bar.

    A context manager yielding the iterator of results, so the process pool is shut down (and
    pending work cancelled) however the caller leaves: ``with case_map(f, cases, 2) as it: ...``.

    Raises:
        ValueError: ``workers`` < 1.
    """
    if int(workers) < 1:
        raise ValueError(f"workers={workers}: need at least 1")
    workers = min(int(workers), max(len(items), 1))
    pool = None
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        # workers forked from a command line that turns SIGTERM into an exception take the
        # default back: the parent stops and cleans up, the workers just end
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_default_sigterm)
        results = pool.map(fn, items)
    else:
        results = map(fn, items)
    if progress:
        from tqdm.auto import tqdm

        results = tqdm(results, total=len(items), desc=desc, unit="case")
    try:
        yield results
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
