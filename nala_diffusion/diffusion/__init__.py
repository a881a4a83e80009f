"""Diffusion maths shared by training, sampling and evaluation: the learned-variance terms."""
