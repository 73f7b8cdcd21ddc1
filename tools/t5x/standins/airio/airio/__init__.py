"""Stand-in for AirIO: see ../pyproject.toml."""
