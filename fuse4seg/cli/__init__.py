"""The ``fuse4seg`` command line: the table of verbs, the parser and the error handling.

Each verb is a pair ``<verb>_arguments(parser)`` / ``<verb>_main(args) -> int`` in one of this
package's modules, registered in :data:`COMMANDS`:

- :mod:`fuse4seg.cli.data`: ``data phantom``, ``data check``, ``data prepare``;
- :mod:`fuse4seg.cli.segmentation`: ``train``, ``evaluate``, ``predict``, ``study``;
- :mod:`fuse4seg.cli.fusion`: ``fusion train``, ``fusion evaluate``, ``metrics``;
- :mod:`fuse4seg.cli.common`: what they share.

The logic lives in the package (the mains only call it). Nothing heavy is imported at load
time: the verbs' modules import their dependencies inside each main, and a call adds the
options of its own verb only, so torch is imported only when a verb that trains or runs
networks starts, and ``fuse4seg --help``, ``--version``, ``metrics`` and ``data check`` answer
without it. ``python -m fuse4seg`` (and ``python -m fuse4seg.cli``) runs :func:`main`.

Expected failures (bad input, missing files, invalid settings) print one
``fuse4seg: error: ...`` line naming the file or parameter and exit with status 2; nothing is
left half-written (outputs go through ``fuse4seg.utils.atomic_write_*``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: dict[tuple[str, ...], str] = {
    ("data", "phantom"): "data:phantom",
    ("data", "check"): "data:check",
    ("data", "prepare"): "data:prepare",
    ("train",): "segmentation:train",
    ("evaluate",): "segmentation:evaluate",
    ("predict",): "segmentation:predict",
    ("study",): "segmentation:study",
    ("metrics",): "fusion:metrics",
    ("fusion", "train"): "fusion:fusion_train",
    ("fusion", "evaluate"): "fusion:fusion_evaluate",
}
"""For each verb path, where its ``<prefix>_arguments`` / ``<prefix>_main`` pair lives, as
``"module:prefix"`` (a module of this package)."""

DEBUG_HELP = "on an error, show Python's traceback, not only the one-line message"

GROUP_HELP = {
    "data": "Check and prepare BraTS data; make the built-in phantom.",
    "fusion": "Fusion-only training and evaluation on image pairs (Harvard, GFP-PC).",
}


def _resolve(target: str):
    """The ``(arguments, main)`` pair of a :data:`COMMANDS` target. The verbs' modules import
    nothing heavy at load time, so every one is imported: each verb's one-line help is the first
    line of its main's docstring."""
    name, prefix = target.split(":")
    module = importlib.import_module(f"{__name__}.{name}")
    return getattr(module, f"{prefix}_arguments"), getattr(module, f"{prefix}_main")


def _verb_in(argv: list[str]) -> tuple[str, ...] | None:
    """The registered verb path named by ``argv`` (``None`` when there is none yet)."""
    words = [w for w in argv if not w.startswith("-")][:2]
    for path in COMMANDS:
        if tuple(words[: len(path)]) == path:
            return path
    return None


def build_parser(
    only: tuple[str, ...] | None = None,
    verbs: dict[tuple[str, ...], argparse.ArgumentParser] | None = None,
) -> argparse.ArgumentParser:
    """The parser of every verb; with ``only``, the options of that verb alone are added (the
    others are listed with their one-line help), so parsing stays quick. No verb's options
    import torch. ``verbs``, if given, receives each verb's own parser by its path."""
    from fuse4seg import __version__

    parser = argparse.ArgumentParser(
        prog="fuse4seg",
        description="Fuse4Seg: image fusion for multi-modal medical segmentation "
        "via bi-level optimisation.",
    )
    parser.add_argument("--version", action="version", version=f"fuse4seg {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, target in COMMANDS.items():
        add_arguments, run = _resolve(target)
        doc = (run.__doc__ or "").strip().splitlines()
        # a verb's one-line help goes through argparse's %-formatting ("95 % intervals")
        help_text = doc[0].replace("%", "%%") if doc else None
        if len(path) == 1:
            sub = top.add_parser(path[0], help=help_text, description=run.__doc__)
        else:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=GROUP_HELP.get(path[0]))
                groups[path[0]] = group.add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            sub = groups[path[0]].add_parser(path[1], help=help_text, description=run.__doc__)
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        # also after the verb; SUPPRESS keeps a top-level --debug when this one is not given
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help=DEBUG_HELP)
        if only is None or path == only:
            add_arguments(sub)
        sub.set_defaults(_run=run, _parser=sub)
        if verbs is not None:
            verbs[path] = sub
    return parser


