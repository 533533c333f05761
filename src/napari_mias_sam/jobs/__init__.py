"""What the command line and the widget share: checks before work (preflight), bank builds from
files and datasets, a run's outputs, PNG runs and the demo."""
