#!/bin/bash
set -e
sed -i 's/^port = 80$/port = 8080/' /app/server.conf
