#!/usr/bin/env bash
# Makes a local PostgreSQL server usable by the test suite and prints ACQHOST_TEST_PG, the libpq
# URL of a superuser connection to it, on stdout (everything else goes to stderr). Idempotent:
# an installed package, a running cluster or an existing role is left as it is.
#   Debian, as root: installs the postgresql package when missing (apt-get), creates and starts
#   the newest major version's "main" cluster, and creates a SUPERUSER LOGIN role named after
#   the calling user, who then connects over the Unix socket by peer authentication.
#   Not root: does the same where it needs no install, through sudo when it must act as postgres.
set -euo pipefail

log() { echo "postgres.sh: $*" >&2; }

# From /: the postgres user may not be allowed into the calling directory.
if [ "$(id -u)" -eq 0 ]; then
    as_postgres() { (cd / && su postgres -c "$1"); }
    as_root() { "$@"; }
else
    as_postgres() { (cd / && sudo -u postgres sh -c "$1"); }
    as_root() { sudo "$@"; }
fi

newest_version() {
    ls /usr/lib/postgresql 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -n 1
}

version="$(newest_version || true)"
# initdb and pg_ctl too: the fault tests run throwaway clusters of their own with them.
if [ -z "$version" ] || [ ! -x "/usr/lib/postgresql/$version/bin/postgres" ] \
    || [ ! -x "/usr/lib/postgresql/$version/bin/initdb" ] \
    || [ ! -x "/usr/lib/postgresql/$version/bin/pg_ctl" ] \
    || ! command -v pg_ctlcluster >/dev/null; then
    log "installing PostgreSQL from Debian's packages"
    as_root apt-get update -q >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
    version="$(newest_version)"
fi

# pg_lsclusters -h: "version cluster port status owner datadir logfile", one line a cluster.
cluster() { pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main"'; }
if [ -z "$(cluster)" ]; then
    log "creating cluster $version/main"
    as_root pg_createcluster "$version" main >&2
fi

read -r _ _ port status _ <<<"$(cluster)"
if [ "${status%%,*}" != "online" ]; then
    log "starting cluster $version/main on port $port"
    as_root pg_ctlcluster "$version" main start >&2
fi

socket_dir=/var/run/postgresql
for _ in $(seq 1 30); do
    if pg_isready -q -h "$socket_dir" -p "$port"; then
        break
    fi
    sleep 1
done
pg_isready -h "$socket_dir" -p "$port" >&2

role="$(id -un)"
if [ "$role" != postgres ]; then
    # The role name is the login name (letters, digits, _ on CI): quoted as an identifier.
    exists="$(as_postgres "psql -p $port -tAc \"SELECT 1 FROM pg_roles WHERE rolname = '$role'\"")"
    if [ "$exists" != 1 ]; then
        log "creating superuser role $role"
        as_postgres "psql -p $port -q -c 'CREATE ROLE \"$role\" SUPERUSER LOGIN'" >&2
    fi
fi

echo "postgresql:///postgres?host=$socket_dir&port=$port"
