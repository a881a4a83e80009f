"""Image-quality metrics: feature extractors (Inception, the domain classifier), reference
statistics, the scores (FID, KID, IS, precision/recall, sFID) and the evaluation samples."""
