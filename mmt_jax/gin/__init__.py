"""mmt_jax's gin files, one package per folder so that gin reads `include
'mmt_jax/gin/<folder>/<file>.gin'` as a package resource from any working directory: a user's own
runs/ or models/ folder can neither shadow nor break our includes (t5x's own
`t5x/configs/runs/*.gin` are found the same way). Our binaries also search this folder, so
`--gin_file=models/mmt4_tiny.gin` names the same file."""
