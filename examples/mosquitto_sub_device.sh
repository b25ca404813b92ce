#!/usr/bin/env bash
# A device in shell (mosquitto_sub + jq + mosquitto_pub): apply each new config version it is sent
# (save it to $CONFIG_OUT, print {version, config}) and report it applied.
#   examples/mosquitto_sub_device.sh HOST PORT DEVICE SECRET_FILE
# MAX_VERSIONS=N stops after N applied versions (default: run forever).
#
# One identity means one connection: a mosquitto_pub beside a running mosquitto_sub would take
# over its connection. So each cycle is one short connection at a time: read the retained
# snapshot; if it is new, apply and report it; if not, wait (up to 5 minutes) for a live update.
set -euo pipefail
host=$1 port=$2 device=$3 secret=$(cat "$4")
out=${CONFIG_OUT:-/dev/null}
auth=(-h "$host" -p "$port" -i "$device" -u "$device" -P "$secret" -q 1)
topic="henge/devices/$device/config"
last=0 applied=0
while [ -z "${MAX_VERSIONS:-}" ] || [ "$applied" -lt "$MAX_VERSIONS" ]; do
  snapshot=$(mosquitto_sub "${auth[@]}" -t "$topic" -C 1 -W 30) || { sleep 2; continue; }
  version=$(jq -r '.version // 0' <<<"$snapshot" 2>/dev/null || echo 0)
  if [ "$version" -le "$last" ]; then
    # Already applied: wait for a live (non-retained) update, then read the retained one again.
    mosquitto_sub "${auth[@]}" -t "$topic" -C 1 -R -W 300 >/dev/null || true
    continue
  fi
  jq -c '{version, config}' <<<"$snapshot"
  jq '.config' <<<"$snapshot" > "$out"
  mosquitto_pub "${auth[@]}" -t "henge/devices/$device/report" \
      -m "{\"version\": $version, \"status\": \"applied\"}"
  last=$version applied=$((applied + 1))
done
