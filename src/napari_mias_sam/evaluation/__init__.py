"""How well and how fast: metrics, the sweep behind ``mias-sam evaluate``, scoring against a ground
truth, the results report, the BMAD reader and ``mias-sam benchmark``.

Nothing is imported here eagerly: import the module you need (``evaluation.metrics``...)."""
