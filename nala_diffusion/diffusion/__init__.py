"""Diffusion maths shared by training, sampling and evaluation: :mod:`.objectives` (what a model was
trained to predict, the one function that noises data, the model's timestep and the conversion to a
scheduler's convention), :mod:`.noising` (noised copies at fixed timesteps for the measurement tools)
and :mod:`.learned_variance` (the learned-variance terms)."""
