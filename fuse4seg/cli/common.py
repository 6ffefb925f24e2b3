"""What the verbs of :mod:`fuse4seg.cli` share: argument types, ``--set``, the config, and the
inputs an output is checked against."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROFILES = "smoke, default or paper (default: default)"
PAIR_KINDS = ["CT-MRI", "PET-MRI", "SPECT-MRI", "GFP-PC"]


def _integer(text: str, least: int, rule: str) -> int:
    """``text`` as an integer >= ``least``; else an argparse error with ``rule`` and the value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{rule}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count or a size), refused otherwise with its value."""
    return _integer(text, 1, "must be at least 1")


def crop_int(text: str) -> int:
    """argparse type: a crop side, an integer >= 2 (the leader reflect-pads by one pixel)."""
    return _integer(text, 2, "a crop must be at least 2 pixels")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate), refused otherwise with its value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer >= 0 (numpy's generators refuse negative seeds)."""
    return _integer(text, 0, "a seed must be >= 0")


SET_SECTIONS = {
    "data prepare": ("data",),
    "train": ("data", "model", "loss", "train"),
    "study": ("data", "model", "loss", "train"),
    "fusion train": ("model", "loss", "train", "fusion"),
}
"""The config sections each verb with ``--set`` reads. A ``--set`` of another section is
refused (:func:`config_of`): it would be recorded in the run's config and change nothing. The
``fusion`` section is the fusion-only schedule of ``fusion train`` (chapter 5), which segmentation
runs never read (their run hash leaves it out); ``fusion train`` reads no ``data`` section, since
its pairs are 2-D images, not BraTS volumes, and of the others only
:data:`fuse4seg.config.FUSION_ONLY_READS` (:func:`verb_reads`)."""


def verb_reads(verb: str, name: str, config=None) -> bool:
    """Whether ``fuse4seg <verb>`` reads the setting ``name`` (dotted, ``train.seed``): one of
    the verb's :data:`SET_SECTIONS`, and for ``fusion train`` outside its ``fusion`` section,
    one of :data:`fuse4seg.config.FUSION_ONLY_READS`, where one of
    :data:`~fuse4seg.config.FUSION_FALLBACKS` only when ``config``'s ``fusion`` setting it
    stands in for is ``None`` (without a ``config``, as for the unknown-option hints: not)."""
    section = name.split(".")[0]
    if section not in SET_SECTIONS[verb]:
        return False
    if verb != "fusion train" or section == "fusion":
        return True
    from fuse4seg.config import FUSION_FALLBACKS, FUSION_ONLY_READS

    if name not in FUSION_ONLY_READS:
        return False
    stands_for = FUSION_FALLBACKS.get(name)
    return stands_for is None or (config is not None and _value(config, stands_for) is None)


def _value(config, name: str):
    """The value of the dotted setting ``name`` in ``config``."""
    section, key = name.split(".")
    return getattr(getattr(config, section), key)


def _what_it_reads(verb: str) -> str:
    """The sections ``verb`` reads, in words, for its ``--set`` help and refusals."""
    if verb == "fusion train":  # verb_reads: of model, loss and train only some settings
        return ("the fusion section, and of the model, loss and train sections the settings "
                "fuse4seg.config.FUSION_ONLY_READS lists")
    return f"the {', '.join(SET_SECTIONS[verb])} sections"


def add_set(parser: argparse.ArgumentParser, example: str, verb: str) -> None:
    """The repeatable ``--set NAME=VALUE`` override of ``verb`` (a key of
    :data:`SET_SECTIONS`, which the parser keeps as ``args._set_verb`` for :func:`config_of`
    and the unknown-option hints), with ``example`` in its help."""
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE",
        help=f"override a setting of {_what_it_reads(verb)}, e.g. --set {example} (repeatable)",
    )
    parser.set_defaults(_set_verb=verb)


def add_json(parser: argparse.ArgumentParser, what: str) -> None:
    """``--json [FILE]``: ``what`` as JSON, written to FILE (atomically) or, with no FILE,
    printed instead of the table; as ``--json FILE`` of ``evaluate`` and ``study``."""
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="FILE",
        help=f"{what} as JSON: written to FILE, or printed instead of the table without FILE",
    )


