#!/bin/bash
set -e
mkdir -p /app/backup
cp /app/config.ini /app/backup/config.ini
