#!/bin/bash
# Start PostgreSQL on $PGDATA; on the first start (empty folder) create the cluster, with superuser
# $POSTGRES_USER / $POSTGRES_PASSWORD and database $POSTGRES_DB (default: the user's name).
# Clients on the network log in with the password (scram-sha-256); inside the container the local
# socket needs none (for pg_dump / pg_restore through `docker exec`). Arguments go to `postgres`.
set -euo pipefail

: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is not set}"
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
for name in "$user" "$db"; do
    if [[ ! $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
        echo "postgres-entrypoint: '$name' is not a plain identifier (letters, digits, _)" >&2
        exit 1
    fi
done

if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
    echo "postgres-entrypoint: creating the cluster in $PGDATA (user $user, database $db)"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb --pgdata="$PGDATA" --username="$user" --pwfile="$pwfile" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 > /dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [[ $db != postgres ]]; then
        # single-user mode: no server to start and stop for one statement
        echo "CREATE DATABASE \"$db\" OWNER \"$user\";" | postgres --single -D "$PGDATA" postgres > /dev/null
    fi
fi

exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
