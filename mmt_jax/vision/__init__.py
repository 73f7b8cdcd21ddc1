"""Image feature representators (MMT4 Fig. 4): an image -> a sequence of feature vectors."""
