"""Evaluation tools of nala_diffusion (installed as ``nala_diffusion.eval``)."""
