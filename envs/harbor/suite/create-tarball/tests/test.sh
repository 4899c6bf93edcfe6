#!/bin/bash
# Checks that /app/docs.tar.gz unpacks to docs/a.md and docs/b.md.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  [ -f /app/docs.tar.gz ] || return 1
  rm -rf /tmp/unpacked && mkdir -p /tmp/unpacked || return 1
  tar -xzf /app/docs.tar.gz -C /tmp/unpacked || return 1
  same /tmp/unpacked/docs/a.md /tests/a.md && same /tmp/unpacked/docs/b.md /tests/b.md
}

if check; then reward=1; else reward=0; fi
echo "create-tarball: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
