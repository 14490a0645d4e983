"""Commands over finished runs: export and the runs listing."""
