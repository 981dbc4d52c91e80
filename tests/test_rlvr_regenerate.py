"""The committed RLVR results .md files are what the committed code writes from the committed JSONs (one source
for each rule): the three per-task files (`python benchmarks/rlvr_reuse.py --from-json ... --out
benchmarks/results`) and the study summary (`python benchmarks/rlvr/study.py --summary-only --out
benchmarks/results`), regenerated into a temp dir and compared byte for byte.  No training is run."""
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.rlvr import cli, report, study  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
STEMS = ("rlvr_reuse", "rlvr_vocab", "rlvr_vocab_tied")
MDS = [f"{s}_results.md" for s in STEMS] + ["rlvr_study.md"]


def _regenerate(tmp_path_factory, sub: str, summaries) -> Path:
    """A copy of the committed results JSONs of ``RESULTS/sub`` (and its study stamp) under
    <tmp>/benchmarks/results/<sub>, each variant's md files rewritten from its JSON by ``rlvr_reuse.py --from-json``
    and then ``summaries()`` run, from <tmp> with the committed commands' relative paths (the md records its
    command).  Plots are not drawn: the md lists what make_plots writes (report.plot_files; checked below)."""
    root = tmp_path_factory.mktemp("regen")
    rel = "benchmarks/results" + (f"/{sub}" if sub else "")
    out = root / rel
    out.mkdir(parents=True)
    for name in [f"{s}_results.json" for s in STEMS] + ["rlvr_study.json"]:
        shutil.copy(RESULTS / sub / name, out)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(report, "make_plots", lambda res, an, stem: report.plot_files(res, stem))
        for s in STEMS:
            cli.main(["--from-json", f"{rel}/{s}_results.json", "--out", rel])
        summaries()
    return out


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    """The committed study's md files as the entry points write them from its JSONs."""
    return _regenerate(tmp_path_factory, "", lambda: study.main(["--summary-only", "--out", "benchmarks/results"]))


@pytest.mark.parametrize("name", MDS)
def test_committed_md_is_what_the_generators_write(regenerated, name):
    assert (regenerated / name).read_bytes() == (RESULTS / name).read_bytes()


@pytest.mark.parametrize("stem", STEMS)
def test_rewriting_the_analysis_leaves_the_committed_json_as_it_is(regenerated, stem):
    name = f"{stem}_results.json"
    assert (regenerated / name).read_bytes() == (RESULTS / name).read_bytes()


def test_the_verdicts_carry_the_reanalysis_and_not_the_old_claims(regenerated):
    for name in MDS:
        md = (regenerated / name).read_text()
        assert "without tuning K" not in md and "coin control" not in md
        assert "**What these data support**" in md and "chosen leave-one-seed-out" in md
    # addition's evaluation items occur in its warm-up data: not called held-out there; reverse's do not
    add = (regenerated / "rlvr_reuse_results.md").read_text()
    assert "held-out" not in add and "Evaluation set: 256 fixed problems drawn from the warm-up's distribution" in add
    assert "Held-out: 256 fixed problems" in (regenerated / "rlvr_vocab_results.md").read_text()


def test_plot_files_are_what_make_plots_writes(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.rlvr import reanalysis as R

    res = R.load(str(RESULTS / "rlvr_vocab_results.json"))
    stem = str(tmp_path / "rlvr_vocab")
    assert report.make_plots(res, res["analysis"], stem) == report.plot_files(res, stem)
    assert all(os.path.exists(p) for p in report.plot_files(res, stem))


# -- the controls design (benchmarks/results/controls/): the same, from its committed JSONs --------------------------

CONTROLS = RESULTS / "controls"


@pytest.fixture(scope="module")
def regenerated_controls(tmp_path_factory):
    """The controls design's md files rewritten from its committed JSONs by the entry points a reader would run:
    ``rlvr_reuse.py --from-json`` per variant (results md, and the controls analysis: AUROCs with their
    bootstraps, replay/cap/leave-one-seed-out comparisons), ``study.py --design controls --summary-only`` and
    ``reanalysis.py --results``.  About a minute per variant on a 2-core CPU (the bootstraps)."""
    from benchmarks.rlvr import reanalysis as R

    def summaries():
        study.main(["--design", "controls", "--summary-only", "--out", "benchmarks/results"])
        R.main(["--results", "benchmarks/results/controls", "--out", "benchmarks/results/controls"])

    return _regenerate(tmp_path_factory, "controls", summaries)


@pytest.mark.parametrize("name", [f"{s}_results.md" for s in STEMS] + [f"{s}_controls.md" for s in STEMS]
                         + ["rlvr_study.md", "rlvr_reanalysis.md"])
def test_the_controls_designs_md_is_what_the_generators_write(regenerated_controls, name):
    assert (regenerated_controls / name).read_bytes() == (CONTROLS / name).read_bytes()


@pytest.mark.parametrize("stem", STEMS)
def test_the_controls_analysis_json_is_what_the_generators_write(regenerated_controls, stem):
    name = f"{stem}_controls.json"
    assert (regenerated_controls / name).read_bytes() == (CONTROLS / name).read_bytes()
