"""The source agent: step 1 (mirror, archive, hand over), and its side of the transport:
2 push to the sink store, and the SSH gateway a pulling sink talks to."""
