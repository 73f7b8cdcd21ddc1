"""Stand-in for jestimator: see ../pyproject.toml."""
