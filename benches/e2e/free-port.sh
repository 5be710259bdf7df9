# shellcheck shell=bash
# free_port, for the benchmark scripts: a free TCP port on 127.0.0.1, never one already handed
# out in this run. The kernel may give the same free port to two binds in a row once the first
# socket is closed; two listeners of one gateway config once got the same port that way, and
# the gateway rightly refused to start. Handed-out ports are listed in $W/ports.
free_port() {
  local port
  while :; do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    if ! grep -qx "$port" "${W:?free_port needs the work directory W}/ports" 2>/dev/null; then
      echo "$port" >>"$W/ports"
      echo "$port"
      return
    fi
  done
}
