"""Diffusion maths shared by training, sampling and evaluation: the learned-variance terms and the
builder of noised inputs at fixed timesteps."""
