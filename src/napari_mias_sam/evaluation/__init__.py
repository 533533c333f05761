"""How well and how fast: metrics, the sweep behind ``mias-sam evaluate``, scoring against a ground
truth (with the one 0.5-threshold baseline), the results report, the BMAD reader, and
``mias-sam benchmark`` (``benchmark``: stage times; ``bank_options``: the Dice cost of bank options).

Nothing is imported here eagerly: import the module you need (``evaluation.metrics``...)."""
