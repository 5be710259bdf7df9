# shellcheck shell=bash
# What http-ab and http-instructions set up alike, sourced by both: a work directory $W with a
# 700-byte page, a TLS certificate and the gateway's SSH keys; nginx configs; a poolgate config
# over one upstream (port $UP) with health checks off; the sticky cookie of a first response.

# shellcheck source=benches/e2e/free-port.sh
. "$(dirname "${BASH_SOURCE[0]}")/free-port.sh"
cookie_of() { curl -sk -D - -o /dev/null "$1" | tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \(poolgate_vm=[^;]*\).*/\1/p' | head -1; }

# The page ($W/www/index.html), an ECDSA certificate ($W/tls) and the gateway's host key, user
# CA and known_hosts.
http_fixture() {
  mkdir -p "$W/www" "$W/tls"
  head -c 700 /dev/zero | tr '\0' 'p' >"$W/www/index.html"
  chmod 755 "$W/www"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -keyout "$W/tls/key.pem" -out "$W/tls/cert.pem" 2>/dev/null
  ssh-keygen -q -t ed25519 -N '' -f "$W/host_key"
  ssh-keygen -q -t ed25519 -N '' -f "$W/user_ca"
  echo "127.0.0.1 $(cut -d' ' -f1-2 "$W/host_key.pub")" >"$W/known_hosts"
}

nginx_conf() { # DIR SERVER_BLOCKS [ACCESS_LOG]
  mkdir -p "$W/$1/tmp"
  cat >"$W/$1/nginx.conf" <<NGINX
worker_processes 1; daemon off; pid $W/$1/nginx.pid; error_log $W/$1/error.log warn;
events { worker_connections 4000; }
http { access_log ${3:-off}; default_type text/html; keepalive_requests 10000000; keepalive_timeout 300s;
  client_body_temp_path $W/$1/tmp/b; proxy_temp_path $W/$1/tmp/p; fastcgi_temp_path $W/$1/tmp/f;
  uwsgi_temp_path $W/$1/tmp/u; scgi_temp_path $W/$1/tmp/s;
  ssl_certificate $W/tls/cert.pem; ssl_certificate_key $W/tls/key.pem; ssl_protocols TLSv1.2 TLSv1.3;
  $2
}
NGINX
}

gateway_conf() { # DIR LISTEN_LINES TLS(0|1)
  mkdir -p "$1"
  {
    echo "[listen]"
    echo "ssh = \"127.0.0.1:$(free_port)\""
    echo "$2"
    echo "admin = \"127.0.0.1:$(free_port)\""
    if [ "$3" = 1 ]; then printf '[tls]\ncert = "%s"\nkey = "%s"\n' "$W/tls/cert.pem" "$W/tls/key.pem"; fi
    cat <<TOML
[ssh]
host_keys = ["$W/host_key"]
user_ca_key = "$W/user_ca"
backend_known_hosts = "$W/known_hosts"
[http]
cookie_secret_file = "$1/cookie_secret"
[health]
ssh = false
http = false
[[pool.backends]]
name = "up"
host = "127.0.0.1"
ssh_port = 22
http_port = $UP
max_sessions = 100000
TOML
  } >"$1/poolgate.toml"
}
