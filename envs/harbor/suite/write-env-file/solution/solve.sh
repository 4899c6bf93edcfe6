#!/bin/bash
set -e
printf 'APP_ENV=production\nPORT=8080\n' > /app/.env
