"""The studies of ``nala-study``, one module each, with what they share in ``common``: kinds are data
(:class:`~nala_diffusion.eval.studies.common.Kind`), tables come from one helper."""
