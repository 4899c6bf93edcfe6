#!/bin/bash
set -e
ls /app/logs/*.log | wc -l > /app/log_count.txt
