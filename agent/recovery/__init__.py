"""Reading generations back: restore (step 4), safe extraction, verify and list."""
