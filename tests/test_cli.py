"""The command line: every verb of the design's CLI contract is wired and documented."""

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


def test_missing_file_is_a_clean_error(tmp_path, capsys):
    code = main(["predict", "--checkpoint", str(tmp_path / "nope"), "--t1ce", "a.nii.gz",
                 "--flair", "b.nii.gz", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fuse4seg: error:") and "a.nii.gz" in err
    assert not (tmp_path / "out").exists()