def _long_options(parser: argparse.ArgumentParser) -> list[str]:
    """The verb's long options as its usage line lists them (argparse keeps no public list;
    the usage writes --help as -h)."""
    import re

    usage = parser.format_usage()
    return sorted({"--help", *re.findall(r"(?<![\w-])--[a-z][\w-]*", usage)})


def _unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The words of ``argv`` that look like long options (``--name`` or ``--name=value``)
    and begin none of the verb's (a prefix of one is argparse's abbreviation, of several its
    "ambiguous option" error). Checked before parsing, since argparse reports a missing
    required argument first and drops the unknown option and its hint (``predict ... --flare
    b`` would only say that ``--flair`` is required)."""
    known = [*_long_options(parser), "--version"]
    unknown = []
    for word in argv:
        name = word.split("=")[0]
        if not name.startswith("--") or name == "--" or name in known:
            continue
        if not any(option.startswith(name) for option in known):
            unknown.append(word)
    return unknown


def _unrecognised(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """argparse's "unrecognized arguments" message, with the closest option of the verb
    for each unknown one (``train --inner-steps 5``: ``--set``, where ``train.inner_steps=5``
    goes)."""
    import difflib

    known = _long_options(parser)
    settings: dict[str, list[str]] = {}  # name -> dotted names of the settings the verb reads
    verb = parser.get_default("_set_verb")
    if verb is not None:  # `--inner-steps` of a verb that takes `--set train.inner_steps=N`
        from fuse4seg.cli.common import verb_reads
        from fuse4seg.config import get_config

        for section, values in get_config("default").to_dict().items():
            for name in values if isinstance(values, dict) else ():
                if verb_reads(verb, f"{section}.{name}"):
                    settings.setdefault(name, []).append(f"{section}.{name}")
    hints = []
    for word in (w.split("=")[0] for w in extra if w.startswith("--")):
        name = word[2:].replace("-", "_")
        # the setting itself, else the settings it begins (`--lr`: train.lr_leader, ...)
        setting = settings.get(name) or [
            d for key, dotted in settings.items() if key.startswith(f"{name}_") for d in dotted]
        # compared without the leading "--", which every option shares (else --bogus: --out)
        close = [f"--{c}" for c in difflib.get_close_matches(
            word[2:], [k[2:] for k in known], n=1, cutoff=0.6)]
        if setting:
            options = " or ".join(f"--set {d}=VALUE" for d in setting[:3])
            hints.append(f"{word}: did you mean {options}?")
        elif close:
            hints.append(f"{word}: did you mean {close[0]}?")
    return f"unrecognized arguments: {' '.join(extra)}" + (
        f" ({'; '.join(hints)} See --help.)" if hints else " (see --help)")


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one ``fuse4seg: warning: ...`` line, without Python's file:line."""
    return f"fuse4seg: warning: {message}\n"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit, ``kill``), raised where the command is, so that
    it stops the way Ctrl-C does: a ``predict`` removes what it wrote and the folders it made,
    a ``train`` keeps its last checkpoint and says how to resume."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run the ``fuse4seg`` command on ``argv`` (default: the process's arguments) and return
    its exit status: 0, 1 for ``data check``'s bad cases, 2 for an expected failure (printed
    as one ``fuse4seg: error: ...`` line; ``--debug`` adds the traceback), 130 when
    interrupted (Ctrl-C), 143 when terminated (SIGTERM, handled like Ctrl-C while the command
    runs, in the main thread)."""
    import signal
    import threading
    import warnings

    argv = sys.argv[1:] if argv is None else list(argv)
    path = _verb_in(argv)
    verbs: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    parser = build_parser(only=path or (), verbs=verbs)
    if path is not None and (unknown := _unknown_options(verbs[path], argv)):
        verbs[path].error(_unrecognised(verbs[path], unknown))  # before "... are required"
    args, extra = parser.parse_known_args(argv)
    if extra:  # the verb's usage, not the top level's, and the options close to each word
        verb = getattr(args, "_parser", parser)
        verb.error(_unrecognised(verb, extra))
    shown = warnings.formatwarning
    warnings.formatwarning = _format_warning
    sigterm = None  # the handler to put back; left alone where Python did not set it (None)
    if threading.current_thread() is threading.main_thread():
        sigterm = signal.getsignal(signal.SIGTERM)
        if sigterm is not None:
            signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args._run(args) or 0)
    except Terminated:
        print("fuse4seg: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("fuse4seg: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        if isinstance(exc, KeyError):
            message = str(exc.args[0])
        elif isinstance(exc, OSError) and exc.filename and exc.strerror:
            message = f"{exc.filename}: {exc.strerror}"  # not "[Errno 13] ...: 'path'"
        else:
            message = str(exc)
        # one line, also for a library's message with line breaks in it (nibabel's)
        message = " ".join(part.strip() for part in message.splitlines() if part.strip())
        print(f"fuse4seg: error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = shown
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)

