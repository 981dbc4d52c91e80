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
        assert f"beats the pass index alone in {f['z_beats_pass_index']} ({f['z_beats_where']}" in flat
        assert f["z_beats_pass_index"] == "0" or "not robust to leaving out the observer's placeholder z" in flat
        chance = round(int(f["pass_index_comparisons"]) * 0.025)  # one-sided: the CI's lower end above 0
        assert (f"{f['pass_index_beaten']} of {f['pass_index_comparisons']} signal-setting comparisons with the "
                f"pass index ({f['pass_index_comparisons_distinct']} distinct); with 95% intervals, about {chance} "
                f"would beat it by chance, and {f['robust_beats']} still beats it both with the zero-gradient steps "
                f"left out and with the placeholder z left out ({f['robust_beats_where']};") in flat


def test_the_bullets_on_reuse_weight_divergence_and_caps_quote_the_committed_figures():
    """Every figure of the README's bullets on reuse harm, the per-pass signals, DWD and the paper's rule
    against its cap is claims.reuse_figures()'s, in the sentence that names it."""
    f = claims.reuse_figures()
    section = README[README.index("## Does the gate fire when it should?"):README.index("The first study (5 seeds")]
    llm = README[README.index("- **The real pretrained LLM"):README.index("```bash\npython benchmarks/rlvr/study.py")]
    flat, flat_llm = " ".join(section.split()), " ".join(llm.split())
    phrases = [f"is {f['addition: K=8 minus K=1']} in addition", f"{f['reverse: K=8 minus K=1']} in reverse",
               f"{f['reverse, tied: K=8 minus K=1']} in the tied variant"]
    for k in (2, 4, 8):
        phrases.append(f"K={k} minus K=1 {'is ' if k == 2 else ''}{f[f'SmolLM2: K={k} minus K=1']} "
                       f"({f[f'SmolLM2: K={k} seeds']} seeds)")
    phrases += [f"K=1 itself ends at {f['SmolLM2: K=1 final by seed']} on seeds",
                f"(peaks {f['SmolLM2: K=1 peak by seed']})",
                f"K=8 at {f['SmolLM2: K=8 final by seed']} (peaks {f['SmolLM2: K=8 peak by seed']})"]
    g = claims.figures()
    phrases += [f"{g['cap_above']} of {g['cap_comparisons']} comparisons with a CI lies above 0 and "
                f"{g['cap_below']} below"]
    for where in g["z_measured_where_it_beats"].split("; "):
        name, value = where.split(": ")
        phrases.append(f"{'SmolLM2' if name.startswith('SmolLM2') else name}'s z scores {value}")
    phrases.append(f"{g['robust_beats']} still beats it ({g['robust_beats_where']})")
    phrases.append(f"({g['pass_index_comparisons_distinct']} distinct: the energy ranks passes as")
    for p in phrases:
        assert p in flat, p
    norm = f["SmolLM2: lm_head gradient norm / pass 1's, passes >= 2"]
    share = f["SmolLM2: share of passes that lowered the probe, per arm and pass"]
    early, late = f["SmolLM2: lm_head/rest per pass, passes 1-4"], f["SmolLM2: lm_head/rest per pass, passes 5-8"]
    k8_run, k1_run = f["SmolLM2: lm_head/rest over K=8's run"], f["SmolLM2: lm_head/rest over K=1's run"]
    run = f"{k8_run} times over K=8's runs (mean over seeds; {k1_run} over K=1's)"
    llm_phrases = [f"the lm_head gradient norm is {norm} of the", f"is {share} per arm and pass index",
                   f"changes {early} times as much as the rest of the model per pass in passes 1-4 and {late} "
                   "times in passes 5-8", run]
    for arm, name in (("dgg4", "K=4"), ("dgg8", "K=8")):
        if f"SmolLM2: {arm} minus its cap, final" in f:
            llm_phrases.append(f"the paper's rule at {name} minus its fixed cap")
            llm_phrases.append(f"{f[f'SmolLM2: {arm} minus its cap, final']} in final accuracy "
                               f"({f[f'SmolLM2: {arm} minus its cap, seeds']} seed")
            llm_phrases.append(f"{f[f'SmolLM2: {arm} minus its cap, auc']} in the area under the accuracy curve")
    for p in llm_phrases:
        assert p in flat_llm, p
