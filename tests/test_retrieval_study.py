"""The retrieval study's bookkeeping: gap shares pair each run with the anchors of its own seed, and a
kind whose seeds disagree on its order against ReLU linear gets a third seed (anchors included)."""

import pytest
import torch
from safetensors.torch import load_file

from nala_diffusion.eval.studies import retrieval as study
from nala_diffusion.eval.studies.common import Kind
from nala_diffusion.eval.study import parse_args

# mean retrieval gain per (kind, seed) of a fake study: nala_b is above ReLU linear on seed 0 only
GAINS = {("softmax", 0): 0.013, ("softmax", 1): 0.012, ("softmax", 2): 0.014,
         ("relu_linear", 0): 0.001, ("relu_linear", 1): 0.002, ("relu_linear", 2): 0.002,
         ("nala_a", 0): 0.007, ("nala_a", 1): 0.007, ("nala_a", 2): 0.0,
         ("nala_b", 0): 0.0015, ("nala_b", 1): 0.0015, ("nala_b", 2): 0.004}


def fake_run(kind, seed):
    return {"seed": seed, "gain": {"mean_gain": GAINS[kind, seed]}}


def test_gap_share_uses_the_anchors_of_the_same_seed():
    results = {"runs": {"softmax": [fake_run("softmax", 1), fake_run("softmax", 0)],
                        "relu_linear": [fake_run("relu_linear", 0), fake_run("relu_linear", 1)],
                        "nala_a": [fake_run("nala_a", 0), fake_run("nala_a", 1), fake_run("nala_a", 2)]}}
    # seed 2 has no anchors: no share; the anchors' lists in another order change nothing
    assert study.gap_closed(results, "nala_a") == pytest.approx([0.5, 0.5])
    assert not study.order_disagrees(results, "nala_a")
    results["runs"]["nala_b"] = [fake_run("nala_b", 0), fake_run("nala_b", 1)]
    assert study.gap_closed(results, "nala_b") == pytest.approx([0.5 / 12, -0.05])
    assert study.order_disagrees(results, "nala_b") and not study.order_disagrees(results, "relu_linear")
    del results["runs"]["softmax"]
    assert study.gap_closed(results, "nala_b") == [] and not study.order_disagrees(results, "nala_b")


def test_a_kind_whose_seeds_disagree_gets_a_third_seed_with_the_anchors(tmp_path, monkeypatch):
    trained = []

    def train(out, name, extra, steps, seed, args, dataset):
        kind = name[len("retrieval_"):name.rindex("_s")]
        trained.append((kind, seed))
        return {"folder": str(tmp_path / name), "seed": seed, "seconds_per_step": 0.1, "kind": kind}

    measured = {}
    monkeypatch.setattr(study, "train", train)
    monkeypatch.setattr(study, "cached", lambda path, compute: measured.setdefault(path, compute()))
    monkeypatch.setattr(study.retrieval, "measure", lambda folder, *a, **k: {
        "gain": {"mean_gain": GAINS[trained[-1]]}})
    monkeypatch.setattr(study, "forward_costs", lambda out, kinds, tokens=None: {})
    monkeypatch.setattr(study, "plot_retrieval", lambda results, path: None)
    monkeypatch.setitem(study.RETRIEVAL_VARIANTS, "nala_a", Kind("nala"))
    monkeypatch.setitem(study.RETRIEVAL_VARIANTS, "nala_b", Kind("nala", {"inhibit": "cosine"}))
    args = parse_args(["--study", "retrieval", "--out", str(tmp_path), "--seeds", "0", "1"])
    args.kinds, args.architecture = ["softmax", "relu_linear", "nala_a", "nala_b"], dict(study.RETRIEVAL_ARCHITECTURE)
    results = study.retrieval_study(args, [])
    assert trained[8:] == [("softmax", 2), ("relu_linear", 2), ("nala_b", 2)]  # nala_a agreed: no seed 2
    assert [r["seed"] for r in results["runs"]["nala_b"]] == [0, 1, 2]
    assert study.gap_closed(results, "nala_b") == pytest.approx([0.5 / 12, -0.05, 2 / 12])
    args.tiebreak_seed = False
    trained.clear()
    assert [r["seed"] for r in study.retrieval_study(args, [])["runs"]["nala_b"]] == [0, 1]
    assert ("nala_b", 2) not in trained


