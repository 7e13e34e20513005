"""The crash-safe swap of restored contents and its journal: shared by step 1 (which repairs an
interrupted restore before it backs anything up) and restore (step 4)."""
