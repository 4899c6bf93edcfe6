#!/bin/bash
set -e
sort -t, -k2 -n -r /app/scores.csv | head -n 1 | cut -d, -f1 > /app/top.txt
