"""Sampling above the training size (``nala-study --study highres``, and the quality study's high
resolution): direct and progressive, attention sharpness off and auto, scored on training-size crops."""

from __future__ import annotations

import os
import sys
import time
from typing import List, Optional

import numpy as np
import PIL.Image
import torch

from nala_diffusion.assets import demo_pipeline_path
from nala_diffusion.eval.studies.common import cached, markdown_table, mean_std, write_results
from nala_diffusion.metrics.samples import balanced_labels, save_png_atomically
from nala_diffusion.pipelines.request import SamplingRequest
from nala_diffusion.utils.files import save_grid_atomically
from nala_diffusion.utils.run_guard import pipeline_weights_hash


def highres(run: str, out: str, args, real_stats, extractor, classifier=None, sharpness=("off",),
            name: Optional[str] = None, real_feats=None) -> List[dict]:
    """Sampling at 2x and 4x the training side, direct and progressive (and each ``sharpness``
    setting), scored on random training-size crops. Cached under ``name`` (default: the folder's
    name) and the hash of the pipeline's weights, so that two models in folders named alike, or new
    weights in the same folder, never share results."""
    key = f"{name or os.path.basename(run.rstrip('/'))}_{pipeline_weights_hash(run)[:12]}"
    suffix = "" if tuple(sharpness) == ("off",) else "_" + "_".join(sharpness)
    return cached(os.path.join(out, "scores", f"{key}_highres{suffix}.json"),
                  lambda: _highres(run, os.path.join(out, "highres", key), args, real_stats, extractor, classifier,
                                   sharpness, real_feats))


def crop_accuracy(classifier, crops: torch.Tensor, labels: torch.Tensor) -> float:
    """The classifier's accuracy on training-size crops (N, 3, s, s) in [0, 1], labelled by their image."""
    with torch.no_grad():
        predictions = torch.cat([classifier(chunk).argmax(-1) for chunk in crops.split(256)])
    return float((predictions == labels).float().mean())


def _highres(run: str, crop_root: str, args, real_stats, extractor, classifier, sharpness, real_feats=None
             ) -> List[dict]:
    from nala_diffusion import NaLaDiTHighResPipeline
    from nala_diffusion.eval.timing import PeakBytes
    from nala_diffusion.metrics import features
    from nala_diffusion.metrics import scores as metrics_lib
    pipe = NaLaDiTHighResPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    side = pipe.default_sample_size
    labels = balanced_labels(args.highres_samples, pipe.num_classes)
    rows = []
    settings = [(1, "direct", "off")] if classifier is not None else []  # the training size, for reference
    settings += [(f, m, s) for f in (2, 4) for m in ("direct", "progressive") for s in sharpness]
    for factor, mode, setting in settings:
        # at the training size every image is one crop: as many images as there are crops above it
        batch = labels if factor > 1 else balanced_labels(args.highres_samples * args.crops_per_image, pipe.num_classes)
        request = SamplingRequest(height=factor * side, width=factor * side, highres_mode=mode, steps=args.sample_steps,
                                  guidance=args.guidance, attention_sharpness=setting)
        start = time.perf_counter()
        out = pipe(batch, generator=[torch.Generator().manual_seed(i) for i in range(len(batch))], output_type="np",
                   **request.pipeline_kwargs())
        seconds = (time.perf_counter() - start) / len(batch)
        images = out.images
        probe = PeakBytes()
        with probe:
            pipe(batch[:1], generator=torch.Generator().manual_seed(0), output_type="np", **request.pipeline_kwargs())
        folder = f"{factor}x_{mode}" + ("" if setting == "off" else f"_{setting}")
        crops_dir = os.path.join(crop_root, folder)
        os.makedirs(crops_dir, exist_ok=True)
        grid = torch.from_numpy(images[: min(len(images), 10)]).permute(0, 3, 1, 2)
        save_grid_atomically(grid, os.path.join(crop_root, f"{folder}.png"), nrow=min(len(grid), 5))
        rng = np.random.RandomState(0)
        crops, crop_labels = [], []
        for i, image in enumerate(images):
            for j in range(args.crops_per_image if factor > 1 else 1):
                y, x = rng.randint(0, image.shape[0] - side + 1, size=2)
                pixels = (image[y:y + side, x:x + side] * 255).round().astype(np.uint8)
                save_png_atomically(PIL.Image.fromarray(pixels), os.path.join(crops_dir, f"{i:04d}_{j:02d}.png"))
                crops.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
                crop_labels.append(batch[i])
        feats = features.folder_features(crops_dir, extractor, "cpu", verbose=False)
        row = {"factor": factor, "mode": mode, "sharpness": setting, "side": factor * side, "seconds_per_image": seconds,
               "peak_mib_one_image": probe.peak / 2**20, "crop_fid": metrics_lib.frechet_distance(*metrics_lib.statistics(feats), *real_stats),
               "crops": len(crops)}
        if real_feats is not None:  # the rest of the suite on the crops, as the scores beside FID
            suite = metrics_lib.suite(feats, real_feats, extractor.logits)
            row.update({"crop_is": suite["is_mean"], "crop_precision": suite["precision"], "crop_recall": suite["recall"]})
        if classifier is not None:
            row["crop_accuracy"] = crop_accuracy(classifier, torch.stack(crops), torch.tensor(crop_labels))
        report = out.stages[-1].get("attention_report")
        if report:
            row["attention_sharpness"] = {layer: v["sharpness"] for layer, v in report["layers"].items()}
        rows.append(row)
    return rows


def highres_tables(results: dict) -> str:
    lines = [f"Command: `{results['command']}`", ""]
    lines += markdown_table(
        ["model", "side", "mode", "sharpness", "crop accuracy", "crop FID", "crop IS", "crop precision", "crop recall",
         "s/image", "peak MiB (one image)"],
        ([name, r["side"], r["mode"], r["sharpness"], f"{r.get('crop_accuracy', float('nan')):.3f}", f"{r['crop_fid']:.4g}",
          *(mean_std([r.get(k)]) for k in ("crop_is", "crop_precision", "crop_recall")), f"{r['seconds_per_image']:.3g}",
          f"{r['peak_mib_one_image']:.1f}"] for name, rows in results["highres"].items() for r in rows))
    lines += [""] + markdown_table(["model", "side", "mode", "sharpness per layer (auto)"], (
        [name, r["side"], r["mode"], ", ".join(f"{v:.3g}" for v in r["attention_sharpness"].values())]
        for name, rows in results["highres"].items() for r in rows if r.get("attention_sharpness")))
    return "\n".join(lines) + "\n"


def highres_study(args, argv, context) -> int:
    """The pipelines of ``--highres_models`` (default: the shipped demo) at 1x, 2x and 4x the training side."""
    models = dict(item.split("=", 1) for item in (args.highres_models or [f"nala={demo_pipeline_path()}"]))
    results = {"command": " ".join(["nala-study", *(argv if argv is not None else sys.argv[1:])]), "highres": {}}
    for name, folder in models.items():
        results["highres"][name] = highres(folder, args.out, args, context.real_stats, context.extractor,
                                           context.classifier, ("off", "auto"), name=name, real_feats=context.real_feats)
    return write_results(args.out, results, highres_tables)
