#!/bin/bash
set -e
awk '{print NR ":" $0}' /app/items.txt > /app/numbered.txt
