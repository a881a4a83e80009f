"""The scores of the evaluation suite, as the DiT, LiT and DiG papers report them: one file for every
metric computed from features.

- **FID** (Heusel et al. 2017) and **KID** (Binkowski et al. 2018): clean-fid's formulas on the
  features' statistics (:func:`statistics`) and on the features (KID's subsets drawn with a fixed
  seed).

- **Inception Score** (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) over 10 splits, mean and
  standard deviation, from the network's class logits (Inception: its output layer without the bias,
  as the guided-diffusion evaluator and StyleGAN's metrics use it). The samples are put in a fixed
  pseudo-random order first (torch-fidelity's default, seed 2020): the definition assumes samples in
  random order, and a folder sorted by class would put one class in each split (IS 1.2 instead of
  about 7 on the built-in photos' held-out crops).
- **Precision and recall** (Kynkäänniemi et al. 2019): each set's manifold is the union of balls
  around its features with the radius of the k-th nearest neighbour (k = 3, the sample itself not
  counted); precision is the share of generated samples inside the reference manifold, recall the
  share of reference samples inside the generated one. Distances are computed by row blocks, so
  50,000 x 50,000 never sits in memory.
- **sFID** (Nash et al. 2021): the Fréchet distance of spatial features (the first 7 channels of
  Inception's ``mixed_6/conv``, 17 x 17 positions) instead of the pooled ones.

The formulas are torch-fidelity's (``isc_features_to_metric``, ``calculate_precision_recall_part``):
this module chooses the settings of the standard definition (torch-fidelity's shuffle before the IS
splits; k = 3) and a row-block size.
"""

from typing import Tuple

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid

from nala_diffusion.metrics.feature_constants import METRICS  # noqa: F401  (re-exported)

IS_SPLITS = 10
#: images per split an Inception Score needs: with one, every split's p(y) is its own p(y|x) and the score is 1
IS_MIN_PER_SPLIT = 2
IS_MIN_SAMPLES = IS_SPLITS * IS_MIN_PER_SPLIT
PR_NEIGHBOURS = 3
#: rows of a distance block (block x all the other set's features, float32): 1000 x 50,000 is 200 MB
PR_BLOCK_ROWS = 1000


#: the order of the samples before the IS splits: torch-fidelity's default
IS_SHUFFLE_SEED = 2020


def statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """clean-fid's Frechet distance, at least 0: a squared distance, whose round-off can fall a hair below
    0 for two identical sets (printed as -0.0000)."""
    return max(0.0, float(cleanfid_fid.frechet_distance(mu1, sigma1, mu2, sigma2)))


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, seed: int = 0) -> float:
    state = np.random.get_state()
    np.random.seed(seed)  # clean-fid draws its KID subsets from numpy's global generator
    try:
        return float(cleanfid_fid.kernel_distance(features1, features2))
    finally:
        np.random.set_state(state)


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> Tuple[float, float]:
    """(mean, std) of the Inception Score of ``(N, classes)`` logits (anything whose softmax is
    p(y|x)), over ``splits`` splits [i N / splits, (i + 1) N / splits) of the samples permuted by
    ``numpy.random.RandomState(IS_SHUFFLE_SEED).permutation(N)``."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or len(logits) < splits * IS_MIN_PER_SPLIT:
        raise ValueError(f"the Inception Score over {splits} splits needs at least {splits * IS_MIN_PER_SPLIT} samples "
                         f"({IS_MIN_PER_SPLIT} per split: one image per split always scores 1) of (N, classes) "
                         f"logits, got shape {logits.shape}")
    from torch_fidelity.metric_isc import isc_features_to_metric

    result = isc_features_to_metric(torch.from_numpy(logits).double(), splits=splits, shuffle=True,
                                    rng_seed=IS_SHUFFLE_SEED)
    return result["inception_score_mean"], result["inception_score_std"]


def precision_recall(generated: np.ndarray, reference: np.ndarray, neighbours: int = PR_NEIGHBOURS,
                     block_rows: int = PR_BLOCK_ROWS) -> Tuple[float, float]:
    """(precision, recall) of ``generated`` against ``reference`` features, ``(N, D)`` and ``(M, D)``,
    with ``neighbours``-NN balls; in float32 as the guided-diffusion evaluator computes them."""
    generated, reference = np.asarray(generated), np.asarray(reference)
    for name, feats in (("generated", generated), ("reference", reference)):
        if feats.ndim != 2 or len(feats) <= neighbours:
            raise ValueError(f"precision/recall need more than {neighbours} {name} samples of (N, D) features, "
                             f"got shape {feats.shape}")
    if generated.shape[1] != reference.shape[1]:
        raise ValueError(f"feature sizes differ: generated {generated.shape[1]}, reference {reference.shape[1]}")
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    precision, recall = calculate_precision_recall_part(
        torch.from_numpy(generated).float(), torch.from_numpy(reference).float(), neighborhood=neighbours,
        batch_size=block_rows)
    return float(precision), float(recall)


def suite(features: np.ndarray, reference: np.ndarray, logits=None) -> dict:
    """Inception Score (from ``logits(features)``, where the extractor has them) and precision/recall of
    sample ``features`` against ``reference`` features, as the quality tool and the studies report them
    beside FID; a metric is None where there are too few samples for it."""
    result = {"is_mean": None, "is_std": None, "precision": None, "recall": None}
    if logits is not None and len(features) >= IS_MIN_SAMPLES:
        result["is_mean"], result["is_std"] = inception_score(logits(features))
    if min(len(features), len(reference)) > PR_NEIGHBOURS:
        result["precision"], result["recall"] = precision_recall(features, reference)
    return result