def test_report_only_trains_nothing_and_names_the_runs_still_to_train(tmp_path, monkeypatch):
    asked = []

    def train(out, name, extra, steps, seed, args, dataset):  # reads study_run.json back for a finished run
        asked.append(name)
        return {"folder": str(tmp_path / "runs" / name), "seed": seed, "seconds_per_step": 0.1}

    monkeypatch.setattr(study, "train", train)
    monkeypatch.setattr(study, "cached", lambda path, compute: compute())
    monkeypatch.setattr(study.retrieval, "measure", lambda folder, *a, **k: {
        "gain": {"mean_gain": GAINS[folder.split("retrieval_")[1].rsplit("_s", 1)[0], int(folder[-1])]}})
    monkeypatch.setattr(study, "forward_costs", lambda out, kinds, tokens=None: {})
    monkeypatch.setattr(study, "plot_retrieval", lambda results, path: None)
    monkeypatch.setitem(study.RETRIEVAL_VARIANTS, "nala_b", Kind("nala", {"inhibit": "cosine"}))
    args = parse_args(["--study", "retrieval", "--out", str(tmp_path), "--seeds", "0", "1", "--report_only"])
    args.kinds, args.architecture = ["softmax", "relu_linear", "nala_b"], dict(study.RETRIEVAL_ARCHITECTURE)
    with pytest.raises(ValueError, match="no finished retrieval runs"):
        study.retrieval_study(args, [])
    assert asked == []
    # finished: both anchors on seeds 0-2 and nala_b on seeds 0 and 1, whose order disagrees (seed 2 is not there)
    finished = [*(f"retrieval_{k}_s{s}" for k in study.ANCHORS for s in (0, 1, 2)), "retrieval_nala_b_s0",
                "retrieval_nala_b_s1"]
    for name in finished:
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "study_run.json").write_text("{}")
    results = study.retrieval_study(args, [])
    assert sorted(asked) == sorted(finished)  # only finished runs were asked for
    assert results["missing"] == ["retrieval_nala_b_s2"]
    assert [r["seed"] for r in results["runs"]["softmax"]] == [0, 1, 2]  # the anchors' seed 2 joins the table
    assert [r["seed"] for r in results["runs"]["nala_b"]] == [0, 1]


def test_forward_costs_are_timed_once_for_a_set_of_kinds_and_serve_its_subsets(tmp_path, monkeypatch):
    from nala_diffusion.eval import timing

    timed = []

    def interleaved_medians(calls, device, repeats):
        timed.append(sorted(calls))
        return {kind: float(len(kind)) for kind in calls}

    monkeypatch.setattr(timing, "interleaved_medians", interleaved_medians)
    monkeypatch.setattr(study, "kind_model", lambda out, extra: None)
    (tmp_path / "model_config.json").write_text('{"patch_size": 4}')
    assert study.forward_costs(str(tmp_path), ["softmax", "relu_linear"], tokens=16)["seconds"] == {
        "softmax": 7.0, "relu_linear": 11.0}
    assert study.forward_costs(str(tmp_path), ["softmax"], tokens=16)["seconds"] == {"softmax": 7.0}
    assert timed == [["relu_linear", "softmax"]]  # the subset was read back, not timed
    assert set(study.forward_costs(str(tmp_path), ["softmax", "elu_linear"], tokens=16)["seconds"]) == {
        "softmax", "elu_linear"}
    assert timed[-1] == ["elu_linear", "softmax"]  # a kind not timed before: all of them again, in one run


