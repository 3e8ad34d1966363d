"""`otel-dspy-cost report RUN --html FILE`: one self-contained page, rendered by a real headless Chromium with
every host unresolvable (nothing may be fetched at view time)."""

import re
import shutil
import subprocess
import sys

import dspy
import pytest
from conftest import ResearchAgent

import otel_dspy_cost

needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian package chromium missing "
                                    "(tests/install-system-deps.sh installs it)")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "otel_dspy_cost.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def run_dir(otel, lm, tmp_path):
    """A recorded run: a RandomSearch compile, then inference under a budget that stops it."""
    train = [dspy.Example(question=f"q {i}", answer="a").with_inputs("question") for i in range(4)]
    optimizer = dspy.BootstrapFewShotWithRandomSearch(metric=lambda e, p, t=None: float(len(p.answer) % 2),
                                                      max_bootstrapped_demos=1, max_labeled_demos=1,
                                                      num_candidate_programs=1, num_threads=1)
    out = tmp_path / "run"
    with otel_dspy_cost.record_run(out, budget=otel_dspy_cost.budget(limit_usd=0.004, warn_at=0.5, label="html")), \
            dspy.context(lm=lm):
        program = optimizer.compile(ResearchAgent(), trainset=train, valset=train[:2])
        try:
            for i in range(50):
                program(question=f"after {i}")
        except otel_dspy_cost.BudgetExceededError:
            pass
    return out


@needs_chromium
def test_the_page_renders_offline_with_spend_against_the_budget_trials_and_modules(run_dir, tmp_path):
    page = tmp_path / "report.html"
    out = _cli("report", str(run_dir), "--html", str(page), "--json")
    assert out.returncode == 0, out.stderr
    report = __import__("json").loads(out.stdout)
    text = page.read_text()
    assert not re.search(r"<script[^>]+src=", text) and "cdn.plot.ly" not in text.replace("https://cdn.plot.ly", "")
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--host-resolver-rules=MAP * ~NOTFOUND", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    # plotly ran in the browser: both charts drawn as SVG, with the budget's limit and warn lines labelled
    assert dom.count('class="main-svg"') >= 4, dom[:2000]  # two SVG layers per chart
    assert "Spend over time" in dom and "Trials: score against cost" in dom
    assert "limit $0.004" in dom and "warn at 50% ($0.002)" in dom
    # every module row of `report --json`, with its calls and USD, in the page's table
    table = dom[dom.index('<table id="modules">'):]
    for name, row in report["module"].items():
        assert re.search(rf"<t[dh]>{re.escape(name)}</t[dh]><t[dh]>{row['calls']}</t[dh]>", table), name
    # each trial is a point: its number is the point's text
    assert len(report["trials"]) >= 2
    for trial in report["trials"]:
        assert f'>{trial["trial"]}<' in dom


def test_without_plotly_the_report_says_how_to_get_it(run_dir, tmp_path):
    code = ("import sys; sys.modules['plotly'] = None; from otel_dspy_cost.cli import main; "
            f"sys.exit(main(['report', {str(run_dir)!r}, '--html', {str(tmp_path / 'r.html')!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert 'pip install "otel-dspy-cost[report]"' in out.stderr


def test_an_unwritable_html_path_is_refused_before_any_work(run_dir, tmp_path):
    out = _cli("report", str(run_dir), "--html", str(tmp_path / "no" / "such" / "dir" / "r.html"))
    assert out.returncode == 2 and "cannot write there" in out.stderr and "spend by module" not in out.stdout
