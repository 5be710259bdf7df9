# shellcheck shell=bash
# What ssh-ab and ssh-idle-ab set up alike, sourced by both (after $W exists and $SSHD is set):
# the test account, the client's key, the gateways' key set, a real sshd as the VM, and a
# poolgate config in front of it.

# shellcheck source=benches/e2e/free-port.sh
. "$(dirname "${BASH_SOURCE[0]}")/free-port.sh"
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "$(basename "$0"): port $1 never opened" >&2; exit 1; }

USER_NAME=pgtest1

# The test account (as benches/e2e/run makes it), the client's key ($W/client, authorized in
# $W/authorized_keys/USER) and the gateways' key set in $W/keys (what `poolgate keys init`
# writes; made here so that builds older than that command can be measured too).
ssh_fixture() {
  (
    flock -w 60 9
    id "$USER_NAME" >/dev/null 2>&1 || useradd -m -s /bin/bash "$USER_NAME" || id "$USER_NAME" >/dev/null
    if getent shadow "$USER_NAME" | cut -d: -f2 | grep -q '^!'; then usermod -p '*' "$USER_NAME"; fi
  ) 9>/run/lock/poolgate-tests-users.lock 2>/dev/null || true
  mkdir -p /run/sshd "$W/authorized_keys"
  ssh-keygen -q -t ed25519 -N '' -C "client" -f "$W/client"
  cp "$W/client.pub" "$W/authorized_keys/$USER_NAME"
  mkdir -m 700 "$W/keys"
  ssh-keygen -q -t ed25519 -N '' -C "gateway host key" -f "$W/keys/ssh_host_ed25519_key"
  ssh-keygen -q -t ed25519 -N '' -C "user CA" -f "$W/keys/user_ca"
  (umask 077; head -c 32 /dev/urandom >"$W/keys/cookie_secret")
}

# The VM: a real sshd on 127.0.0.1:$vm_port (its config $W/sshd_config, its pid appended to
# PIDS) that takes certificates from the gateways' user CA; its host key in $W/vm_known_hosts.
start_vm_sshd() {
  vm_port=$(free_port)
  ssh-keygen -q -t ed25519 -N '' -C "vm host key" -f "$W/vm_host_key"
  cat >"$W/sshd_config" <<SSHD
Port $vm_port
ListenAddress 127.0.0.1
HostKey $W/vm_host_key
PidFile $W/sshd.pid
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
TrustedUserCAKeys $W/keys/user_ca.pub
AuthorizedKeysFile none
StrictModes no
LogLevel ERROR
MaxStartups 4000
MaxSessions 10
SSHD
  "$SSHD" -D -e -f "$W/sshd_config" 2>"$W/sshd.log" & PIDS+=($!)
  wait_port "$vm_port"
  echo "[127.0.0.1]:$vm_port $(cut -d' ' -f1-2 "$W/vm_host_key.pub")" >"$W/vm_known_hosts"
}

# A poolgate config at FILE: SSH on 127.0.0.1:PORT, admin on ADMIN, HTTP off, the VM above as
# its one backend, everything else at its default.
gateway_conf() { # FILE PORT ADMIN
  cat >"$1" <<TOML
[listen]
ssh = "127.0.0.1:$2"
http = "off"
admin = "127.0.0.1:$3"

[ssh]
host_keys = ["$W/keys/ssh_host_ed25519_key"]
user_ca_key = "$W/keys/user_ca"
authorized_keys = "$W/authorized_keys/{user}"
backend_known_hosts = "$W/vm_known_hosts"

[http]
cookie_secret_file = "$W/keys/cookie_secret"

[[pool.backends]]
name = "vm"
host = "127.0.0.1"
ssh_port = $vm_port
max_sessions = 100000
TOML
}