def write_json(value, target: str) -> None:
    """Print ``value`` as JSON (``target`` ``"-"``, a bare ``--json``) or write it to the file
    ``target`` atomically, and say so."""
    import json

    from fuse4seg.utils import atomic_write_json

    if target == "-":
        print(json.dumps(value, indent=2))
    else:
        atomic_write_json(Path(target), value)
        print(f"wrote {target}")


def config_of(profile: str, pairs: list[str], verb: str,
              options: dict[str, tuple[str, Any]] | None = None,
              refuse: Callable[[dict[str, tuple[str, Any]]], None] | None = None):
    """The profile's config with the ``--set`` overrides ``pairs`` of ``verb`` and the verb's
    ``options`` applied. ``options`` maps each option that gives a setting to the dotted
    setting and the value given, ``None`` where the option was not given (``{"--seed":
    ("train.seed", 7)}``). ``refuse``, the verb's own rules for its ``--set`` items, is called
    with them once they are parsed (``{dotted name: (item as written, value)}``, as
    :func:`fuse4seg.config.set_items` gives them) and raises to refuse one: ``train``'s and
    ``study``'s refuse a setting none of their methods reads
    (:func:`fuse4seg.train.methods.check_method_settings`), and their own option's setting
    (``--ablation``'s loss switches, ``--seeds``' seed).

    Refused, before any work, each with the option or setting it names and why:

    - a ``--set`` item the verb's ``refuse`` refuses;
    - two ``--set`` items, or an option and a ``--set`` item, that give one setting different
      values (which one?);
    - a ``--set`` of a setting the verb does not read with this config (:func:`verb_reads`),
      checked before the values are (so that mending a refused value does not meet this next):
      it would be recorded in the run's config and change nothing. The refusal names the
      setting (a short name with the dotted one it stands for) and the verbs that read it; for
      a :data:`~fuse4seg.config.FUSION_FALLBACKS` setting, the option, ``--set`` item or
      profile that gives the ``fusion`` setting it stands in for;
    - a name or value :func:`fuse4seg.config.get_config` refuses, each refused value led by
      the ``--set`` items and options that gave the settings its check reads (``_named``);
      the error keeps :class:`~fuse4seg.config.ConfigError`'s ``problems`` and ``unknown``.
    """
    from fuse4seg.config import ConfigError, get_config, set_items

    items = set_items(pairs)
    if "profile" in items:
        raise ValueError("--set profile: give the profile with --profile")
    if refuse is not None:
        refuse(items)
    given_options = {setting: (f"{flag} {value}", value)
                     for flag, (setting, value) in (options or {}).items() if value is not None}
    for setting, (option, value) in given_options.items():
        if setting in items and items[setting][1] != value:
            raise ValueError(f"{option} and --set {items[setting][0]} disagree: give one")
    overrides = {name: value for name, (_, value) in items.items()}
    overrides.update({name: value for name, (_, value) in given_options.items()})
    try:
        config, refused = get_config(profile, overrides), None
    except ConfigError as exc:
        refused = exc
        # what the verb reads comes first (a fix of a refused value would meet it next);
        # FUSION_FALLBACKS depend only on the fusion section's values
        fusion = {name: value for name, value in overrides.items() if name.startswith("fusion.")}
        try:
            config = get_config(profile, fusion)
        except ConfigError:  # a fusion value refused too: the profile's stand in
            config = get_config(profile)
    _check_verb_reads(verb, items, given_options, config)
    if refused is not None:  # a value validate refuses: name the items that gave it
        raise ConfigError(_named(refused, items, given_options, verb), refused.problems,
                          refused.unknown) from None
    if "model" in SET_SECTIONS.get(verb, ()):  # a network name, refused with its --set item
        from fuse4seg.models.registry import check_model_names

        try:
            check_model_names(config)
        except ValueError as exc:
            key = str(exc).split(" ", 1)[0]  # "model.fusion"
            source = (f"--set {items[key][0]}: " if key in items else "")
            raise ValueError(f"{source}{exc}") from None
    return config


