import base64
import re
import shutil
import subprocess

import pytest

from mixcpt.report import write_report
from mixcpt.rundir import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(arm, stage, domain, general, kl, status="ok"):
    if status != "ok":
        return {
            "arm": arm,
            "stage": stage,
            "status": status,
            "model": f"/run/{arm}/{stage}",
            "scores": {},
            "retention": {},
        }
    return {
        "arm": arm,
        "stage": stage,
        "status": "ok",
        "model": f"/run/{arm}/{stage}",
        "scores": {
            "zorbax": {"acc": domain, "acc_norm": domain},
            "qa": {"exact_match": general, "contains": general},
            "text": {"perplexity": 20.0, "bits_per_byte": 1.5},
        },
        "retention": {"kl_to_base": kl, "delta": {"qa": general - 0.6, "text": 0.0}},
    }


def synthetic_results() -> dict:
    log = lambda scale: [  # noqa: E731
        {"step": s, "loss": scale / s, "learning_rate": 1e-4} for s in range(1, 30)
    ]
    return {
        "data": {
            "mix": {
                "sources": {
                    "<script>alert(1)</script>": {
                        "group": "domain",
                        "documents": 10,
                        "tokens": 5000,
                        "share": 0.5,
                        "target_share": 0.5,
                    },
                    "alpaca": {
                        "group": "instructions",
                        "documents": 30,
                        "tokens": 3000,
                        "share": 0.3,
                        "target_share": 0.25,
                    },
                    "prefs": {
                        "group": "preferences",
                        "documents": 20,
                        "tokens": 2000,
                        "share": 0.2,
                        "target_share": 0.25,
                    },
                }
            }
        },
        "stages": {
            "mixcpt/cpt": {"log_history": log(3.0) + [{"step": 29, "train_runtime": 1.0}]},
            "baseline/cpt": {"log_history": log(2.5)},
            "mixcpt/sft": {"log_history": log(1.0)},
        },
        "eval": {
            "benchmarks": {
                "zorbax": {
                    "kind": "multiple_choice",
                    "tag": "domain",
                    "main_metric": "acc_norm",
                    "higher_is_better": True,
                },
                "qa": {
                    "kind": "generation",
                    "tag": "general",
                    "main_metric": "exact_match",
                    "higher_is_better": True,
                },
                "text": {
                    "kind": "perplexity",
                    "tag": "general",
                    "main_metric": "bits_per_byte",
                    "higher_is_better": False,
                },
            },
            "rows": [
                _row("base", "base", 0.2, 0.6, 0.0),
                _row("mixcpt", "cpt", 0.7, 0.55, 0.1),
                _row("mixcpt", "sft", 0.75, 0.65, 0.2),
                _row("mixcpt", "dpo", 0.0, 0.0, 0.0, "missing"),
                _row("baseline", "cpt", 0.8, 0.3, 0.5),
                _row("baseline", "sft", 0.7, 0.4, 0.6),
                _row("baseline", "dpo", 0.0, 0.0, 0.0, "missing"),
            ],
        },
    }


@pytest.fixture
def report(tmp_path):
    run = RunDir(tmp_path / "run")
    run.update_results("data", "mix", synthetic_results()["data"]["mix"])
    for section in ("stages", "eval"):
        for key, value in synthetic_results()[section].items():
            run.update_results(section, key, value)
    return write_report(run)


def test_report_embeds_plots_and_escapes_text(report):
    html_path, md_path = report
    page = html_path.read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # domain vs general, Pareto after stage 1 and after alignment, loss curves, mixture
    assert len(images) == 5
    assert all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "missing" in page
    md = md_path.read_text()
    assert "| mixcpt | sft | 0.75 | 0.65 | 1.5 | 0.2 |" in md
    assert "&lt;script&gt;" in md and "<script>" not in md


