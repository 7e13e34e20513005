#!/bin/sh
# Initialise the cluster on first start, then run the server on the Unix socket only.
set -e
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    initdb --auth=trust --username=postgres >/dev/null
fi
exec postgres -c listen_addresses= -c unix_socket_directories=/run/pg \
    -c log_checkpoints=on "$@"
