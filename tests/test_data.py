"""ImageFolder data as users bring it: 16-bit greyscale, hidden folders, truncated files."""

import io

import numpy as np
import PIL.Image
import pytest

from nala_diffusion.data.datasets import dataset_id2label, load_dataset


def test_sixteen_bit_grey_hidden_folders_and_truncated_jpegs(tmp_path, caplog):
    root = tmp_path / "images"
    for name in ("a", "b", ".ipynb_checkpoints"):
        (root / name).mkdir(parents=True)
    grey16 = PIL.Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))  # mid-grey, 16 bits
    grey16.save(root / "a" / "grey16.png")
    PIL.Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "b" / "black.png")
    PIL.Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / ".ipynb_checkpoints" / "x.png")
    buffer = io.BytesIO()
    PIL.Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG")
    (root / "b" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    dataset = load_dataset(str(root), 8)
    assert dataset_id2label(dataset) == {0: "a", 1: "b"}  # the hidden folder is not a class
    assert len(dataset) == 2 and dataset.skipped == [str(root / "b" / "truncated.jpg")]
    pixels, label = dataset[0]
    assert label == 0 and float(pixels.mean()) == pytest.approx(0.0, abs=0.01)  # mid-grey, not white (1.0)


def test_classifier_training_measures_held_out_images_only(tmp_path, capsys):
    from nala_diffusion.train.train_classifier import cli

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 3)):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                pixels = (rng.random((8, 8, 3)) * 100 + 120 * c).astype(np.uint8)
                PIL.Image.fromarray(pixels).save(tmp_path / split / f"c{c}" / f"{i}.png")
    (tmp_path / "alone" / "c0").mkdir(parents=True)
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "alone" / "c0" / "0.png")
    common = ["--resolution", "8", "--widths", "4", "8", "--epochs", "1", "--batch_size", "4"]
    assert cli(["--dataset", str(tmp_path / "alone"), "--output_dir", str(tmp_path / "x"), *common]) == 2
    assert "has no held-out images" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli(["--dataset", str(tmp_path / "train"), "--output_dir", str(tmp_path / "cls"), *common]) == 0
    import json

    metrics = json.loads((tmp_path / "cls" / "metrics.json").read_text())
    assert metrics["test_images"] == 6 and metrics["test_source"] == str(tmp_path / "test")


def test_reference_exports_are_atomic_and_recorded(tmp_path):
    from nala_diffusion.metrics.features import image_files
    from nala_diffusion.metrics.samples import export_reference

    real = tmp_path / "real"
    (real / "astronaut").mkdir(parents=True)  # what a killed export leaves: some images, no record
    PIL.Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(real / "astronaut" / "00000.png")
    with pytest.raises(ValueError, match="images of unknown origin .* pass --overwrite"):
        export_reference("builtin:photos", 32, str(real))
    export_reference("builtin:photos", 32, str(real), overwrite=True)
    assert len(image_files(str(real))) == 1000 and not list(tmp_path.glob("real.tmp-*"))
    assert export_reference("builtin:photos", 32, str(real)) == str(real)  # the same source: reused
    with pytest.raises(ValueError, match="holds the test images of builtin:photos at 32 px, not the test images of "
                                         "builtin:pairs at 32 px"):
        export_reference("builtin:pairs", 32, str(real))



def test_a_folder_exports_whole_as_a_reference_at_the_model_size(tmp_path):
    from nala_diffusion.metrics.features import image_files
    from nala_diffusion.metrics.samples import export_reference

    for name, value in (("cats", 40), ("dogs", 200)):
        (tmp_path / "held_out" / name).mkdir(parents=True)
        for i in range(2):  # not square, larger than the model: resized on the shorter side and centre-cropped
            PIL.Image.fromarray(np.full((24, 20, 3), value, np.uint8)).save(tmp_path / "held_out" / name / f"{i}.jpg")
    real = export_reference(str(tmp_path / "held_out"), 8, str(tmp_path / "real"))
    files = sorted(image_files(real))
    assert [p.split("/")[-2] for p in files] == ["cats", "cats", "dogs", "dogs"]
    for path, value in zip(files, (40, 40, 200, 200)):
        pixels = np.asarray(PIL.Image.open(path))
        assert pixels.shape == (8, 8, 3) and abs(int(pixels.mean()) - value) <= 2
    assert export_reference(str(tmp_path / "held_out"), 8, real) == real  # recorded: reused


RACE = """
import os, sys, time
from nala_diffusion.utils.locks import output_lock
folder, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
try:
    with output_lock(folder, "the race folder"):
        inside = os.path.join(folder, "inside")
        fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another holder is inside
        time.sleep(0.05)
        os.close(fd)
        os.remove(inside)
    print("held")
except ValueError as error:
    print("refused" if "being written by process" in str(error) else f"other: {error}")
"""


@pytest.mark.slow
def test_many_starters_never_hold_one_lock_together(tmp_path):
    import json
    import socket
    import subprocess
    import sys
    import time

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    outcomes = []
    for trial in range(10):
        folder = tmp_path / f"race{trial}"
        folder.mkdir()  # each race starts from a lock file left by a killed run, the case that raced before
        (folder / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
        start = time.time() + 1.5
        starters = [subprocess.Popen([sys.executable, "-c", RACE, str(folder), str(start)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for _ in range(8)]
        results = [p.communicate(timeout=120) for p in starters]
        assert all(p.returncode == 0 for p in starters), [r[1][-500:] for r in results]
        outcomes += [r[0].strip() for r in results]
        assert not (folder / "inside").exists() and not (folder / ".lock").exists()
    assert set(outcomes) <= {"held", "refused"} and "held" in outcomes
