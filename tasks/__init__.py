"""SeqIO tasks and mixtures. Importing this package registers them for the embedded catalog:

    from mmt_jax import tasks   # registers catalog_pretrain, catalog_color_removed100, ...

(the repository's tasks/ folder, installed as the package `mmt_jax.tasks`).

The embedded catalog (`mmt_jax/data/tfds_catalog.embedded_config()`) lives under `default_data_dir()`
and is generated there on first use (seconds). Images are prepared at 224 px with ViT statistics.

For your own catalog, after `mmt-jax data convert --jsonl F --images D --out DIR --name shop`:

    tasks.register_catalog_tasks("shop", "DIR", "shop")   # every attribute the catalog names

(tasks/catalog.py lists the tasks it makes), or in gin, by naming the task through `catalog_task`:

    MIXTURE_OR_TASK_NAME = @tasks.catalog_task()
    tasks.catalog_task.task = "attributes_removed100"
    tasks.catalog_task.prefix = "shop"
    tasks.catalog_task.data_dir = "DIR"
    tasks.catalog_task.catalog = "shop"
"""
from mmt_jax.data import tfds_catalog
from mmt_jax.tasks.catalog import (DEFAULT_ATTRIBUTES, REMOVAL_SHARES, attribute_task_names,
                                   attribute_values, catalog_attribute_names, catalog_values, catalog_task, catalog_task_record,
                                   check_text_sources, default_data_dir, has_examples,
                                   register_catalog_tasks, task_prompts)

__all__ = ["DEFAULT_ATTRIBUTES", "REMOVAL_SHARES", "attribute_task_names", "attribute_values",
           "catalog_attribute_names", "catalog_values",
           "catalog_task", "catalog_task_record", "check_text_sources", "default_data_dir",
           "has_examples", "register_catalog_tasks", "task_prompts"]


register_catalog_tasks("catalog", default_data_dir(), tfds_catalog.embedded_config().name)
