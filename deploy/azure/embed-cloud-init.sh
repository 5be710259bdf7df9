#!/usr/bin/env bash
# Embeds deploy/cloud-init/{pool-vm,gateway}.yaml into azuredeploy.json (variables
# poolCloudInit and gatewayCloudInit), which has to be a single file for
# `az deployment group create`. Run it after editing either cloud-init file; the deploy tests
# fail while the template holds an older copy.
#
#   deploy/azure/embed-cloud-init.sh          # rewrite azuredeploy.json in place
#   deploy/azure/embed-cloud-init.sh --check  # exit 1 if azuredeploy.json is out of date
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
template="$here/azuredeploy.json"
cloud_init="$here/../cloud-init"

if ! command -v jq >/dev/null 2>&1; then
  echo "embed-cloud-init.sh: needs jq (apt-get install jq)" >&2
  exit 2
fi

tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
jq --indent 2 \
  --rawfile pool "$cloud_init/pool-vm.yaml" \
  --rawfile gateway "$cloud_init/gateway.yaml" \
  '.variables.poolCloudInit = $pool | .variables.gatewayCloudInit = $gateway' \
  "$template" >"$tmp"

if [ "${1:-}" = "--check" ]; then
  if ! cmp -s "$tmp" "$template"; then
    echo "embed-cloud-init.sh: $template is out of date; run deploy/azure/embed-cloud-init.sh" >&2
    exit 1
  fi
  exit 0
fi
cat "$tmp" >"$template"
