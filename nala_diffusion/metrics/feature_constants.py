"""Names of clean-fid's feature modes and Inception weights, importable without clean-fid."""

MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
TORCHSCRIPT_WEIGHTS = "inception-2015-12-05.pt"
#: what nala-fid measures (nala_diffusion/metrics/scores.py defines IS and precision/recall)
METRICS = ("fid", "kid", "is", "pr", "sfid")
