"""gin files: see mmt_jax/gin/__init__.py."""
