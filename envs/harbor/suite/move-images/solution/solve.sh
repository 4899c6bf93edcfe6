#!/bin/bash
set -e
mkdir -p /app/images
mv /app/inbox/*.jpg /app/images/
