#!/bin/bash
# Checks that the three .jpg files moved to /app/images and notes.txt stayed.
# Writes 1 to /logs/verifier/reward.txt when the check passes, 0 otherwise.

same() { [ -f "$1" ] && [ "$(cat "$1")" = "$(cat "$2")" ]; }
number_in() { [ -f "$1" ] && [ "$(tr -d '[:space:]' < "$1")" = "$2" ]; }

check() {
  [ "$(ls /app/images | tr '\n' ' ')" = "a.jpg b.jpg c.jpg " ] || return 1
  [ "$(ls /app/inbox | tr '\n' ' ')" = "notes.txt " ]
}

if check; then reward=1; else reward=0; fi
echo "move-images: reward=$reward"
echo "$reward" > /logs/verifier/reward.txt