def test_kinds_as_data_give_the_flags_the_recorded_runs_were_trained_with():
    """Every study kind is an attention type plus options; the nala-train flags made from it are those
    of the runs recorded under docs/results/ (whose records keep their meaning)."""
    import glob
    import json
    import os

    from nala_diffusion.eval.studies.norm import NORM_VARIANTS
    from nala_diffusion.eval.studies.quality import VARIANTS

    results = os.path.join(os.path.dirname(__file__), "..", "docs", "results")
    checked = set()
    for path in glob.glob(os.path.join(results, "retrieval_calibrated", "runs", "*", "study_run.json")):
        kind = os.path.basename(os.path.dirname(path))[len("retrieval_"):].rsplit("_s", 1)[0]
        with open(path, encoding="utf-8") as handle:
            recorded = json.load(handle)["arguments"]
        if kind == "conversion_anchor":  # the conversion arms' softmax model, trained as the softmax kind
            assert study.RETRIEVAL_VARIANTS["softmax"].train_flags() == recorded
        elif isinstance(study.RETRIEVAL_VARIANTS[kind], study.ConversionArm):
            seed = os.path.basename(os.path.dirname(path)).rsplit("_s", 1)[1]
            assert recorded[0] == "--init_from" and recorded[1].endswith(f"retrieval_conversion_anchor_s{seed}"), kind
            assert study.RETRIEVAL_VARIANTS[kind].train_flags(recorded[1]) == recorded, kind
        else:  # a tracked kind trains in chunks, one checkpoint per chunk
            variant = study.RETRIEVAL_VARIANTS[kind]
            chunks = ["--checkpointing_steps", str(variant.track_every)] if variant.track_every else []
            assert [*variant.train_flags(), *chunks] == recorded, kind
        checked.add(kind)
    assert len(checked) >= 10
    for variants, record in ((VARIANTS, "results.json"), (NORM_VARIANTS, os.path.join("norm", "results.json"))):
        with open(os.path.join(results, record), encoding="utf-8") as handle:
            scratch = json.load(handle)["scratch"]
        assert set(scratch) == set(variants)
        for kind, runs in scratch.items():
            assert all(variants[kind].train_flags() == run["arguments"] for run in runs), kind
    with pytest.raises(ValueError, match="does not take"):
        Kind("softmax", {"inhibit": "cosine"})
    assert Kind("nala", {"use_gate": False}).train_flags() == ["--attention", "nala", "--no-use_gate"]


def test_conversion_arms_start_from_the_anchor_with_their_distillation_flags():
    arms = {k: v for k, v in study.RETRIEVAL_VARIANTS.items() if isinstance(v, study.ConversionArm)}
    assert sorted(arms) == sorted(f"convert_{t}_{a}" for t in ("nala", "relu_linear")
                                  for a in ("zero_shot", "noise", "output_distill", "attention_distill"))
    nala = arms["convert_nala_attention_distill"]
    assert nala.train_flags("A") == ["--init_from", "A", *study.NALA.train_flags(), "--teacher", "A",
                                     "--attention_distillation_weight", "0.5"]
    assert arms["convert_nala_noise"].train_flags("A") == ["--init_from", "A", *study.NALA.train_flags()]
    assert arms["convert_relu_linear_zero_shot"].train_flags("A")[-2:] == ["--learning_rate", "0"]
    assert [arms[k].steps(10000) for k in ("convert_nala_zero_shot", "convert_nala_noise")] == [1, 3000]


def run_tiny_study(tmp_path, steps, kinds):
    """The retrieval study on a 2-block, 8-wide model, seed 0 only; returns its folder and results.json."""
    import json

    from nala_diffusion.eval.study import main

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 4,
                                  "norm_num_groups": 1}))
    out = tmp_path / "study"
    argv = ["--study", "retrieval", "--out", str(out), "--steps", str(steps), "--seeds", "0", "--batch_size", "4",
            "--retrieval_images", "4", "--model_config", str(config), "--no-tiebreak_seed", "--kinds", *kinds]
    assert main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_conversion_arms_run_through_the_study(tmp_path):
    out, results = run_tiny_study(tmp_path, 4, ["softmax", "relu_linear", "convert_nala_zero_shot",
                                                "convert_nala_attention_distill"])
    assert set(results["runs"]) == {"softmax", "relu_linear", "convert_nala_zero_shot", "convert_nala_attention_distill"}
    weights = "transformer/diffusion_pytorch_model.safetensors"
    anchor = load_file(out / "runs" / "retrieval_conversion_anchor_s0" / weights)
    zero_shot = load_file(out / "runs" / "retrieval_convert_nala_zero_shot_s0" / weights)
    # zero-shot: the anchor's weights, converted (sigma calibrated, nothing trained)
    assert set(zero_shot) - set(anchor) == {f"transformer_blocks.{i}.attn1.processor.log_norm_scale" for i in range(2)}
    assert all(torch.allclose(zero_shot[k], anchor[k], atol=1e-6) for k in anchor)
    kinds = [layer["kind"] for layer in results["runs"]["convert_nala_zero_shot"][0]["mass"].values()]
    assert kinds == ["nala", "nala"]
    log = (out / "runs" / "retrieval_convert_nala_attention_distill_s0" / "log.csv").read_text()
    assert "loss_attention" in log.splitlines()[0]


