#!/bin/bash
set -e
echo '10.0.0.9 db.internal' >> /app/hosts
