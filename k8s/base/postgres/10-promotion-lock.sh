# PostgreSQL first start (docker-entrypoint-initdb.d; runs once, on an empty data directory):
# the role and database of the promotion gate's cross-pod lock (sarflow.mlops.locks: a session
# advisory lock, which needs CONNECT and nothing else).
#   role     sarflow_lock   LOGIN, password PROMOTION_LOCK_PASSWORD (Secret sarflow-postgres)
#   database sarflow_locks  CONNECT for sarflow_lock only; no tables
# PUBLIC loses CONNECT on the MLflow and maintenance databases, so the lock role (whose password
# every promote task holds) cannot open MLflow's tables. An existing volume is not re-initialised:
# run the same statements once with `kubectl -n sarflow exec statefulset/postgres -- psql ...`
# (k8s/README.md).
set -eu
: "${PROMOTION_LOCK_PASSWORD:?PROMOTION_LOCK_PASSWORD is empty (Secret sarflow-postgres)}"
psql -v ON_ERROR_STOP=1 -v lock_password="$PROMOTION_LOCK_PASSWORD" \
     --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
SELECT format('CREATE ROLE sarflow_lock LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT PASSWORD %L',
              :'lock_password') \gexec
CREATE DATABASE sarflow_locks;
REVOKE ALL ON DATABASE sarflow_locks FROM PUBLIC;
GRANT CONNECT ON DATABASE sarflow_locks TO sarflow_lock;
SELECT format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database()) \gexec
REVOKE CONNECT, TEMPORARY ON DATABASE postgres FROM PUBLIC;
SQL
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname sarflow_locks <<'SQL'
REVOKE ALL ON SCHEMA public FROM PUBLIC;
SQL
