"""Collections of image-text pairs too large for one process: reading them (`sources`), embedding them into
shards across ranks (`embed`, `shards`) and cleaning them (`filter`).

Nothing is imported here; import the submodules (the optional dependency pyarrow loads only where used).
"""
