#!/usr/bin/env bash
# Installs (Debian packages, when missing) and starts the services consign's
# tests need, idempotently: on a fresh machine, and where they already run.
#
#   PostgreSQL  127.0.0.1:5432, trust auth for local connections, users
#               `postgres` and `root` (superusers), database `test`,
#               wal_level=logical (for CDC peers such as Debezium), TLS
#               with a test CA (/etc/postgresql/<v>/main/consign-tls/ca.crt).
#   MariaDB     127.0.0.1:3306, user `consign` password `consign` (all
#               privileges: the tests create databases), database `test`;
#               `root` keeps unix_socket for the OS root.
#   Kafka       Apache Kafka's jars from Maven Central, resolved from
#               test-support/kafka/pom.xml into a cache outside the repository
#               (scripts/kafka.sh); the tests start the brokers themselves.
#
# Usage: scripts/services.sh [postgres] [mariadb] [kafka]   (no argument: all)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }
say() { printf '%s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=""
apt_install() {
    if [ -z "$apt_updated" ]; then
        as_root apt-get update -qq >&2
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >&2
}

# --- PostgreSQL --------------------------------------------------------------

PG_PORT=5432

pg_version() {
    # Newest installed server version, e.g. 15 ("" when no server is installed).
    ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -1
}

ensure_roles() {
    local psql=(psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA)
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'root'")" != 1 ]; then
        "${psql[@]}" -c "CREATE ROLE root SUPERUSER LOGIN" >&2
    fi
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'test'")" != 1 ]; then
        "${psql[@]}" -c "CREATE DATABASE test" >&2
    fi
    say "PostgreSQL on 127.0.0.1:$PG_PORT ($("${psql[@]}" -c 'SHOW server_version'), wal_level $("${psql[@]}" -c 'SHOW wal_level'))"
}

# A test CA and a server certificate it signs (localhost, 127.0.0.1), made
# once. The TLS tests find the CA as ca.crt beside the server's
# ssl_cert_file; they also make a CA of their own, which must be refused.
pg_tls_certificates() {
    local dir="$1"
    if as_root test -s "$dir/server.crt" && as_root test -s "$dir/ca.crt"; then
        return
    fi
    say "making a test CA and a server certificate in $dir"
    local work
    work="$(mktemp -d)"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=consign test CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
        "keyUsage=digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" >"$work/ext"
    openssl x509 -req -in "$work/server.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
        -CAcreateserial -days 3650 -extfile "$work/ext" -out "$work/server.crt" 2>/dev/null
    as_root mkdir -p "$dir"
    as_root install -m 0644 "$work/ca.crt" "$work/server.crt" "$dir/"
    as_root install -m 0600 -o postgres -g postgres "$work/server.key" "$dir/"
    rm -rf "$work"
}

postgres() {
    step "PostgreSQL"
    # A server someone else runs (not a Debian cluster of this machine): use
    # it as it is.
    if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p "$PG_PORT" \
        && ! pg_lsclusters --no-header 2>/dev/null | awk '$3 == '"$PG_PORT"' && $4 == "online"' | grep -q .; then
        say "a PostgreSQL server not managed here already listens on $PG_PORT; using it"
        ensure_roles
        return
    fi
    if [ -z "$(pg_version)" ] || [ ! -x "/usr/lib/postgresql/$(pg_version)/bin/postgres" ]; then
        say "no PostgreSQL server installed; installing Debian's postgresql"
        apt_install postgresql postgresql-contrib
    fi
    local version conf_dir
    version="$(pg_version)"
    conf_dir="/etc/postgresql/$version/main"
    if [ ! -d "$conf_dir" ]; then
        say "creating cluster $version/main"
        as_root pg_createcluster "$version" main --port "$PG_PORT" >&2
    fi

    local tls_dir="$conf_dir/consign-tls"
    pg_tls_certificates "$tls_dir"

    # Settings: one file of ours in conf.d, rewritten only when it changes.
    local wanted changed=""
    wanted="$(cat <<EOF
# Managed by consign's scripts/services.sh (test machine settings).
listen_addresses = '127.0.0.1'
port = $PG_PORT
wal_level = logical
max_wal_senders = 10
max_replication_slots = 10
max_connections = 400
shared_buffers = 256MB
# Per-statement costs for profiling (CREATE EXTENSION pg_stat_statements in a
# database to read them); no effect on the tests.
shared_preload_libraries = 'pg_stat_statements'
# TLS with a test CA (ca.crt beside the certificate), for the TLS tests.
ssl = on
ssl_cert_file = '$tls_dir/server.crt'
ssl_key_file = '$tls_dir/server.key'
EOF
)"
    as_root mkdir -p "$conf_dir/conf.d"
    if [ "$(as_root cat "$conf_dir/conf.d/consign.conf" 2>/dev/null)" != "$wanted" ]; then
        printf '%s\n' "$wanted" | as_root tee "$conf_dir/conf.d/consign.conf" >/dev/null
        changed=1
    fi
    if ! as_root grep -q "^include_dir = 'conf.d'" "$conf_dir/postgresql.conf" \
        && ! as_root grep -q "^include_dir" "$conf_dir/postgresql.conf"; then
        echo "include_dir = 'conf.d'" | as_root tee -a "$conf_dir/postgresql.conf" >/dev/null
        changed=1
    fi
    local hba
    hba="$(cat <<'EOF'
