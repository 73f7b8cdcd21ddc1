"""`airio.core.dataset_providers.get_vocabularies`, which t5x calls only for AirIO tasks."""


def get_vocabularies(task):
    raise NotImplementedError(
        f"{task!r} is an AirIO task; this is the AirIO stand-in installed by mmt_jax's "
        "tools/t5x/install.sh. Install AirIO itself to use AirIO tasks.")
