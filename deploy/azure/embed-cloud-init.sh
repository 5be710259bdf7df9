#!/usr/bin/env bash
# Copies deploy/systemd/poolgate.service into deploy/cloud-init/gateway.yaml (the last
# write_files entry), then embeds deploy/cloud-init/{pool-vm,gateway}.yaml into
# azuredeploy.json (variables poolCloudInit and gatewayCloudInit), which has to be a single file
# for `az deployment group create`. Run it after editing any of them; the deploy tests fail
# while a copy is out of date.
#
#   deploy/azure/embed-cloud-init.sh          # rewrite azuredeploy.json in place
#   deploy/azure/embed-cloud-init.sh --check  # exit 1 if a copy is out of date, change nothing
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
template="$here/azuredeploy.json"
cloud_init="$here/../cloud-init"

if ! command -v jq >/dev/null 2>&1; then
  echo "embed-cloud-init.sh: needs jq (apt-get install jq)" >&2
  exit 2
fi

unit="$here/../systemd/poolgate.service"
tmp="$(mktemp)"
gateway="$(mktemp)"
trap 'rm -f "$tmp" "$gateway"' EXIT

# gateway.yaml with the unit's text as the content of /etc/systemd/system/poolgate.service:
# everything up to that entry's "content: |", the unit indented by six spaces, then a blank
# line and everything from "runcmd:" on.
awk -v unit="$unit" '
  /^  - path: \/etc\/systemd\/system\/poolgate\.service$/ { in_entry = 1 }
  in_entry && /^    content: \|$/ {
    print
    while ((getline line < unit) > 0) print (line == "" ? "" : "      " line)
    skipping = 1
    next
  }
  skipping && /^runcmd:/ { skipping = 0; in_entry = 0; print "" }
  !skipping { print }
' "$cloud_init/gateway.yaml" >"$gateway"
if ! grep -q '^runcmd:' "$gateway"; then
  echo "embed-cloud-init.sh: gateway.yaml lost its runcmd section; is poolgate.service still the last write_files entry?" >&2
  exit 1
fi

jq --indent 2 \
  --rawfile pool "$cloud_init/pool-vm.yaml" \
  --rawfile gateway "$gateway" \
  '.variables.poolCloudInit = $pool | .variables.gatewayCloudInit = $gateway' \
  "$template" >"$tmp"

if [ "${1:-}" = "--check" ]; then
  stale=0
  cmp -s "$gateway" "$cloud_init/gateway.yaml" || { echo "embed-cloud-init.sh: gateway.yaml holds an old poolgate.service" >&2; stale=1; }
  cmp -s "$tmp" "$template" || { echo "embed-cloud-init.sh: azuredeploy.json holds old cloud-init files" >&2; stale=1; }
  [ "$stale" = 0 ] || echo "embed-cloud-init.sh: run deploy/azure/embed-cloud-init.sh" >&2
  exit "$stale"
fi
cat "$gateway" >"$cloud_init/gateway.yaml"
cat "$tmp" >"$template"
