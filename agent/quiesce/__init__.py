"""1.a stop the application and 1.c start it again: the quiescer interface and its factory,
the crash-safe record of what is stopped, and one module per mode."""
