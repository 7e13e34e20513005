#!/bin/bash
# The demo application: a small "shop" that records an order every few seconds in /data and
# logs a line every second to /logs. It stops promptly and cleanly on SIGTERM.
trap 'echo "$(date -u +%FT%T.%NZ) stopping" >> /logs/app.log; exit 0' TERM
mkdir -p /data/orders /data/catalog
if [ ! -e /data/catalog/products.db ]; then       # the first start: a catalog to back up
    head -c 8000000 /dev/urandom > /data/catalog/products.db
    for n in $(seq 1 100); do head -c 2000 /dev/urandom > "/data/catalog/image-$n.jpg"; done
fi
echo "$(date -u +%FT%T.%NZ) started" >> /logs/app.log
i=$(( $(ls /data/orders | wc -l) * 5 ))   # orders are every 5th beat: never rewrite one
while true; do
    i=$((i + 1))
    if [ $((i % 5)) -eq 0 ]; then
        printf 'order %d at %s\n' "$i" "$(date -u +%FT%TZ)" > "/data/orders/order-$(printf %06d "$i").txt"
    fi
    echo "$(date -u +%FT%T.%NZ) heartbeat $i" >> /logs/app.log
    sleep 1 & wait $!
done
