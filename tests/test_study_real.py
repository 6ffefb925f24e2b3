"""The folds and fold caches of benchmarks/study_real.py (the study itself is slow, not here)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _module():
    spec = importlib.util.spec_from_file_location("study_real", ROOT / "benchmarks/study_real.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_case_is_tested_once_and_never_trained_on_in_its_fold():
    study = _module()
    cases = [f"c{i}" for i in range(6)]
    folds = study.folds_of(cases, 3)
    tested = sorted(c for f in folds for c in f["test"])
    assert tested == cases
    for f in folds:
        assert len(f["test"]) == 2 and len(f["val"]) == 1 and len(f["train"]) == 3
        assert not set(f["test"]) & (set(f["train"]) | set(f["val"]))
    assert folds == study.folds_of(cases, 3)  # seeded


def test_too_many_folds_is_a_clear_error():
    with pytest.raises(SystemExit, match="--folds 5"):
        _module().folds_of([f"c{i}" for i in range(6)], 5)


def test_fold_cache_replaces_only_the_split(tmp_path):
    study = _module()
    cache = tmp_path / "cache"
    (cache / "cases").mkdir(parents=True)
    (cache / "manifest.json").write_text(json.dumps({"settings": {"a": 1}, "split": {}}))
    split = {"train": ["a"], "val": ["b"], "test": ["c"]}
    fold = study.fold_cache(cache, split, tmp_path / "fold0")
    manifest = json.loads((fold / "manifest.json").read_text())
    assert manifest == {"settings": {"a": 1}, "split": split}
    assert (fold / "cases").resolve() == (cache / "cases").resolve()


@pytest.mark.skipif(not SHARED.exists(), reason="no ../shared/data")
def test_the_six_visible_real_cases_are_found_in_their_three_layouts(tmp_path):
    ids = _module().link_cases([SHARED / "brats", SHARED / "brats2013"], tmp_path / "cases")
    assert len(ids) == 6
