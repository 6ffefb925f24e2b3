"""The command line: every verb of the design's CLI contract is wired and documented."""

from pathlib import Path

import pytest

from fuse4seg.cli import COMMANDS, build_parser, main


def test_every_verb_resolves_with_help(capsys):
    parser = build_parser()
    assert parser.prog == "fuse4seg"
    for path in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0
        assert "usage: fuse4seg " + " ".join(path) in capsys.readouterr().out


def test_the_top_level_and_group_help_list_every_verb(capsys):
    """``fuse4seg --help`` lists each verb with its one-line help (a "%" in one, as in "95 %
    intervals", once crashed argparse's formatting of the whole list)."""
    for argv, verbs in (([], {p[0] for p in COMMANDS}),
                        *(([g], {p[1] for p in COMMANDS if len(p) == 2 and p[0] == g})
                          for g in {p[0] for p in COMMANDS if len(p) == 2})):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])
        assert exit_info.value.code == 0, argv
        out = capsys.readouterr().out
        assert all(f"    {verb} " in out for verb in verbs), (argv, out)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "95 % intervals" in capsys.readouterr().out


def test_missing_file_is_a_clean_error(tmp_path, capsys):
    code = main(["predict", "--checkpoint", str(tmp_path / "nope"), "--t1ce", "a.nii.gz",
                 "--flair", "b.nii.gz", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fuse4seg: error:") and "a.nii.gz" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["fusion", "evaluate", "max", "--pairs", "p", "--kind", "PET-MRI", "--max-pairs", "-1"],
    ["predict", "--checkpoint", "r", "--t1ce", "a", "--flair", "b", "--out", "o",
     "--batch-size", "0"],
    ["evaluate", "r", "--data", "d", "--batch-size", "-3"],
    ["data", "prepare", "d", "--out", "o", "--workers", "0"],
])
def test_counts_and_sizes_below_one_are_refused_by_name(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    flag, value = argv[-2], argv[-1]
    assert f"argument {flag}: must be at least 1, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, hint", [
    (["train", "--data", "d", "--inner-steps", "5"],
     "--inner-steps: did you mean --set train.inner_steps=VALUE?"),
    (["evaluate", "r", "--data", "d", "--splt", "test"], "--splt: did you mean --split?"),
    (["metrics", "--fused", "f", "--a", "a", "--b", "b", "--foo"], "(see --help)"),
    # options read from the verb's usage: hyphenated ones, a sub-verb's, and --help itself
    (["train", "--data", "d", "--no-progess"], "--no-progess: did you mean --no-progress?"),
    (["data", "check", "d", "--jsn"], "--jsn: did you mean --json?"),
    (["metrics", "--fused", "f", "--a", "a", "--b", "b", "--hlep"], "did you mean --help?"),
    # a setting the name begins, from the sections the verb reads (not fusion.lr for train)
    (["train", "--data", "d", "--lr", "0.1"], "--lr: did you mean --set train.lr_leader=VALUE "
     "or --set train.lr_follower=VALUE or --set train.lr_follower_rollout=VALUE?"),
    (["train", "--data", "d", "--steps", "3"],
     "--steps: did you mean --set train.steps_per_epoch=VALUE?"),
    # fusion train: of the model, loss and train sections only the settings it reads
    (["fusion", "train", "--pairs", "p", "--ema-decay", "0.9"],
     "--ema-decay: did you mean --set train.ema_decay=VALUE?"),
    (["fusion", "train", "--pairs", "p", "--dice-smooth", "1"], "--dice-smooth (see --help)"),
    # an unknown option is reported before a missing required one (--flair, --checkpoint)
    (["predict", "--flare", "b.nii.gz"], "--flare: did you mean --flair?"),
    # no near option: no hint (compared without the "--" every option shares)
    (["train", "--data", "d", "--bogus", "1"], "--bogus (see --help)"),
])
def test_an_unknown_option_gets_the_verbs_usage_and_the_closest_option(argv, hint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    verb = " ".join(argv[:2] if argv[0] in ("data", "fusion") else argv[:1])
    assert err.startswith(f"usage: fuse4seg {verb} ")  # the verb's usage, not the top level's
    assert f"fuse4seg {verb}: error: unrecognized arguments: " in err and hint in err


def test_an_abbreviation_is_argparses_and_an_ambiguous_one_its_error(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data", "d", "--res"])  # --resume or --restart-if-code-changed
    assert "ambiguous option: --res could match --resume, --restart-if-code-changed" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    (["train", "--set", "fusion.lr=0.1"],
     "--set fusion.lr: `fuse4seg train` does not read the fusion section (it reads the data, "
     "model, loss, train sections), so the setting would change nothing; `fuse4seg fusion "
     "train` reads it"),
    (["study", "--set", "fusion.crop=32"], "`fuse4seg study` does not read the fusion section"),
    (["data", "prepare", "DATA", "--out", "OUT", "--set", "train.seed=2"],
     "`fuse4seg data prepare` does not read the train section (it reads the data sections)"),
    (["fusion", "train", "--pairs", "DATA", "--kind", "CT-MRI", "--out", "OUT", "--set",
      "data.crop_size=64"],
     "`fuse4seg fusion train` does not read the data section (it reads the fusion section, and "
     "of the model, loss and train sections the settings fuse4seg.config.FUSION_ONLY_READS "
     "lists), so the setting would change nothing; `fuse4seg data prepare`, `fuse4seg train`, "
     "`fuse4seg study` read it"),
    # fusion train reads only fuse4seg.config.FUSION_ONLY_READS of model, loss and train
    (["fusion", "train", "--pairs", "DATA", "--kind", "CT-MRI", "--out", "OUT", "--set",
      "train.inner_steps=4"],
     "--set train.inner_steps: `fuse4seg fusion train` does not read train.inner_steps (of the "
     "train section it reads only seed, device, amp, compile, weight_decay, grad_clip, "
     "ema_decay, batch_size, lr_leader, rollout_epochs, steps_per_epoch), so the setting would "
     "change nothing; `fuse4seg train`, `fuse4seg study` read it"),
    (["fusion", "train", "--pairs", "DATA", "--kind", "CT-MRI", "--out", "OUT", "--set",
      "model.segmentation=convnext_unet_tiny"],
     "does not read model.segmentation (of the model section it reads only fusion, "
     "inn_squeeze, source_skip, anchor_range)"),
    # ... and a fallback of a fusion setting the profile sets (all three, in default)
    (["fusion", "train", "--pairs", "DATA", "--kind", "CT-MRI", "--out", "OUT", "--set",
      "train.batch_size=2"],
     "--set train.batch_size: `fuse4seg fusion train` reads train.batch_size only where "
     "fusion.batch is null, and profile default sets fusion.batch to 4, so the setting would "
     "change nothing; set fusion.batch instead; `fuse4seg train`, `fuse4seg study` read it"),
    # a short name is shown with the setting it stands for; the profile has its own option
    (["train", "--set", "steps=3"], "--set steps (fusion.steps): `fuse4seg train` does not "
     "read the fusion section"),
    (["data", "prepare", "DATA", "--out", "OUT", "--set", "profile=paper"],
     "--set profile: give the profile with --profile"),
    # fusion train's options against the settings they override
    (["fusion", "train", "--pairs", "DATA", "--kind", "CT-MRI", "--out", "OUT", "--steps", "3",
      "--set", "fusion.steps=5"], "--steps 3 and --set fusion.steps=5 disagree: give one"),
    (["fusion", "train", "--pairs", "DATA", "--kind", "CT-MRI", "--out", "OUT", "--profile",
      "paper", "--batch-size", "4", "--set", "train.batch_size=2"],
     "--set train.batch_size: `fuse4seg fusion train` reads train.batch_size only where "
     "fusion.batch is null, and --batch-size 4 gives it, so the setting would change nothing; "
     "`fuse4seg train`, `fuse4seg study` read it"),
    (["fusion", "train", "--pairs", "DATA", "--kind", "CT-MRI", "--out", "OUT", "--profile",
      "paper", "--set", "fusion.batch=4", "--set", "train.batch_size=2"],
     "reads train.batch_size only where fusion.batch is null, and --set fusion.batch=4 gives "
     "it, so"),
    # one setting given twice: by two names, by one name twice, or by an option and a name
    (["train", "--set", "seed=5", "--set", "train.seed=6"],
     "--set seed=5 and --set train.seed=6 give train.seed two values: give one"),
    (["data", "prepare", "DATA", "--out", "OUT", "--set", "crop_size=64", "--set",
      "crop_size=96"], "--set crop_size=64 and --set crop_size=96 give data.crop_size two "
     "values: give one"),
    (["train", "--seed", "3", "--set", "seed=5"], "--seed 3 and --set seed=5 disagree: give one"),
    (["train", "--set", "seed=x"], "--set seed=x: train.seed: expected an integer, got 'x'"),
    # a Table 3 variant fixes all three loss switches, the ones it leaves on too
    (["train", "--ablation", "full", "--set", "use_recon=false"],
     "--set use_recon=false and --ablation full: a Table 3 variant fixes every loss switch "
     "itself (loss.use_decomp=true, loss.use_grad=true, loss.use_recon=true); drop them"),
    (["fusion", "evaluate", "average", "--pairs", "DATA", "--kind", "GFP-PC", "--device",
      "banana"], "device 'banana': not a device"),
    (["train", "--device", "cpu", "--set", "train.device=cuda"],
     "--device cpu and --set train.device=cuda disagree: give one"),
    (["study", "--device", "cpu", "--set", "device=cuda"],
     "--device cpu and --set device=cuda disagree: give one"),
    (["fusion", "train", "--pairs", "DATA", "--kind", "CT-MRI", "--out", "OUT", "--lr", "0.01",
      "--set", "lr=2e-3"], "--lr 0.01 and --set lr=2e-3 disagree: give one"),
])
def test_a_setting_the_verb_never_reads_is_refused(argv, message, tmp_path, capsys):
    """It would be recorded in the run's config and change nothing (helper review: `train
    --set fusion.lr=0.1` ran and gave the run of no override); so would a `fusion train`
    option's setting given twice, or a fallback the option overrides."""
    data = tmp_path / "data"
    data.mkdir()
    argv = [str(data) if a == "DATA" else str(tmp_path / "out") if a == "OUT" else a
            for a in argv]
    if argv[0] in ("train", "study"):
        argv += ["--data", str(data), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fusion_train_takes_a_fallback_where_the_profile_leaves_the_fusion_setting_null():
    from fuse4seg.cli.common import config_of

    # paper sets no fusion.batch: train.batch_size makes the fusion-only batch there
    assert config_of("paper", ["train.batch_size=2"], "fusion train").train.batch_size == 2
    with pytest.raises(ValueError, match="profile default sets fusion.batch to 4"):
        config_of("default", ["train.batch_size=2"], "fusion train")


def test_fusion_train_options_are_its_settings(tmp_path, monkeypatch):
    """An option and the ``--set`` of its setting make the same config (and so the same run
    folder); the two agree where only YAML's spelling differs (``2e-3``, read as a string)."""
    import fuse4seg.cli.fusion as cli_fusion
    import fuse4seg.train.fusion_only as fusion_only

    seen = []

    def fake_train_fusion(pairs, config, runs_dir, kind, **kwargs):
        seen.append(config)
        raise KeyboardInterrupt  # stop before any work; main answers 130

    monkeypatch.setattr(cli_fusion, "_load_pairs", lambda args, split: [])
    monkeypatch.setattr(fusion_only, "train_fusion", fake_train_fusion)
    base = ["fusion", "train", "--pairs", str(tmp_path), "--kind", "CT-MRI", "--out",
            str(tmp_path / "runs"), "--profile", "paper"]
    options = ["--steps", "3", "--crop", "48", "--batch-size", "2", "--lr", "0.002", "--seed",
               "4", "--device", "cpu"]
    settings = ["fusion.steps=3", "crop=48", "fusion.batch=2", "fusion.lr=2e-3", "seed=4",
                "train.device=cpu"]
    assert main([*base, *options]) == 130
    assert main([*base, *(a for s in settings for a in ("--set", s))]) == 130
    assert main([*base, *options, "--set", "fusion.lr=2e-3", "--set", "seed=4"]) == 130
    assert seen[0] == seen[1] == seen[2]
    fusion = seen[0].fusion
    assert (fusion.steps, fusion.crop, fusion.batch, fusion.lr) == (3, 48, 2, 0.002)
    assert (seen[0].train.seed, seen[0].train.device) == (4, "cpu")


def test_cache_beside_a_prepared_cache_is_refused_not_ignored(tmp_path, capsys):
    """``--data`` that is a prepared cache is used as it is, so a ``--cache`` beside it was
    ignored without a word (helper review)."""
    data = tmp_path / "cache"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    assert main(["train", "--data", str(data), "--cache", str(tmp_path / "other"), "--out",
                 str(tmp_path / "runs"), "--profile", "smoke"]) == 2
    assert (f"--cache {tmp_path / 'other'}: --data {data} is a prepared cache already"
            in capsys.readouterr().err)
    assert not (tmp_path / "other").exists() and not (tmp_path / "runs").exists()


def test_train_refuses_a_cache_of_other_settings(phantom_dir, tmp_path, capsys):
    """``train --cache OLD`` with a raw ``--data``: OLD, prepared with other data settings,
    used to be prepared again in place (helper review); it is refused now, before any network
    is built, with no runs folder left behind (``evaluate`` calls the same
    :func:`~fuse4seg.train.runs.resolve_cache`)."""
    from fuse4seg.config import get_config
    from fuse4seg.train.runs import resolve_cache

    old = tmp_path / "old"
    resolve_cache(phantom_dir, get_config("smoke"), cache=old, progress=False)
    before = (old / "manifest.json").read_bytes()
    stride = get_config("smoke").data.slice_stride
    runs = tmp_path / "runs"
    assert main(["train", "--data", str(phantom_dir), "--cache", str(old), "--out", str(runs),
                 "--profile", "smoke", "--set", f"data.slice_stride={stride + 1}",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"fuse4seg: error: --cache {old}: holds a slice cache of --data {phantom_dir} " in err
    assert f"data.slice_stride {stride} (needed: {stride + 1})" in err
    assert not runs.exists() and (old / "manifest.json").read_bytes() == before


def test_a_learning_rate_must_be_a_finite_positive_number(tmp_path, capsys):
    base = ["fusion", "train", "--pairs", str(tmp_path), "--kind", "CT-MRI", "--lr"]
    with pytest.raises(SystemExit):
        main([*base[:-1], "--crop", "1"])
    assert "argument --crop: a crop must be at least 2 pixels, got 1" in capsys.readouterr().err
    for value in ("0", "-0.001", "inf", "nan", "fast"):
        with pytest.raises(SystemExit):
            main([*base, value])
        err = capsys.readouterr().err
        if value == "fast":
            assert f"argument --lr: {value!r} is not a number" in err
        else:
            assert f"argument --lr: must be a finite number > 0, got {value}" in err


def test_train_seed_is_train_dot_seed_and_a_second_value_is_refused(tmp_path, monkeypatch,
                                                                    capsys):
    import fuse4seg.train.trainer as trainer

    seen = []

    def fake_train(config, **kwargs):  # what train_main hands the trainer
        seen.append(config.train.seed)
        raise KeyboardInterrupt  # stop before any work; main answers 130

    monkeypatch.setattr(trainer, "train", fake_train)
    base = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "runs")]
    assert main([*base, "--seed", "7"]) == 130
    assert main([*base, "--set", "train.seed=7"]) == 130
    assert main([*base, "--seed", "7", "--set", "train.seed=7"]) == 130  # the same seed twice
    assert main(base) == 130
    assert seen == [7, 7, 7, 0]
    capsys.readouterr()
    assert main([*base, "--seed", "1", "--set", "train.seed=2"]) == 2
    assert "--seed 1 and --set train.seed=2 disagree: give one" in capsys.readouterr().err
    assert len(seen) == 4  # refused before the trainer


def test_a_message_with_line_breaks_is_printed_on_one_line(tmp_path, capsys, monkeypatch):
    """nibabel's errors carry line breaks; the error stays one ``fuse4seg: error:`` line."""
    import fuse4seg.inference

    def damaged(*args, **kwargs):
        raise ValueError("Expected 8927824 bytes, got 1024 bytes from u_flair.nii\n"
                         " - could the file be damaged?")

    monkeypatch.setattr(fuse4seg.inference, "predict_files", damaged)
    code = main(["predict", "--checkpoint", "r", "--t1ce", "a.nii", "--flair", "u_flair.nii",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err == ("fuse4seg: error: Expected 8927824 bytes, got 1024 "
                                       "bytes from u_flair.nii - could the file be damaged?\n")


def test_os_errors_name_the_asked_for_file_and_a_bad_device_fails_first(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    assert main(["data", "phantom", "--out", str(blocker / "x"), "--cases", "1",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker / 'x'}: {blocker} is a file, not a folder" in err
    assert ".tmp" not in err and "[Errno" not in err
    # --restart-if-code-changed only means something with --resume
    assert main(["train", "--method", "average", "--profile", "smoke", "--data", str(tmp_path),
                 "--out", str(tmp_path / "runs"), "--restart-if-code-changed"]) == 2
    assert "give it with --resume" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    # train checks --device before it prepares anything
    assert main(["train", "--method", "average", "--profile", "smoke", "--data",
                 str(tmp_path), "--out", str(tmp_path / "runs"), "--device", "foo"]) == 2
    assert "device 'foo': not a device" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_light_verbs_do_not_import_torch():
    """Parsing `metrics` and `data check` and importing their modules imports no torch, and
    `--version` answers (the slow `test_bench_cli` runs every light verb for real)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fuse4seg import cli\n"
        "calls = (['metrics', '--fused', 'f', '--a', 'a', '--b', 'b'], ['data', 'check', 'd'])\n"
        "for argv in calls:\n"
        "    cli.build_parser(only=cli._verb_in(argv)).parse_args(argv)\n"
        "import fuse4seg.metrics.files, fuse4seg.metrics.fusion, fuse4seg.data.layouts\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    for module in ("fuse4seg", "fuse4seg.cli"):  # both run the command
        version = subprocess.run(
            [sys.executable, "-m", module, "--version"], capture_output=True, text=True, check=True
        )
        assert version.stdout.startswith("fuse4seg ")


def test_a_verb_gets_only_its_own_options():
    from fuse4seg.cli import _verb_in

    assert _verb_in(["data", "check", "x"]) == ("data", "check")
    assert _verb_in(["train", "--device", "cpu"]) == ("train",)
    assert _verb_in(["--version"]) is None
    parser = build_parser(only=("train",))
    args = parser.parse_args(["train", "--data", "d", "--method", "average"])
    assert args.method == "average"
    with pytest.raises(SystemExit) as stop:  # another verb's options are not there
        parser.parse_args(["metrics", "--fused", "f", "--a", "a", "--b", "b"])
    assert stop.value.code == 2


MISSPELT_SWITCHES = {"FUSE4SEG_ADAMW": "lop", "FUSE4SEG_LEADER_LAYOUT": "nhwc",
                     "FUSE4SEG_MALLOC": "jemalloc", "FUSE4SEG_EAGER": "yes",
                     "FUSE4SEG_CONVNEXT": "autgrad", "FUSE4SEG_GATE": "dense",
                     "FUSE4SEG_GRN_NORM": "vectornorm", "FUSE4SEG_ATTENTION": "heads"}


def test_every_environment_switch_has_a_misspelt_value_to_refuse():
    from fuse4seg.utils import ENV_SWITCHES

    assert sorted(MISSPELT_SWITCHES) == sorted(ENV_SWITCHES)


@pytest.mark.parametrize("name, value", sorted(MISSPELT_SWITCHES.items()))
def test_a_misspelt_environment_switch_stops_training_by_name(
        name, value, phantom_dir, tmp_path, monkeypatch, capsys):
    """A switch the package reads (fuse4seg.utils.env_setting) refuses a value it does not
    know, naming the variable and what it takes, instead of silently training the default; and
    no run is left behind."""
    monkeypatch.setenv(name, value)
    out = tmp_path / "runs"
    argv = ["train", "--method", "fuse4seg", "--profile", "smoke", "--data", str(phantom_dir),
            "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"environment variable {name}={value!r}: expected one of" in err
    assert not out.exists()  # checked before the slice cache or the run folder


def test_env_setting_reads_a_switch_case_blind_and_refuses_an_unknown_one(monkeypatch):
    from fuse4seg.utils import ENV_SWITCHES, env_setting

    monkeypatch.delenv("FUSE4SEG_ADAMW", raising=False)
    assert env_setting("FUSE4SEG_ADAMW") == ""
    monkeypatch.setenv("FUSE4SEG_ADAMW", "  Loop ")
    assert env_setting("FUSE4SEG_ADAMW") == "loop"
    monkeypatch.setenv("FUSE4SEG_ADAMW", "")
    assert env_setting("FUSE4SEG_ADAMW") == ""
    monkeypatch.setenv("FUSE4SEG_ADAMW", "fused")
    with pytest.raises(ValueError, match="FUSE4SEG_ADAMW='fused': expected one of loop"):
        env_setting("FUSE4SEG_ADAMW")
    assert set(ENV_SWITCHES) == {"FUSE4SEG_EAGER", "FUSE4SEG_MALLOC", "FUSE4SEG_ADAMW",
                                 "FUSE4SEG_LEADER_LAYOUT", "FUSE4SEG_CONVNEXT", "FUSE4SEG_GATE",
                                 "FUSE4SEG_GRN_NORM", "FUSE4SEG_ATTENTION"}


def test_env_switches_sets_switches_for_a_block_and_puts_the_environment_back(monkeypatch):
    """``env_switches`` sets and unsets switches inside its block and restores each one as it
    was (set or not) on leaving it, after an error too; an unknown name or value is refused
    before anything is set."""
    import os

    from fuse4seg.utils import env_switches

    monkeypatch.setenv("FUSE4SEG_ADAMW", "loop")
    monkeypatch.delenv("FUSE4SEG_GATE", raising=False)
    with env_switches({"FUSE4SEG_ADAMW": "", "FUSE4SEG_GATE": " Strided"}):
        assert "FUSE4SEG_ADAMW" not in os.environ
        assert os.environ["FUSE4SEG_GATE"] == "strided"
    assert os.environ["FUSE4SEG_ADAMW"] == "loop" and "FUSE4SEG_GATE" not in os.environ
    with pytest.raises(KeyError), env_switches({"FUSE4SEG_GATE": "strided"}):
        raise KeyError("inside")
    assert "FUSE4SEG_GATE" not in os.environ
    with pytest.raises(KeyError), env_switches({"FUSE4SEG_ADAMW": ""}):
        raise KeyError("inside, with a switch that was set before")
    assert os.environ["FUSE4SEG_ADAMW"] == "loop"

    writes = []

    class Watched(dict):  # os.environ as a mapping that records every write
        def __setitem__(self, key, value):
            writes.append(key)
            super().__setitem__(key, value)

        def pop(self, key, *default):
            writes.append(key)
            return super().pop(key, *default)

    monkeypatch.setattr(os, "environ", Watched(os.environ))
    with pytest.raises(ValueError, match="FUSE4SEG_GATES: not a fuse4seg switch"):
        with env_switches({"FUSE4SEG_ADAMW": "", "FUSE4SEG_GATES": "strided"}):
            pass
    with pytest.raises(ValueError, match="FUSE4SEG_GATE='dense': expected one of strided"):
        with env_switches({"FUSE4SEG_ADAMW": "", "FUSE4SEG_GATE": "dense"}):
            pass
    assert writes == []  # refused before anything was set (or put back)


def test_a_misspelt_switch_name_is_warned_about_once(monkeypatch):
    """``FUSE4SEG_ADAM=loop`` (for FUSE4SEG_ADAMW) was ignored without a word, leaving the
    default in force (helper review): a ``FUSE4SEG_*`` variable that is no switch is warned
    about, with the closest switch, once per process; the tests' own variables are not."""
    import warnings

    import fuse4seg.utils as utils

    monkeypatch.setattr(utils, "_WARNED_VARIABLES", set())
    monkeypatch.setenv("FUSE4SEG_ADAM", "loop")
    monkeypatch.setenv("FUSE4SEG_SHARED_DATA", "/nowhere")
    with pytest.warns(UserWarning) as seen:
        utils.check_env_switches()
    assert [str(w.message) for w in seen] == [
        "environment variable FUSE4SEG_ADAM: no fuse4seg switch has this name, so it changes "
        "nothing (did you mean FUSE4SEG_ADAMW? the switches: FUSE4SEG_EAGER, FUSE4SEG_MALLOC, "
        "FUSE4SEG_ADAMW, FUSE4SEG_LEADER_LAYOUT, FUSE4SEG_CONVNEXT, FUSE4SEG_GATE, "
        "FUSE4SEG_GRN_NORM, FUSE4SEG_ATTENTION)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        utils.check_env_switches()  # said once


def test_an_engine_refuses_a_misspelt_switch_it_would_never_read(monkeypatch):
    """Engine checks every switch when it is built, not only those its method reads: `average`
    builds no leader, so place_leader never reads FUSE4SEG_LEADER_LAYOUT, yet a misspelt value
    there still stops it (a caller that builds an Engine without `train` gets the same check)."""
    import torch

    from fuse4seg.config import get_config
    from fuse4seg.train.bilevel import Engine

    monkeypatch.setenv("FUSE4SEG_LEADER_LAYOUT", "nhwc")
    with pytest.raises(ValueError, match="FUSE4SEG_LEADER_LAYOUT='nhwc'"):
        Engine(get_config("smoke"), "average", torch.device("cpu"), steps_per_epoch=1)
    monkeypatch.delenv("FUSE4SEG_LEADER_LAYOUT")
    engine = Engine(get_config("smoke"), "average", torch.device("cpu"), steps_per_epoch=1)
    assert engine.leader is None


def test_study_refuses_an_unwritable_json_and_a_split_without_test_cases(phantom_dir, tmp_path,
                                                                         capsys, monkeypatch):
    """Both before any training: a --json under a file, then a split with no test patient
    (the study scores test cases, so training would be for nothing)."""
    from fuse4seg import study

    monkeypatch.setattr(study, "train_seeds", None)  # must not be reached
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    base = ["study", "--methods", "average", "--seeds", "0", "--profile", "smoke", "--data",
            str(phantom_dir), "--out", str(tmp_path / "runs")]
    assert main([*base, "--json", str(blocker / "s.json")]) == 2
    assert f"--json {blocker / 's.json'}: {blocker} is a file" in capsys.readouterr().err
    assert main([*base, "--set", "data.split_fractions=[0.67,0.33,0.0]"]) == 2
    err = capsys.readouterr().err
    assert "its split has no test case" in err and "'test': 0" in err
    # the seeds are --seeds: a train.seed set beside them would be ignored, so it is refused
    for name in ("train.seed", "seed"):  # the bare name is the same setting
        assert main([*base, "--set", f"{name}=5"]) == 2
        err = capsys.readouterr().err
        assert f"--set {name}=5: a study trains one run per seed" in err and "--seeds" in err


def test_given_names_each_argument_once_for_its_label_and_its_value():
    import argparse

    from fuse4seg.cli.common import given

    args = argparse.Namespace(data=Path("d"), t1ce=Path("t"), run=Path("r"), max_pairs=None)
    assert given(args, "--data", "--t1ce", "RUN", "--max-pairs") == [
        ("--data", Path("d")), ("--t1ce", Path("t")), ("RUN", Path("r")), ("--max-pairs", None)]
    with pytest.raises(AttributeError, match="cache"):
        given(args, "--cache")


def test_a_study_resolves_the_cache_once_and_trains_on_it(phantom_dir, tmp_path, monkeypatch):
    """run_study prepares (or finds) the raw folder's cache once and hands that cache to every
    method's runs, so the sources are not checked again per method and seed."""
    from fuse4seg import study
    from fuse4seg.config import get_config
    from fuse4seg.data import slices

    given, prepared = [], []
    real = slices.prepare_cache
    monkeypatch.setattr(slices, "prepare_cache",
                        lambda *a, **k: prepared.append(1) or real(*a, **k))

    def fake(config, method, data, out, seeds, **kwargs):
        given.append(Path(data))
        return [study.SeedResult(method, s, Path(out), None, None) for s in seeds]

    monkeypatch.setattr(study, "train_seeds", fake)
    report = study.run_study(get_config("smoke"), ["fuse4seg", "average"], phantom_dir,
                             tmp_path / "runs", seeds=[0, 1])
    assert len(prepared) == 1 and len(given) == 2 and given[0] == given[1]
    assert (given[0] / "manifest.json").is_file() and given[0].parent == tmp_path / "runs"
    assert report["data"] == str(phantom_dir) and report["comparisons"] == []


def test_a_study_scores_each_run_on_the_device_it_trained_on(tmp_path, monkeypatch):
    """``study --set train.device=cpu`` trained on the CPU but scored the test cases on
    ``auto`` (a GPU where there is one; helper review): the score takes ``--device``, else the
    config's ``train.device``."""
    from types import SimpleNamespace

    from fuse4seg import study
    from fuse4seg.config import get_config
    from fuse4seg.train import trainer

    trained, scored = [], []
    monkeypatch.setattr(trainer, "train", lambda config, *a, device=None, **k: trained.append(
        device or config.train.device) or SimpleNamespace(run_dir=tmp_path, best=None))
    monkeypatch.setattr(study, "evaluate_cached",
                        lambda *a, device, **k: scored.append(device) or {})
    config = get_config("smoke", {"train.device": "cpu"})
    study.train_one(config, "average", tmp_path, tmp_path, seed=0)
    study.train_one(config, "average", tmp_path, tmp_path, seed=0, device="auto")
    assert trained == scored == ["cpu", "auto"]


def test_a_value_the_config_refuses_is_named_by_the_item_that_gave_it(tmp_path, capsys):
    """``--set fusion.crop=1`` was refused as ``fusion.crop must be >= 2``, without the item
    (helper review): each refused value is named by its ``--set`` item or option."""
    fusion = ["fusion", "train", "--pairs", str(tmp_path), "--kind", "CT-MRI", "--out",
              str(tmp_path / "r"), "--profile", "smoke"]
    assert main([*fusion, "--set", "fusion.crop=1", "--set", "loss.beta_grad=-1"]) == 2
    assert capsys.readouterr().err == (
        "fuse4seg: error: --set fusion.crop=1: fusion.crop must be >= 2 (the leader's 3x3 "
        "depthwise convolutions reflect-pad by one pixel), got 1; --set loss.beta_grad=-1: "
        "loss.beta_grad must be a finite number >= 0, got -1.0\n")
    # every item a refusal names; a setting the verb does not read is said first, so that
    # mending the value does not meet that refusal next (helper review)
    assert main(["train", "--data", str(tmp_path), "--set", "warmup_epochs=0", "--set",
                 "rollout_epochs=0", "--set", "seed=1", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == (
        "fuse4seg: error: --set warmup_epochs=0, --set rollout_epochs=0: train.warmup_epochs "
        "and train.rollout_epochs are both 0: nothing to train\n")
    # a check that reads three settings leads with every item that gave one of them, and
    # with no item that gave a setting it did not read (lr_follower, where the rollout rate is
    # null, as in smoke)
    assert main(["train", "--data", str(tmp_path), "--profile", "smoke", "--set",
                 "lr_follower=0.002", "--set", "warmup_anneal=true", "--out",
                 str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith(
        "fuse4seg: error: --set warmup_anneal=true: train.warmup_anneal anneals the warm-up "
        "into train.lr_follower_rollout, which is null")
    assert main(["train", "--data", str(tmp_path), "--set", "lr_follower_rollout=0.002",
                 "--set", "warmup_anneal=true", "--set", "seed=2", "--set",
                 "lr_follower=0.002", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith(
        "fuse4seg: error: --set lr_follower_rollout=0.002, --set warmup_anneal=true, --set "
        "lr_follower=0.002: train.warmup_anneal anneals the warm-up into "
        "train.lr_follower_rollout, which is train.lr_follower")
    assert main([*fusion, "--set", "warmup_anneal=true"]) == 2
    assert capsys.readouterr().err.startswith(
        "fuse4seg: error: --set warmup_anneal (train.warmup_anneal): `fuse4seg fusion train` "
        "does not read train.warmup_anneal")
    assert main(["train", "--data", str(tmp_path), "--set", "seed=1", "--set", "sed=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(  # not every item its list of names names
        "fuse4seg: error: --set sed=2: unknown setting 'sed'; did you mean 'train.seed'?")
    # the list names what `train` reads, not the fusion section it refuses (a review)
    assert "Settings `fuse4seg train` reads: data." in err and "fusion." not in err
    assert "loss.alpha_decomp" in err and "train.seed" in err
    assert main(["data", "prepare", str(tmp_path), "--out", str(tmp_path / "c"), "--set",
                 "nope=1"]) == 2
    err = capsys.readouterr().err
    assert "Settings `fuse4seg data prepare` reads: data." in err and "train." not in err
    assert main(["fusion", "train", "--pairs", str(tmp_path), "--kind", "CT-MRI", "--set",
                 "train.bogus=1"]) == 2
    err = capsys.readouterr().err
    listed = err.split("Settings `fuse4seg fusion train` reads: ")[1]
    assert "fusion.steps" in listed and "train.warmup_epochs" not in listed
    assert "model.segmentation" not in listed  # what it would refuse is not offered
    # a network name is refused with the item that gave it, as other values are
    assert main(["train", "--data", str(tmp_path), "--set", "model.fusion=bogus",
                 "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith(
        "fuse4seg: error: --set model.fusion=bogus: model.fusion 'bogus': unknown fusion model")
    assert main(["train", "--data", str(tmp_path), "--seed", "3", "--set",
                 "data.crop_size=17", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.startswith(
        "fuse4seg: error: --set data.crop_size=17: data.crop_size must be a positive multiple")
    assert not (tmp_path / "r").exists()


def test_a_config_error_without_problems_is_passed_on_as_it_is():
    """``config_of``'s naming of items reads ``ConfigError.problems`` and ``.unknown``; an
    error with neither keeps its message, and the error ``config_of`` raises keeps both."""
    from fuse4seg.cli.common import _named, config_of
    from fuse4seg.config import ConfigError

    items = {"train.seed": ("seed=1", 1)}
    assert _named(ConfigError("unknown profile 'fast'"), items, {}) == "unknown profile 'fast'"
    with pytest.raises(ConfigError) as info:
        config_of("smoke", ["crop_size=17", "seed=1"], "train")
    assert str(info.value).startswith("--set crop_size=17: data.crop_size must be a positive")
    assert info.value.problems == [(("data.crop_size",), "data.crop_size must be a positive "
                                    "multiple of 16, got 17")]
    with pytest.raises(ConfigError) as info:
        config_of("smoke", ["sed=1"], "train")
    assert info.value.unknown == "sed" and str(info.value).startswith("--set sed=1: unknown")


def test_a_leader_setting_is_refused_where_no_method_has_a_leader(tmp_path, capsys):
    """``train --method average --set lr_leader=...`` was recorded and hashed into a new run
    folder, and changed nothing (helper review): refused before any work, where none of the
    methods trained has a leader; a study with one method that has one takes it."""
    from fuse4seg.train.methods import LEADER_SETTINGS, SPECS, check_method_settings

    out = tmp_path / "runs"
    assert main(["train", "--data", str(tmp_path), "--method", "average", "--set",
                 "lr_leader=1e-3", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "fuse4seg: error: --set lr_leader=1e-3: train.lr_leader is a setting of the fusion "
        "leader, which average has none, so it would change nothing; fuse4seg and disjoint_ae "
        "read it\n")
    assert main(["study", "--data", str(tmp_path), "--methods", "average", "max", "--set",
                 "loss.use_grad=false", "--out", str(out)]) == 2
    assert "which average and max have none" in capsys.readouterr().err
    assert not out.exists()
    leaderless = [name for name, spec in SPECS.items() if spec.leader is None]
    assert leaderless == ["average", "max", "direct2ch", "monai_unet"]
    for setting in LEADER_SETTINGS:
        with pytest.raises(ValueError, match="is a setting of the fusion leader"):
            check_method_settings(leaderless, {setting: (f"{setting}=x", "x")})
        check_method_settings(["average", "fuse4seg"], {setting: (f"{setting}=x", "x")})
        check_method_settings(["disjoint_ae"], {setting: (f"{setting}=x", "x")})
    check_method_settings(leaderless, {"train.lr_follower": ("lr_follower=1e-3", 1e-3)})


def test_debug_shows_the_traceback_before_the_one_line_error(tmp_path, capsys):
    missing = str(tmp_path / "none")
    for argv in (["--debug", "data", "check", missing], ["data", "check", missing, "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "DataError" in err
        assert err.rstrip().endswith(f"fuse4seg: error: {missing}: no such folder")
    assert main(["data", "check", missing]) == 2
    assert capsys.readouterr().err == f"fuse4seg: error: {missing}: no such folder\n"


def test_fusion_evaluate_refuses_a_split_for_the_single_set_of_gfp_pc(tmp_path, capsys):
    assert main(["fusion", "evaluate", "max", "--pairs", str(tmp_path), "--kind", "GFP-PC",
                 "--split", "test"]) == 2
    assert "--split test: GFP-PC has a single set" in capsys.readouterr().err


def test_check_output_file_creates_nothing(tmp_path):
    from fuse4seg.utils import check_output_file

    check_output_file(tmp_path / "new" / "deeper" / "out.json", "--json")  # fine: made later
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        check_output_file(tmp_path, "--json")


def test_outputs_never_overwrite_what_the_command_reads(tmp_path):
    """check_not_an_input: an input (also one given through a link), a data file inside an
    input folder, an output folder among the data, and a run folder's records are refused;
    other files beside the data or in a run folder are fine, on every run."""
    from fuse4seg.utils import check_not_an_input, check_output_file, check_output_folder

    data = tmp_path / "data"
    (data / "case").mkdir(parents=True)
    (data / "manifest.json").write_text("{}")
    (data / "scores.json").write_text("{}")  # an earlier `--json DATA/scores.json`
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    link = tmp_path / "link.png"
    link.symlink_to(image)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "scores.json").write_text("{}")  # an earlier `evaluate --json RUN/scores.json`
    inputs, runs = [("--data", data), ("--a", image), ("--cache", None)], [("RUN", run)]
    refused = {
        data / "manifest.json": r"is named like data \(manifest.json\) inside the input --data",
        data / "case" / "new.nii.gz": r"is named like data \(.nii.gz\) inside the input --data",
        image: "is the input --a",
        run / "run.json": "would overwrite the records of the run RUN",
        run / "val.json": "would overwrite the records of the run RUN",
        run / "checkpoints" / "x.json": "would overwrite the records of the run RUN",
    }
    for path, message in refused.items():
        with pytest.raises(ValueError, match=f"--json {path}: {message}"):
            check_output_file(path, "--json", inputs, runs)
    for fine in (data / "new.json", data / "scores.json", tmp_path / "out.json",
                 run / "scores.json", link):  # the rename replaces the link, not a.png
        check_output_file(fine, "--json", inputs, runs)
    with pytest.raises(ValueError, match="is the input --a"):  # an input given by its link
        check_output_file(image, "--csv", [("--a", link)])
    with pytest.raises(ValueError, match="lies inside the input --data"):
        check_output_folder(data / "images", "--images", inputs, runs)
    with pytest.raises(ValueError, match="is the input --data"):
        check_output_folder(data, "--images", inputs, runs)
    for taken in (run, run / "checkpoints", run / "glassbox"):
        with pytest.raises(ValueError, match="would overwrite the records of the run RUN"):
            check_output_folder(taken, "--images", inputs, runs)
    check_output_folder(run / "images", "--images", inputs, runs)
    ckpt = run / "checkpoints" / "best.pt"
    ckpt.write_bytes(b"pt")
    with pytest.raises(ValueError, match="is the input RUN"):  # a checkpoint file is an input
        check_not_an_input(ckpt, "--json", runs=[("RUN", ckpt)])
    with pytest.raises(ValueError, match="would overwrite the records of the run RUN"):
        check_not_an_input(run / "test.json", "--json", runs=[("RUN", ckpt)])


def test_evaluate_and_metrics_refuse_to_overwrite_their_inputs(phantom_dir, tmp_path, capsys):
    """The CLI's --json/--csv: refused by name before any work, the input left as it was."""
    manifest = tmp_path / "cache" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text('{"kept": true}')
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(manifest.parent), "--json",
                 str(manifest)]) == 2
    assert (f"--json {manifest}: is named like data (manifest.json) inside the input --data"
            in capsys.readouterr().err)
    assert manifest.read_text() == '{"kept": true}'
    folders = {name: tmp_path / name for name in ("F", "A", "B")}
    for folder in folders.values():
        folder.mkdir()
        (folder / "p.png").write_bytes(b"not scored: refused first")
    target = folders["A"] / "p.png"
    assert main(["metrics", "--fused", str(folders["F"]), "--a", str(folders["A"]), "--b",
                 str(folders["B"]), "--csv", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"--csv {target}: is named like data (.png) inside the input --a" in err
    assert "would take it for one of its files" in err
    assert target.read_bytes() == b"not scored: refused first"


def test_one_write_probe_serves_output_files_and_predict_folders(tmp_path, monkeypatch):
    """A folder that refuses a real file (a read-only mount: os.access says yes to root)
    is named with the flag, by the one probe both checks share."""
    import tempfile

    from fuse4seg.inference import _writable_folder
    from fuse4seg.utils import check_output_file

    def refuse(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(ValueError, match=f"--csv {tmp_path / 'm.csv'}: cannot write in "
                                         f"{tmp_path} \\(Read-only file system\\)"):
        check_output_file(tmp_path / "m.csv", "--csv")
    with pytest.raises(ValueError, match=f"--out: cannot write in {tmp_path / 'o'} "
                                         "\\(Read-only file system\\)"):
        _writable_folder(tmp_path / "o")


def test_output_folders_are_checked_first_and_named(tmp_path, capsys):
    """``--out`` given a file is refused by name before any work, by every verb that writes a
    folder (the message used to name a path inside it, from the first mkdir that failed)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    data = tmp_path / "no-data-needed"
    for argv in (["train", "--data", str(data), "--out", str(afile), "--profile", "smoke"],
                 ["data", "prepare", str(data), "--out", str(afile)],
                 ["study", "--data", str(data), "--out", str(afile), "--profile", "smoke"],
                 ["fusion", "train", "--pairs", str(data), "--kind", "PET-MRI", "--out",
                  str(afile)]):
        assert main(argv) == 2, argv
        assert f"--out {afile}: is a file, not a folder" in capsys.readouterr().err, argv


def test_a_train_cache_option_is_named_as_such(phantom_dir, tmp_path):
    from fuse4seg.config import get_config
    from fuse4seg.data.find import DataError
    from fuse4seg.train.runs import resolve_cache

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DataError, match=f"--cache {afile}: exists and is not a folder"):
        resolve_cache(phantom_dir, get_config("smoke"), cache=afile)


def test_train_on_a_bad_case_leaves_no_empty_out_folders(phantom_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "data"
    case = sorted(phantom_dir.iterdir())[0]
    shutil.copytree(case, bad / case.name)
    flair = next((bad / case.name).glob("*flair*"))
    flair.write_bytes(flair.read_bytes()[:200])  # truncated
    out = tmp_path / "runs" / "deep"
    assert main(["train", "--data", str(bad), "--out", str(out), "--profile", "smoke"]) == 2
    assert flair.name in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_an_ablation_refuses_a_method_or_a_setting_it_would_override(tmp_path, capsys):
    data, out = str(tmp_path / "d"), str(tmp_path / "o")
    base = ["train", "--data", data, "--out", out, "--profile", "smoke", "--ablation", "A"]
    assert main([*base, "--method", "average"]) == 2
    assert "--method average and --ablation A: the ablation trains fuse4seg" in (
        capsys.readouterr().err)
    assert main([*base, "--set", "loss.use_grad=true"]) == 2
    assert "--set loss.use_grad=true and --ablation A" in capsys.readouterr().err
    assert main([*base, "--set", "use_recon=true", "--set", "use_decomp=false"]) == 2
    assert ("--set use_decomp=false, --set use_recon=true and --ablation A: a Table 3 variant"
            in capsys.readouterr().err)  # each item as written
    assert not (tmp_path / "o").exists()


def test_a_study_refuses_repeated_methods_and_seeds_before_any_work(tmp_path):
    from fuse4seg.config import get_config
    from fuse4seg.study import run_study

    config, out = get_config("smoke"), tmp_path / "out"
    with pytest.raises(ValueError, match="--methods fuse4seg fuse4seg: give distinct"):
        run_study(config, ["fuse4seg", "fuse4seg"], tmp_path / "d", out, [0])
    with pytest.raises(ValueError, match=r"--seeds: give distinct seeds, got \[0, 0\]"):
        run_study(config, ["fuse4seg", "average"], tmp_path / "d", out, [0, 0])
    with pytest.raises(ValueError, match=r"--seeds: seeds must be >= 0, got \[0, -1\]"):
        run_study(config, ["fuse4seg", "average"], tmp_path / "d", out, [0, -1])
    assert not out.exists()


def test_a_negative_seed_is_refused_by_name_before_any_work(phantom_dir, tmp_path, capsys):
    """numpy refuses negative seeds deep inside (``expected non-negative integer``, after the
    cache was prepared): every way to give one is refused first, naming it."""
    data, out = ["--data", str(phantom_dir)], ["--out", str(tmp_path / "runs")]
    cases = [
        (["study", "--seeds", "0", "-1", *data, *out], "--seeds: a seed must be >= 0, got -1"),
        (["train", *data, *out, "--set", "data.split_seed=-1"],
         "data.split_seed must be >= 0, got -1"),
        (["train", *data, *out, "--set", "seed=-2"], "train.seed must be >= 0, got -2"),
        (["fusion", "train", "--pairs", str(tmp_path), "--kind", "PET-MRI", "--seed", "-1",
          *out], "--seed: a seed must be >= 0, got -1"),
    ]
    for argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse refuses an argument's value itself
            code = exc.code
        assert code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("override", "message"), [
    ({"loss.dice_smooth": -1}, "loss.dice_smooth (ε) must be a finite number > 0, got -1"),
    ({"loss.beta_grad": float("inf")}, "loss.beta_grad must be a finite number >= 0, got inf"),
    ({"loss.dice_class_weights": [0.1, -1, 1, 1]}, "loss.dice_class_weights must be finite"),
    ({"train.lr_leader": 0}, "train.lr_leader must be a finite number > 0, got 0"),
    ({"train.rollout_epochs": -1}, "train.rollout_epochs must be >= 0, got -1"),
    ({"train.seed": -3}, "train.seed must be >= 0, got -3"),
    ({"data.split_seed": -1}, "data.split_seed must be >= 0, got -1"),
])
def test_config_checks_name_the_setting(override, message):
    from fuse4seg.config import ConfigError, get_config

    with pytest.raises(ConfigError) as info:
        get_config("smoke", override)
    assert message in str(info.value)


def test_metrics_says_when_files_and_folders_are_mixed(tmp_path, capsys):
    folder, afile = tmp_path / "dir", tmp_path / "x.png"
    folder.mkdir()
    afile.write_bytes(b"")
    assert main(["metrics", "--fused", str(afile), "--a", str(folder), "--b", str(afile)]) == 2
    assert f"--a {folder}: is a folder, but --fused {afile} is a file" in (
        capsys.readouterr().err)
    assert main(["metrics", "--fused", str(folder), "--a", str(afile), "--b", str(folder)]) == 2
    assert f"--a {afile}: is a file, but --fused {folder} is a folder" in (
        capsys.readouterr().err)


def test_metrics_refuses_a_metric_its_convention_does_not_define(tmp_path, capsys):
    """``SSIM_data_range_255`` exists only in the cddfuse convention: asked for under another
    one, ``metrics`` printed NaN with no reason (helper review)."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for name in ("f", "a", "b"):
        files.append(tmp_path / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(files[-1])
    base = ["metrics", "--fused", str(files[0]), "--a", str(files[1]), "--b", str(files[2]),
            "--metrics", "SSIM,SSIM_data_range_255"]
    assert main(base) == 2
    assert ("fuse4seg: error: --metrics SSIM_data_range_255: only the cddfuse convention "
            "defines it (CDDFuse's evaluator's SSIM with data range 255), not standard: give "
            "--convention cddfuse (or all)") in capsys.readouterr().err
    assert main([*base, "--convention", "cddfuse", "--json"]) == 0
    values = json.loads(capsys.readouterr().out)["metrics"]["cddfuse"]
    assert 0 < values["SSIM_data_range_255"] < 2 and values["SSIM"] != values[
        "SSIM_data_range_255"]


def test_fusion_evaluate_checks_images_before_fusing(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code = main(["fusion", "evaluate", "max", "--pairs", str(tmp_path / "nowhere"), "--kind",
                 "PET-MRI", "--images", str(afile)])
    assert code == 2
    assert f"--images {afile}: is a file, not a folder" in capsys.readouterr().err


def test_run_folder_of_finds_the_run_of_a_folder_or_of_its_checkpoint(tmp_path, monkeypatch):
    from fuse4seg.utils import run_folder_of

    run = tmp_path / "runs" / "fuse4seg-smoke-x"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"")
    (tmp_path / "ema.pt").write_bytes(b"")
    assert run_folder_of(run) == run.resolve()
    assert run_folder_of(run / "checkpoints" / "best.pt") == run.resolve()
    monkeypatch.chdir(run / "checkpoints")
    assert run_folder_of("best.pt") == run.resolve()  # relative, from inside checkpoints/
    assert run_folder_of(tmp_path / "ema.pt") is None  # a bundle outside a run folder


def test_train_without_a_progress_bar_says_each_epoch_on_a_line(phantom_dir, tmp_path, capsys):
    """`train --no-progress` (batch jobs, log files): one plain line per epoch on stderr, with
    the validation's Dice where there was one (a review found nothing printed until the end)."""
    assert main(["train", "--method", "fuse4seg", "--profile", "smoke", "--data",
                 str(phantom_dir), "--out", str(tmp_path / "runs"), "--no-progress",
                 "--set", "train.warmup_epochs=1", "--set", "train.rollout_epochs=1"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("epoch ")]
    assert len(lines) == 2 and "\r" not in "".join(lines)
    assert lines[0].startswith("epoch 1 (warmup): L_lower ")
    assert lines[1].startswith("epoch 2 (rollout): L_lower ") and ", L_upper " in lines[1]
    assert ", val mean Dice " in lines[1] and lines[1].endswith(" s")
