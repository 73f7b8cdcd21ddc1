"""Checkpoint I/O in one place: our orbax checkpoints (`store`: one checkpoint; `checkpointer`: the
trainer's, with `digests` and `model_dir_lock`) and the readers of other tools' weights (`hf_t5`,
`hf_vit`, `t5x_checkpoint`, `torch_pickle`). Every unreadable file is an `errors.CheckpointError`."""
