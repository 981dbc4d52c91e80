"""The README's and the demo's figures about the studies are the committed JSONs' (benchmarks/rlvr/claims.py
computes them; nothing here is typed by hand): a new unit or a rerun that changes a figure fails this test until
the text is updated with it."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.rlvr import claims  # noqa: E402

from dgg_kernels import demo  # noqa: E402

README = (REPO / "README.md").read_text()


def test_the_readmes_table_is_the_committed_results():
    assert claims.knowing_table() in README


def test_the_introduction_and_the_demo_quote_the_committed_figures():
    f = claims.figures()
    intro = README[: README.index("## Usage")]
    for text in (intro, demo.STUDY):
        flat = " ".join(text.split())
        assert f"none of the {f['stop_rules']} stop-rule arms tested ({f['stop_rule_runs']} distinct runs" in flat
        assert f["stop_rule_wins"] == "0"  # the text says none beats its replay control or the best fixed K
        assert f"in {f['z_settings']} settings (AUROC {f['z_range']})" in flat
        assert f["z_beats_pass_index"] == "0" and "not shown better than the pass index" in flat
