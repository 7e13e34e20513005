"""What every job runs in: step timing, interrupts, the job lock, logging, disk space, alerts,
child processes, and the cron entrypoint with its health status."""
