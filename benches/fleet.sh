#!/usr/bin/env bash
# The fleet benchmark (benches/fleet.rs): N `update-agent run` processes of the device build
# against one mosquitto (or a RabbitMQ cluster), and `update-agent rollout start`. Not in CI.
#
#   benches/fleet.sh --devices 1000                  # mosquitto, MQTT 5
#   benches/fleet.sh --devices 200 --rabbitmq 3      # three RabbitMQ nodes, MQTT 3.1.1
#   benches/fleet.sh --help                          # every option
#
# Builds the device binary (`--no-default-features`, release, into target/device so that the
# operator build in target/release stays) and raises the open-files limit for the broker and
# the image server. Needs mosquitto (and rabbitmq-server for --rabbitmq). DEVICE_BIN=path
# skips the device build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${DEVICE_BIN:-}" ]]; then
    cargo build --release --quiet --no-default-features --target-dir target/device
    DEVICE_BIN=$PWD/target/device/release/update-agent
fi
export DEVICE_BIN
# 1,000 devices: a connection each at the broker, a socket each at the image server.
ulimit -n "$(ulimit -Hn)"
exec cargo bench --quiet --bench fleet -- "$@"
