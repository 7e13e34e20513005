"""The sink agent: step 2 in pull mode and step 3 (fetch over SSH + rsync, verify, move into
the sink store, rotate, acknowledge)."""
