"""The bottom layer: the config (schema, config: the only place YAML is read), the data on the device, the model
family and its hand-written backward, encodings, losses, optimisers and schedules, errors, and the run folder's
files. Imports nothing above it (pyproject.toml: import-linter's layers contract)."""
