"""Attention-output distillation (nala-train --attention_distillation_weight)."""

import copy
import csv
import json

import pytest
import torch
from helpers import TINY, tiny_dit

from nala_diffusion import convert_dit_to_nala
from nala_diffusion.train.attention_distillation import AttentionDistillation
from nala_diffusion.train.train_nala_dit import cli as train_cli


def run(distiller, model, seed=0, grad=False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    with distiller.capture(), torch.set_grad_enabled(grad):
        model(x, timestep=torch.tensor([10, 700]), class_labels=torch.tensor([1, 2]))
    return distiller.losses()


def test_zero_for_a_student_identical_to_its_teacher_positive_otherwise():
    dit = tiny_dit(out_channels=8)
    student = convert_dit_to_nala(dit)
    same = run(AttentionDistillation(student, copy.deepcopy(student)), student)
    against_dit = run(AttentionDistillation(student, dit), student)
    assert set(same) == {"loss_attention", "loss_attention_0", "loss_attention_1"}
    assert same["loss_attention"] == 0
    own_softmax = run(AttentionDistillation(student), student)  # --init_from alone: its own projections, softmax
    assert against_dit["loss_attention"] > 0 and own_softmax["loss_attention"] > 0
    # the DiT's attention on the student's hidden states is the student's own under softmax: the same targets
    torch.testing.assert_close(against_dit["loss_attention"], own_softmax["loss_attention"])
    # the mean of the per-block terms
    assert against_dit["loss_attention"] == pytest.approx(float((against_dit["loss_attention_0"]
                                                                  + against_dit["loss_attention_1"]) / 2))


def test_gradient_reaches_the_student_only_and_softmax_blocks_are_skipped():
    dit = tiny_dit(out_channels=8)
    student = convert_dit_to_nala(dit, softmax_layers=[-1]).train()
    distiller = AttentionDistillation(student, dit)
    assert distiller.layer_indices == [0]  # block 1 runs softmax: it would distil to itself
    run(distiller, student, grad=True)["loss_attention"].backward()
    assert student.transformer_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in dit.parameters())
    with pytest.raises(ValueError, match="every block of the student runs softmax"):
        AttentionDistillation(convert_dit_to_nala(dit, attention_type="softmax"))


def test_a_conversion_run_with_attention_distillation_logs_every_block(tmp_path):
    from PIL import Image

    dit = tiny_dit(in_channels=3, out_channels=6)
    dit.save_pretrained(tmp_path / "dit")
    for c in range(10):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        Image.new("RGB", (16, 16), (25 * c, 100, 200 - 20 * c)).save(tmp_path / "data" / f"class{c}" / "0.png")
    args = ["--init_from", str(tmp_path / "dit"), "--train_data_dir", str(tmp_path / "data"), "--resolution", "8",
            "--max_train_steps", "2", "--train_batch_size", "4", "--output_dir", str(tmp_path / "run"),
            "--logging_steps", "1", "--checkpointing_steps", "2", "--report_to", "none",
            "--attention_distillation_weight", "0.5"]
    assert train_cli(args) == 0
    with open(tmp_path / "run" / "log.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["loss_attention"]]
    assert len(rows) == 2 and all(float(row["loss_attention_0"]) > 0 and float(row["loss_attention_1"]) > 0
                                  for row in rows)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["attention_distillation_weight"] == 0.5
    assert TINY["num_layers"] == 2
