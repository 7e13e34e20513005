"""Pure logic and formats, with no I/O beyond their own files: generation ids, the manifest,
retention, the data archive format, encryption, the handover's layout. Imports nothing else of the
agent."""
