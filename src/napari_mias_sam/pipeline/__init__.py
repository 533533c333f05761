"""One volume through the method: frames, cached embeddings, nearest-neighbour distances, maps,
prompts and masks (:mod:`.segment`), and the run's settings (:mod:`.settings`)."""
