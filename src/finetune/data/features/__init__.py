"""Cached features (strategy=cached, lp_ft's probe): the cache's keys and folder (`cache`), extracting and serving
an entry (`cached`), and the datamodule of a phased run that switches from features to images (`phased`)."""
