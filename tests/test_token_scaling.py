"""The token-scaling reading puts retrieval records of several token counts side by side, from the records alone."""

import json
import shlex
import shutil
from pathlib import Path

import pytest
from PIL import Image

from nala_diffusion.eval.studies.retrieval import gap_closed
from nala_diffusion.eval.studies.token_scaling import main, per_kind, read_record
from nala_diffusion.eval.study import main as study_main

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def test_the_table_and_figure_come_from_the_records(tmp_path, capsys):
    records = {64: RESULTS / "retrieval_calibrated", 256: RESULTS / "retrieval_tokens" / "patch2"}
    out = tmp_path / "token_scaling"
    assert main(["--records", *(f"{tokens}={folder}" for tokens, folder in records.items()), "--out", str(out)]) == 0
    table = (tmp_path / "token_scaling.md").read_text()
    small = read_record(str(records[64]))
    shares = gap_closed(small, "hybrid_nala")
    assert len(shares) >= 2 and all(f"{s:+.3f}" in table for s in shares)  # the hybrid's per-seed shares, as recorded
    assert per_kind(small)["nala_calibrated"][0]["entropy"] == list(small["runs"]["nala_calibrated"][0]["mass"].values())[-1]["entropy"]
    rows = [line for line in table.splitlines() if line.startswith("| 256 |")]
    assert {row.split(" | ")[1] for row in rows} >= {"softmax", "relu_linear"}
    anchors = per_kind(read_record(str(records[256])))  # the gain ratio pairs the anchors of each seed
    paired = [s for s in anchors["softmax"] if s in anchors["relu_linear"]]
    ratios = ", ".join(f"{anchors['softmax'][s]['gain'] / anchors['relu_linear'][s]['gain']:.2f}" for s in paired)
    assert paired and all(row.split(" | ")[4] == ratios for row in rows)
    with Image.open(tmp_path / "token_scaling.png") as image:
        assert image.size[0] > 600


def test_a_bad_record_is_named(tmp_path, capsys):
    assert main(["--records", "64", "--out", str(tmp_path / "x")]) == 2
    assert "TOKENS=FOLDER" in capsys.readouterr().err
    assert main(["--records", f"64={tmp_path}", "--out", str(tmp_path / "x")]) == 2
    assert "holds no results.json" in capsys.readouterr().err


@pytest.mark.parametrize("tokens", ["patch2", "patch1"])
def test_report_only_rebuilds_each_token_counts_table_from_its_records(tmp_path, tokens):
    """docs/results/retrieval_tokens/<patch>: the recorded command with --report_only writes the table that is
    committed, from the runs' records and the cached forward costs alone (nothing trained, measured or timed)."""
    recorded = RESULTS / "retrieval_tokens" / tokens
    copy = tmp_path / tokens
    shutil.copytree(recorded, copy, ignore=shutil.ignore_patterns("*.png"))
    argv = shlex.split(json.loads((recorded / "results.json").read_text())["command"])[1:]
    argv[argv.index("--out") + 1] = str(copy)
    argv[argv.index("--model_config") + 1] = str(copy / "model_config.json")
    if "--report_only" not in argv:
        argv.append("--report_only")
    assert study_main(argv) == 0

    def scores(folder):  # every cached score, by name and content: none is measured or timed again
        return {f.name: f.read_bytes() for f in sorted((folder / "scores").iterdir())}

    assert scores(copy) == scores(recorded)

    def tables(text):  # the report without its first line (the command, which names the folder)
        return text.split("\n", 1)[1]

    assert tables((copy / "results.md").read_text()) == tables((recorded / "results.md").read_text())
