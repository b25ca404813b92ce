#!/usr/bin/env bash
# Called by `henge agent --exec examples/agent/apply.sh` with the config JSON on stdin.
# Exit 0 = applied; non-zero = rejected, and what this prints on stderr is the error the operator sees.
# Here: the config must have a positive number `interval`; it is written to $APPLY_TARGET.
set -euo pipefail
config=$(cat)
interval=$(jq -er '.interval | numbers' <<<"$config" 2>/dev/null) || {
  echo "interval must be a number" >&2
  exit 1
}
if ! jq -e --argjson i "$interval" -n '$i > 0' >/dev/null; then
  echo "interval must be positive, got $interval" >&2
  exit 1
fi
target=${APPLY_TARGET:-./applied.json}
printf '%s\n' "$config" > "$target.tmp" && mv "$target.tmp" "$target"
echo "$(date -u +%FT%TZ) applied" >> "${APPLY_LOG:-/dev/null}"
