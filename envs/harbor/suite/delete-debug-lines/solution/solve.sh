#!/bin/bash
set -e
sed -i '/DEBUG/d' /app/app.log