def _named(refused, items: dict[str, tuple[str, Any]],
           given_options: dict[str, tuple[str, Any]], verb: str | None = None) -> str:
    """The message of ``refused``, a :class:`fuse4seg.config.ConfigError`, with each value it
    refuses led by the ``--set`` items and options that gave a setting its check reads (its
    ``problems``: ``--set fusion.crop=1: fusion.crop must be >= 2 ...``), and an unknown
    setting by the item that gave it, its list of valid settings cut to the sections ``verb``
    reads (:data:`SET_SECTIONS`)."""
    sources = {name: f"--set {pair}" for name, (pair, _) in items.items()}
    sources.update({name: option for name, (option, _) in given_options.items()})
    if refused.unknown is not None:
        message = str(refused)
        if verb in SET_SECTIONS and " Valid settings: " in message:
            from fuse4seg.config import valid_names

            head = message.split(" Valid settings: ", 1)[0]
            ours = [n for n in valid_names() if verb_reads(verb, n)]
            message = f"{head} Settings `fuse4seg {verb}` reads: {', '.join(ours)}"
        source = sources.get(refused.unknown)
        return f"{source}: {message}" if source else message
    if not refused.problems:
        return str(refused)
    parts = []
    for names, part in refused.problems:
        named = [sources[name] for name in sources if name in names]
        parts.append(f"{', '.join(named)}: {part}" if named else part)
    return "; ".join(parts)


def _check_verb_reads(verb: str, items: dict[str, tuple[str, Any]],
                      given_options: dict[str, tuple[str, Any]], config) -> None:
    """Refuse a ``--set`` item of a setting ``verb`` does not read with ``config``
    (:func:`config_of`); a name that is no setting is left to
    :func:`fuse4seg.config.get_config`, which lists the valid ones."""
    from fuse4seg.config import FUSION_FALLBACKS, FUSION_ONLY_READS, valid_names

    valid = set(valid_names())
    for dotted, (pair, _) in items.items():
        if dotted not in valid or verb_reads(verb, dotted, config):
            continue
        section = dotted.split(".")[0]
        name = pair.split("=", 1)[0].strip()
        shown = name if name == dotted else f"{name} ({dotted})"
        readers = [f"`fuse4seg {v}`" for v in SET_SECTIONS if verb_reads(v, dotted)]
        advice = ""
        if section not in SET_SECTIONS[verb]:
            why = f"does not read the {section} section (it reads {_what_it_reads(verb)})"
        elif dotted in FUSION_FALLBACKS:  # fusion train, where the fusion setting is given
            stands_for = FUSION_FALLBACKS[dotted]
            why = f"reads {dotted} only where {stands_for} is null, and "
            if stands_for in given_options:
                why += f"{given_options[stands_for][0]} gives it"
            elif stands_for in items:
                why += f"--set {items[stands_for][0]} gives it"
            else:
                why += (f"profile {config.profile} sets {stands_for} to "
                        f"{_value(config, stands_for)}")
                advice = f"; set {stands_for} instead"
        else:  # fusion train: a setting of model, loss or train it does not read
            only = [n.split(".")[1] for n in FUSION_ONLY_READS if n.startswith(f"{section}.")]
            why = (f"does not read {dotted} (of the {section} section it reads only "
                   f"{', '.join(only)})")
        who = f"; {', '.join(readers)} {'reads' if len(readers) == 1 else 'read'} it" * bool(
            readers)
        raise ValueError(f"--set {shown}: `fuse4seg {verb}` {why}, so the setting would change "
                         f"nothing{advice}{who}")


def given(args: argparse.Namespace, *names: str) -> list[tuple[str, Path | None]]:
    """``(name, value)`` of the arguments ``names`` as the user wrote them (``"--data"`` reads
    ``args.data``, ``"--t1ce"`` ``args.t1ce``, a positional ``"RUN"`` ``args.run``): the
    ``inputs`` and ``runs`` of :func:`fuse4seg.utils.check_output_file`. Naming an argument
    once, for both its label and its value, keeps an error's flag and the path it checked
    together.

    Raises:
        AttributeError: a name that is not one of the verb's arguments (a programming error).
    """
    return [(name, getattr(args, name.lstrip("-").replace("-", "_").lower())) for name in names]
