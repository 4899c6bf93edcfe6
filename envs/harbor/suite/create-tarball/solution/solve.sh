#!/bin/bash
set -e
tar -czf /app/docs.tar.gz -C /app docs
