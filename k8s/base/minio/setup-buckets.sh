#!/bin/sh
# Runs in the minio/mc image (Job `minio-buckets`). Idempotent: safe to run again.
#  1. waits for MinIO,
#  2. creates the sarflow buckets,
#  3. creates/updates the application user from Secret `sarflow-s3` with a policy that only
#     allows the sarflow buckets (so MLflow, Feast and pipelines never hold the root key).
set -eu

MC="mc --config-dir /tmp/.mc --quiet"
: "${MINIO_URL:?}" "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${BUCKETS:?}"

tries=0
until $MC alias set sarflow "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null 2>&1 \
      && $MC ready sarflow >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge 60 ]; then
    echo "MinIO at $MINIO_URL is not ready after 5 minutes" >&2
    exit 1
  fi
  sleep 5
done

for bucket in $BUCKETS; do
  $MC mb --ignore-existing "sarflow/$bucket"
done

if [ -n "${AWS_ACCESS_KEY_ID:-}" ] && [ -n "${AWS_SECRET_ACCESS_KEY:-}" ]; then
  $MC admin policy create sarflow sarflow-rw /config/sarflow-rw-policy.json
  $MC admin user add sarflow "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"
  # `attach` fails when the policy is already attached; that is the state we want.
  $MC admin policy attach sarflow sarflow-rw --user "$AWS_ACCESS_KEY_ID" \
    || $MC admin user info sarflow "$AWS_ACCESS_KEY_ID" | grep -q sarflow-rw
  echo "application user ready (policy sarflow-rw)"
else
  echo "Secret sarflow-s3 not set: skipping the application user" >&2
fi
echo "buckets ready: $BUCKETS"
