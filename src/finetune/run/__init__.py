"""What one run needs around the module, below the entry points: resuming (`resume`), the RNG state (`rng`), names
of parameters and parts (`names`), DDP ranks (`distributed`), failure files and one-line errors (`failures`),
feature drift (`feature_drift`), the progress line (`progress`), and the one place that touches Lightning's
private attributes (`lightning_internals`)."""
