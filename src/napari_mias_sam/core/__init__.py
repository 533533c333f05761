"""The foundation every layer may import: errors, defaults (each once), paths, the machine,
termination, atomic outputs, progress types, records. It imports nothing else of the package."""
