"""Product records, the embedded catalog, TFDS storage, SeqIO preprocessors and feature conversion."""
