#!/bin/bash
set -e
grep '"version"' /app/package.json | cut -d'"' -f4 > /app/version.txt
