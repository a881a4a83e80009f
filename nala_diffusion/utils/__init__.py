"""Infrastructure: atomic files, output locks and fingerprints, command-line helpers, distributed runs."""
