#!/bin/bash
set -e
grep -v '^#' /app/config.txt | grep -v '^$' > /app/active.txt
