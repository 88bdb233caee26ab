#!/usr/bin/env bash
# PostgreSQL for tests/test_sweep_postgres.py: Debian's server on 127.0.0.1:5432 with
# user cifarlab / password cifarlab owning database cifarlab_test. Idempotent: every
# step checks first, so running it twice (or on a machine that has it) changes nothing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
cd /  # psql run as postgres warns when it cannot read the caller's directory

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi
ver=$(ls /usr/lib/postgresql | sort -V | tail -1)

# The package creates cluster "main" unless the image disabled that (create_main_cluster = false).
if ! pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" {found = 1} END {exit !found}'; then
  pg_createcluster -p 5432 "$ver" main >/dev/null
fi
port=$(pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" {print $3}')
if [ "$port" != 5432 ]; then
  echo "postgres.sh: cluster $ver/main uses port $port, not 5432; set CIFARLAB_TEST_POSTGRES_URL" >&2
fi
if ! pg_lsclusters -h | awk -v v="$ver" '$1 == v && $2 == "main" && $4 ~ /online/ {found = 1} END {exit !found}'; then
  pg_ctlcluster "$ver" main start
fi
for _ in $(seq 60); do
  pg_isready -q -h 127.0.0.1 -p "$port" && break
  sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$port"

as_pg() { runuser -u postgres -- psql -p "$port" -qtAX "$@"; }
if [ "$(as_pg -c "SELECT 1 FROM pg_roles WHERE rolname = 'cifarlab'")" != 1 ]; then
  as_pg -c "CREATE ROLE cifarlab LOGIN PASSWORD 'cifarlab'"
fi
if [ "$(as_pg -c "SELECT 1 FROM pg_database WHERE datname = 'cifarlab_test'")" != 1 ]; then
  as_pg -c "CREATE DATABASE cifarlab_test OWNER cifarlab"
fi
