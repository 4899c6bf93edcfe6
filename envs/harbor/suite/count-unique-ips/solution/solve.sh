#!/bin/bash
set -e
cut -d' ' -f1 /app/access.log | sort -u | wc -l > /app/ip_count.txt
