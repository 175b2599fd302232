#!/usr/bin/env bash
# Installs the Debian packages spark-slurm's tests and demo run for real:
# Slurm (slurmctld, slurmd), munge, Lua 5.1/5.3/5.4 (job_submit.lua checks), sqlite3 and
# openssl (contrib/verify-ledger.sh), PostgreSQL (the Karman TimescaleDB sink path),
# promtool (the shipped alert rules), systemd-analyze (the shipped units), and for the
# multi-node cluster (network namespaces, a bridge, ssh between the hosts): iproute2
# (ip), util-linux (nsenter, unshare), openssh-server and openssh-client. Idempotent and
# quiet when everything is already there; exits 1 when something is missing and it is
# not root, so `make test` stops there.
set -euo pipefail
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
command -v munged >/dev/null 2>&1 || need+=(munge)
command -v lua5.1 >/dev/null 2>&1 || need+=(lua5.1)
# job_submit.lua must stay valid on the Lua of newer Slurm builds too.
command -v lua5.3 >/dev/null 2>&1 || need+=(lua5.3)
command -v lua5.4 >/dev/null 2>&1 || need+=(lua5.4)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# The fake libnvidia-ml.so.1 the NVML backend is tested against is built from C.
command -v gcc >/dev/null 2>&1 || need+=(gcc)
[ -e /usr/include/stdio.h ] || need+=(libc6-dev)
command -v sha256sum >/dev/null 2>&1 || need+=(coreutils)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)  # promtool, and the Karman exporter test's server
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing ${need[*]}; run as root (or: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts daemons on install; our tests run their own in temp dirs.
for svc in slurmctld slurmd munge postgresql prometheus ssh; do
  systemctl stop "$svc" >/dev/null 2>&1 || service "$svc" stop >/dev/null 2>&1 || true
done
