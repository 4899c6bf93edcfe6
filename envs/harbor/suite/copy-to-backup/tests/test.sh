#!/bin/bash
# Checks that /app/config.ini was copied to /app/backup/config.ini.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  same /app/backup/config.ini /tests/config.ini && same /app/config.ini /tests/config.ini
}

if check; then reward=1; else reward=0; fi
echo "copy-to-backup: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
