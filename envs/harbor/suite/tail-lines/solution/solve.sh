#!/bin/bash
set -e
tail -n 3 /app/server.log > /app/tail.txt
