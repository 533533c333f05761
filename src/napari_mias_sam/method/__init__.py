"""The method on arrays, free of models and files: preprocessing and the model frame, the paper's
reference encoding, patch features, anomaly maps, prompts (with :class:`~.prompts.Prompt`) and
regions with levels from normal data."""
