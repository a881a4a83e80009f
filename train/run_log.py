"""A CSV training log that survives resumes: rows after the resumed step are dropped, then appended to."""

import csv
import os
from typing import Dict

from nala_diffusion.utils.files import written_atomically

COLUMNS = ("step", "loss", "loss_target", "loss_distill", "loss_distill_variance", "loss_vlb", "lr", "images_per_second",
           "responding_fraction")


class CsvLog:
    def __init__(self, path: str, keep_until_step: int = 0, extra_columns=()):
        self.path = path
        self.columns = (*COLUMNS, *extra_columns)
        rows = []
        if os.path.exists(path) and keep_until_step > 0:
            with open(path, newline="", encoding="utf-8") as handle:
                rows = [r for r in csv.DictReader(handle) if r.get("step", "").isdigit() and int(r["step"]) <= keep_until_step]
        with written_atomically(path, ".csv") as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: Dict[str, float]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore").writerow(row)
