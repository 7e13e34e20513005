"""Monitoring: what the agent tells the tools beside it. Every job's outcome and figures are
recorded on disk (`state`), from which the long-lived `cron` process serves Prometheus
metrics and the status page (`server`), and a node_exporter textfile is written (`metrics`);
pings (healthchecks protocol) and notifications (Apprise) go out as jobs start and end.

    message      the one message model of the alert mail and the notifications
    state        the record of runs, stores and the certificate (JSON, rewritten atomically)
    context      where an agent's monitors report: role, name, state file, settings
    hooks        the monitors, chosen from one name → module table: record, ping, notify
    record       keeps the state and the textfile
    pings        healthchecks.io protocol: <url>/start, <url>, <url>/fail
    notify       Apprise: the same messages as the mail
    metrics      the Prometheus metrics of a state
    statuspage   the status page of a state (server-rendered HTML, inline SVG)
    server       /metrics and / on METRICS_PORT
    certificate  the sink's SSH certificate expiry (`ssh-keygen -L`)

Monitoring never fails a job: every monitor's failure is logged as a warning.
"""
