#!/bin/bash
set -e
wc -L < /app/lines.txt > /app/longest.txt
