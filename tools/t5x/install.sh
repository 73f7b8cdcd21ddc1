#!/usr/bin/env bash
# Installs t5x, at the commit mmt_jax's adapter was verified against, into the Python environment
# that holds mmt_jax, without touching its JAX stack:
#
#   bash tools/t5x/install.sh                 # from the mmt_jax checkout, with .venv/bin/python
#   PYTHON=/path/to/python bash tools/t5x/install.sh
#   T5X_SOURCE=/path/to/t5x/checkout bash tools/t5x/install.sh   # a local copy of that commit
#
# t5x is not on the package index and its setup.py pins jax, flax, optax, clu and seqio to their git
# heads, so it is installed with --no-deps, and its own pure-Python dependencies are installed under
# constraints that hold every JAX-stack package at the version already installed. AirIO and
# jestimator, which t5x imports at start-up but mmt_jax never uses, get the stand-ins in
# tools/t5x/standins/ only where the real modules do not import.
set -euo pipefail

T5X_COMMIT=cc342d419ec3e3e9c4bf1df33c82330cafdc1e16  # google-research/t5x, 2026-04-21
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$here/../../.venv/bin/python}"
SOURCE="${T5X_SOURCE:-git+https://github.com/google-research/t5x@$T5X_COMMIT}"

if ! "$PYTHON" -c "import mmt_jax" 2>/dev/null; then
  echo "error: $PYTHON cannot import mmt_jax; install mmt_jax first (or set PYTHON)" >&2
  exit 2
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
constraints="$work/constraints.txt"
"$PYTHON" -m pip freeze --all | grep -iE \
  '^(jax|jaxlib|flax|optax|orbax-checkpoint|clu|seqio|numpy|tensorflow|tensorstore|absl-py)==' \
  > "$constraints"

# pip's log is shown only if pip fails: with --no-deps it always warns that t5x's git-pinned
# requirements are "not installed", which is the point.
pip_install() {
  "$PYTHON" -m pip install -q "$@" > "$work/pip.log" 2>&1 || { cat "$work/pip.log" >&2; exit 1; }
}
pip_install --no-deps "$SOURCE"
pip_install -c "$constraints" cached_property chex "fiddle>=0.2.5" jaxtyping
for module in airio.core jestimator.amos; do
  if ! "$PYTHON" -c "import $module" 2>/dev/null; then
    cp -r "$here/standins/${module%%.*}" "$work/"  # built there, not in the checkout
    pip_install --no-deps "$work/${module%%.*}"
    echo "stood in for ${module%%.*} (tools/t5x/standins/${module%%.*})"
  fi
done
"$PYTHON" -c "import t5x.train, t5x.eval, t5x.infer, mmt_jax.t5x.models" > "$work/import.log" 2>&1 || {
  cat "$work/import.log" >&2; echo "error: t5x does not import beside mmt_jax (above)" >&2; exit 1; }
echo "t5x ${T5X_COMMIT:0:12} installed for $PYTHON"