# Managed by consign's scripts/services.sh: a test machine, trust on loopback.
local   all             all                                     trust
host    all             all             127.0.0.1/32            trust
host    all             all             ::1/128                 trust
local   replication     all                                     trust
host    replication     all             127.0.0.1/32            trust
host    replication     all             ::1/128                 trust
EOF
)"
    if [ "$(as_root cat "$conf_dir/pg_hba.conf")" != "$hba" ]; then
        printf '%s\n' "$hba" | as_root tee "$conf_dir/pg_hba.conf" >/dev/null
        changed=1
    fi

    local status
    status="$(pg_lsclusters --no-header 2>/dev/null | awk -v v="$version" '$1 == v && $2 == "main" { print $4 }')"
    if [ "$status" = "online" ] && [ -n "$changed" ]; then
        say "settings changed; restarting $version/main"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main restart >&2
    elif [ "$status" != "online" ]; then
        say "starting $version/main"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2
    fi
    for _ in $(seq 1 60); do
        pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break
        sleep 0.5
    done
    pg_isready -h 127.0.0.1 -p "$PG_PORT" >&2 || {
        say "error: PostgreSQL does not accept connections on 127.0.0.1:$PG_PORT"
        say "its log: /var/log/postgresql/postgresql-$version-main.log"
        exit 1
    }

    ensure_roles
}

# --- MariaDB -----------------------------------------------------------------

MARIADB_PORT=3306

mariadb_tcp() {
    mariadb --protocol=TCP -h 127.0.0.1 -P "$MARIADB_PORT" -u consign -pconsign "$@"
}

mariadb_server() {
    step "MariaDB"
    if ! [ -x /usr/sbin/mariadbd ]; then
        say "MariaDB missing; installing Debian's mariadb-server"
        apt_install mariadb-server mariadb-client
    fi
    local conf=/etc/mysql/mariadb.conf.d/99-consign.cnf changed="" wanted
    wanted="$(cat <<EOF
# Managed by consign's scripts/services.sh (test machine settings).
[mysqld]
bind-address = 127.0.0.1
port = $MARIADB_PORT
max_connections = 400
# Durability as in production: the crash tests rely on committed = on disk.
innodb_flush_log_at_trx_commit = 1
EOF
)"
    if [ "$(as_root cat "$conf" 2>/dev/null)" != "$wanted" ]; then
        printf '%s\n' "$wanted" | as_root tee "$conf" >/dev/null
        changed=1
    fi
    local running=""
    if as_root sh -c 'test -S /run/mysqld/mysqld.sock' && as_root mariadb-admin ping >/dev/null 2>&1; then
        running=1
    fi
    if [ -n "$running" ] && [ -n "$changed" ]; then
        say "settings changed; restarting MariaDB"
        as_root /etc/init.d/mariadb restart >&2
    elif [ -z "$running" ]; then
        say "starting MariaDB"
        as_root /etc/init.d/mariadb start >&2
    fi
    for _ in $(seq 1 60); do
        as_root mariadb-admin ping >/dev/null 2>&1 && break
        sleep 0.5
    done
    as_root mariadb -u root -e "
        CREATE USER IF NOT EXISTS 'consign'@'localhost' IDENTIFIED BY 'consign';
        CREATE USER IF NOT EXISTS 'consign'@'%' IDENTIFIED BY 'consign';
        GRANT ALL PRIVILEGES ON *.* TO 'consign'@'localhost';
        GRANT ALL PRIVILEGES ON *.* TO 'consign'@'%';
        CREATE DATABASE IF NOT EXISTS test" >&2
    mariadb_tcp -e 'SELECT 1' >/dev/null || {
        say "error: MariaDB does not accept consign on 127.0.0.1:$MARIADB_PORT"
        say "its log: /var/log/mysql/error.log"
        exit 1
    }
    say "MariaDB on 127.0.0.1:$MARIADB_PORT ($(mariadb_tcp -N -e 'SELECT version()'))"
}

# --- Kafka -------------------------------------------------------------------

kafka() {
    step "Apache Kafka (jars from Maven Central)"
    if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
        say "java or mvn missing; installing Debian's openjdk-17-jre-headless and maven"
        apt_install openjdk-17-jre-headless maven
    fi
    scripts/kafka.sh fetch >&2
}

if [ "$#" -eq 0 ]; then set -- postgres mariadb kafka; fi
for service in "$@"; do
    case "$service" in
        postgres) postgres ;;
        mariadb) mariadb_server ;;
        kafka) kafka ;;
        *) say "unknown service: $service (known: postgres, mariadb, kafka)"; exit 2 ;;
    esac
done
