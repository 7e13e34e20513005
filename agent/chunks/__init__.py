"""The `chunks` data format: deduplicated data generations (docs/chunks-format.md).

A room of its own, between the steps that use it (source, sink, recovery) and the stores and
core modules below it: ids, blobs, packs, indexes, the chunker, the builder, the dedup cache,
restore, export, garbage collection.
"""
