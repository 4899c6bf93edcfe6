#!/bin/bash
set -e
mkdir -p /app/extracted
tar -xzf /app/archive.tar.gz -C /app/extracted