def test_report_of_partial_results_says_what_is_missing(tmp_path):
    run = RunDir(tmp_path / "run")
    run.update_results(
        "stages",
        "mixcpt/cpt",
        {"log_history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]},
    )
    html_path, md_path = write_report(run)
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 1  # the loss curve only
    assert "No evaluation yet" in page and "data stage has not run" in page
    assert not list(run.root.glob(".*tmp*"))  # atomic writes leave no temporary files


CHROMIUM = [
    "chromium",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Counts, once the page has loaded, the Pareto images the browser decoded (a test copy of the page
# gets it: the report itself holds no script).
COUNT_PARETO = (
    '<script>addEventListener("load", () => { document.body.dataset.pareto = [...document.images]'
    '.filter(i => i.alt.startsWith("Pareto plot") && i.naturalWidth > 0).length; });</script>'
)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "report.png"
    subprocess.run(
        [*CHROMIUM, f"--screenshot={shot}", "--window-size=1200,2000", report[0].as_uri()],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 10_000

    probed = tmp_path / "probed.html"
    probed.write_text(report[0].read_text().replace("</body>", COUNT_PARETO + "</body>"))
    dom = subprocess.run(
        [*CHROMIUM, "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert 'data-pareto="2"' in dom  # after stage 1 and after alignment, both decoded
    assert dom.count("<th>frontier (loss)</th>") == 2


def test_report_shows_the_time_of_each_stage_in_build_order_and_the_whole_run(tmp_path):
    run = RunDir(tmp_path / "run")
    entry = {"processed": 40960, "unit": "tokens", "per_s": 3330.1, "reused": False}
    timing = {
        "report": {**entry, "wall_s": 0.5},  # timed after its own table: left out
        "sft/mixcpt": {"wall_s": 4.0, "processed": 240, "unit": "samples", "per_s": 60.0},
        "cpt/baseline": {**entry, "wall_s": 10.0, "reused": True},
        "cpt/mixcpt": {**entry, "wall_s": 12.3, "resumed_at_step": 20},
        "data": {"reused": True},  # reused from a build that recorded no timing
    }
    for node, value in timing.items():
        run.update_results("timing", node, value)
    html_path, md_path = write_report(run)
    md = md_path.read_text().split("## Time per stage", 1)[1]
    rows = [line for line in md.splitlines() if line.startswith("| ") and "stage" not in line]
    assert rows == [
        "| data | not recorded |  |  | reused |",
        "| cpt/mixcpt | 12.3 s | 40,960 tokens | 3,330 tokens/s | resumed at step 20 |",
        "| cpt/baseline | 10.0 s | 40,960 tokens | 3,330 tokens/s | reused |",
        "| sft/mixcpt | 4.0 s | 240 samples | 60 samples/s | built |",
    ]
    assert "Whole run: 26.3 s" in md
    assert "<h2>Time per stage</h2>" in html_path.read_text()


def test_report_lists_any_number_of_arms_with_their_stage_one_and_budgets(tmp_path):
    run = RunDir(tmp_path / "run")
    results = synthetic_results()
    arm = {
        "like": "mixcpt",
        "stream": "mix",
        "ce_weight": 1.0,
        "lssd_weight": 4.0,
        "teacher": "online",
        "stage1_shared_with": None,
        "stage1_tokens": 40960,
        "stage1_steps": 40,
        "stage1_passes": 2.0,
        "stage1_domain_tokens": 10240,
        "select": {"k": 20, "strategy": "easiest", "score": "ppl"},
        "selection_shared_with": None,
        "sft_samples": 20,
        "sft_steps": 30,
        "run_dpo": False,
        "dpo_pairs": None,
        "dpo_steps": None,
    }
    shared = {**arm, "lssd_weight": 1.0, "stage1_shared_with": "mixcpt", "stage1_tokens": None}
    run.set_results(
        "arms",
        [{**arm, "arm": f"lssd-{i}"} for i in range(12)]
        + [{**shared, "arm": "late", "select": None, "sft_samples": None}],
    )
    rows = results["eval"]["rows"]
    rows += [{**r, "arm": f"lssd-{i}"} for i in range(12) for r in rows[1:3]]
    rows.append({**rows[1], "arm": "late", "shared_with": "mixcpt"})
    run.update_results("eval", "rows", rows)
    run.update_results("eval", "benchmarks", results["eval"]["benchmarks"])
    html_path, md_path = write_report(run)
    md = md_path.read_text()
    assert (
        "| lssd-3 | mixcpt | mix stream, 1 CE + 4 LSSD (online teacher) | 40,960 tokens, 40 steps "
        "(2 passes, 10,240 domain tokens) | k=20 easiest by ppl | 20 samples, 30 steps "
        "| no DPO |" in md
    )
    assert (
        "| late | mixcpt | mix stream, 1 CE + 1 LSSD (online teacher) (the model of mixcpt) " in md
    )
    assert "| the whole pool |  | no DPO |" in md
    assert "| late | cpt (= mixcpt) | 0.7 |" in md
    page = html_path.read_text()
    # domain vs general, and Pareto after stage 1 and after alignment
    assert page.count("data:image/png;base64,") == 3
    # identical rows are one point of the Pareto plot, naming every arm
    assert "<td>mixcpt, " + ", ".join(f"lssd-{i}" for i in range(12)) + ", late</td>" in page


def test_report_shows_intervals_the_claims_table_and_error_bars(tmp_path, fake_eval_table):
    from matplotlib.container import ErrorbarContainer

    from mixcpt.evaluate.intervals import summarise
    from mixcpt.report.plots import domain_vs_general_figure

    cells = {
        ("base", "base"): {"domain": 0.25, "general": 0.8},
        ("mixcpt", "cpt"): {"domain": 0.6, "general": 0.75, "kl": 0.1},
        ("mixcpt", "sft"): {"domain": 0.6, "general": 0.7, "kl": 0.2, "chat_domain": 0.9},
        ("random-k", "sft"): {
            "domain": 0.6,
            "general": 0.7,
            "chat_domain": 0.1,
            "chat_general": 0.3,
        },
    }
    table = summarise([fake_eval_table(cells)], [0])
    run = RunDir(tmp_path / "run")
    for key in ("rows", "benchmarks", "bootstrap"):
        run.update_results("eval", key, table[key])
    run.set_results("claims", table["claims"])

    html_path, md_path = write_report(run)
    md = md_path.read_text()
    results_part = md.split("## Claims")[0]
    # plain and chat are separate columns; every cell has its interval
    assert "dom (domain, acc_norm, plain)" in results_part
    assert "dom (domain, acc_norm, chat)" in results_part
    assert re.search(r"\| mixcpt \| sft \| 0\.6 \[0\.\d+, 0\.\d+\] \|", results_part)
    assert "one seed: intervals over items only" in results_part
    claims_part = md.split("## Claims")[1].split("## Retention")[0]
    assert "| 4. Easiest-k selection" in claims_part and "✔ supported" in claims_part
    assert "random-k: 0.1 [" in claims_part  # B's number with its interval
    assert "arm traditional not in this run" in claims_part
    assert "<h2>Claims</h2>" in html_path.read_text()

    axes = domain_vs_general_figure(run.read_results()).axes[0]
    bars = [c for c in axes.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 4  # base, mixcpt cpt and sft, random-k sft
    # each bar spans the stored interval of the plotted point
    low, high = table["rows"][1]["intervals"]["axes"]["domain"]["ci"]
    spans = [seg[:, 0] for c in bars for seg in c.lines[2][0].get_segments()]
    assert any(s.min() == pytest.approx(low) and s.max() == pytest.approx(high) for s in spans)