@pytest.mark.slow
def test_a_tracked_kind_trains_in_chunks_as_one_run_and_records_the_mass_after_each(tmp_path, monkeypatch):
    monkeypatch.setitem(study.RETRIEVAL_VARIANTS, "nala_tracked", study.NALA.but(learning_rate=3e-3, track_every=2))
    monkeypatch.setitem(study.RETRIEVAL_VARIANTS, "nala_plain", study.NALA.but(learning_rate=3e-3))
    out, results = run_tiny_study(tmp_path, 5, ["softmax", "relu_linear", "nala_tracked", "nala_plain"])
    track = results["runs"]["nala_tracked"][0]["partner_mass_track"]
    assert list(track) == ["2", "4", "5"] and all(len(layers) == 2 for layers in track.values())
    assert "Last-layer partner mass during training" in (out / "results.md").read_text()
    # chunks resumed from their checkpoints end where one uninterrupted run of the same flags ends
    weights = "transformer/diffusion_pytorch_model.safetensors"
    tracked = load_file(out / "runs" / "retrieval_nala_tracked_s0" / weights)
    plain = load_file(out / "runs" / "retrieval_nala_plain_s0" / weights)
    assert tracked.keys() == plain.keys()
    assert all(torch.allclose(tracked[k], plain[k], rtol=1e-5, atol=1e-6) for k in plain)


def test_the_round_two_table_in_the_docs_gives_the_recorded_gap_shares():
    """docs/results.md copies the study's table as --report_only wrote it, and writes its round-two table
    by hand from the records: every row's gap shares per seed are those the recorded runs give, and no
    kind recorded for round two is left out."""
    import json
    import os
    import re

    docs = os.path.join(os.path.dirname(__file__), "..", "docs")
    with open(os.path.join(docs, "results", "retrieval_calibrated", "results.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    with open(os.path.join(docs, "results.md"), encoding="utf-8") as handle:
        text = handle.read()

    def block(page, start):  # from ``start`` to the blank line after the table that follows it
        return page[start:page.index("\n\n", page.index("| --- |", start))]

    round_two_table = block(text, text.index("| kind | gap share (per seed)", text.index("**The round-two table.**")))
    written = {}
    for row in round_two_table.splitlines()[2:]:
        kind, shares = (cell.strip() for cell in row.strip("|").split("|")[:2])
        written[kind.split()[0]] = re.findall(r"-?\d+\.\d{3}\b", shares.split("(mean")[0])
    kinds = list(study.RETRIEVAL_VARIANTS)
    round_two = kinds[kinds.index("nala_cosine_sharp2"):]  # the study's kinds from round two on
    assert len(round_two) >= 17 and set(round_two) <= set(written)
    for kind, shares in written.items():
        assert shares == [f"{share:.3f}" for share in study.gap_closed(results, kind)], kind
    with open(os.path.join(docs, "results", "retrieval_calibrated", "results.md"), encoding="utf-8") as handle:
        made = handle.read()
    header = "Quality and cost per kind (mean ± sd over seeds"
    copied, own = (block(page, page.index(header)) for page in (text, made))
    assert copied == own  # the study's table, as --report_only last wrote it
