"""Building blocks shared by the T5, MMT4 and MoEMoE models."""
