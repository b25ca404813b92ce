#!/usr/bin/env bash
# A device in shell: wait for this device's latest config and print it (needs mosquitto_sub and jq).
#   examples/mosquitto_sub_device.sh HOST PORT DEVICE SECRET_FILE
set -euo pipefail
host=$1 port=$2 device=$3 secret=$(cat "$4")
mosquitto_sub -h "$host" -p "$port" -i "$device" -u "$device" -P "$secret" -q 1 -C 1 -W 10 \
  -t "henge/devices/$device/config" | jq -c '{version, config}'
