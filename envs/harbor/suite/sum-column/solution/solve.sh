#!/bin/bash
set -e
awk '{sum += $3} END {print sum}' /app/sales.txt > /app/total.txt
