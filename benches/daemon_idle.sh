#!/usr/bin/env bash
# Idle cost of `update-agent run` connected to a broker, measured with the release build:
#   - time from exec to "connected and subscribed": the agent publishes online=true only after
#     the broker granted its subscriptions, so a subscriber that timestamps that message
#     (mosquitto_sub -F %U) sees the moment from outside; the agent's own log line gives the
#     time from the start of its MQTT link (after the config, trust anchor and state are loaded);
#   - resident memory (VmRSS) after some idle seconds, and its peak (VmHWM).
# Targets: <= 50 ms to ready on loopback, <= 8 MiB idle RSS.
#
# Usage: benches/daemon_idle.sh [RUNS] [IDLE_SECONDS]   (needs mosquitto, mosquitto-clients)
# BIN=path/to/update-agent skips the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
IDLE=${2:-5}

if [[ -z "${BIN:-}" ]]; then
    cargo build --release --quiet
    BIN=target/release/update-agent
fi
for tool in mosquitto mosquitto_sub; do
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] ||
        { echo "$tool is missing: apt-get install mosquitto mosquitto-clients" >&2; exit 2; }
done
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

work=$(mktemp -d)
broker=""
agent=""
cleanup() {
    # Only the processes this script started, by their ids.
    [[ -n "$agent" ]] && kill "$agent" 2>/dev/null
    [[ -n "$broker" ]] && kill "$broker" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
user_line=""
[[ $(id -u) == 0 ]] && user_line="user root"
cat >"$work/mosquitto.conf" <<EOF
$user_line
persistence false
log_dest none
listener $port 127.0.0.1
allow_anonymous true
EOF
"$MOSQUITTO" -c "$work/mosquitto.conf" &
broker=$!
for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break
    sleep 0.05
done

# A device: file slots, the file bootloader, boot facts, a throwaway trust anchor.
mkdir -p "$work/keys.d" "$work/state"
# openssl, not `update-agent keygen`: BIN may be the device build, which has no operator tools.
openssl genpkey -algorithm ed25519 2>/dev/null | openssl pkey -pubout -out "$work/keys.d/release.pub"
truncate -s 8M "$work/slot-a.img"
: >"$work/slot-b.img"
printf 'BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=0\n' >"$work/bootenv"
echo bench-boot >"$work/boot_id"
echo "update_agent.slot=A" >"$work/cmdline"
cat >"$work/agent.toml" <<EOF
[device]
compatible = "bench-gw"
state_dir = "$work/state"
factory_version = "1.0"
[trust]
keys_dir = "$work/keys.d"
insecure_writable_anchor = true
[bootloader]
backend = "file"
path = "$work/bootenv"
[slots]
a = { device = "$work/slot-a.img", bootname = "A", size = 8388608 }
b = { device = "$work/slot-b.img", bootname = "B", size = 8388608 }
[system]
boot_id_path = "$work/boot_id"
cmdline_path = "$work/cmdline"
reboot_command = ["true"]
[mqtt]
broker = "mqtt://127.0.0.1:$port"
device_id = "bench-0001"
# No system bus here (CI, a container): the D-Bus service, on by default, would stop the start.
[dbus]
enabled = false
EOF

online=update-agent/v1/devices/bench-0001/online
ready_ms=()
link_ms=()
for run in $(seq "$RUNS"); do
    # Clear the retained online flag of the previous run, then wait for the next "true".
    mosquitto_pub -h 127.0.0.1 -p "$port" -t "$online" -r -n
    mosquitto_sub -h 127.0.0.1 -p "$port" -t "$online" -C 1 -F '%U %p' >"$work/seen" &
    sub=$!
    sleep 0.2
    start=$(date +%s.%N)
    RUST_LOG=info "$BIN" run --log stderr --config "$work/agent.toml" 2>"$work/agent.log" &
    agent=$!
    wait "$sub"
    seen=$(cut -d' ' -f1 "$work/seen")
    ready_ms+=("$(python3 -c "print(round(($seen - $start) * 1000, 1))")")
    us=$(grep -o 'since_start_us=[0-9]*' "$work/agent.log" | head -1 | cut -d= -f2)
    link_ms+=("$(python3 -c "print(round($us / 1000, 2))")")
    if [[ $run == "$RUNS" ]]; then
        sleep "$IDLE"
        rss=$(awk '/VmRSS/ {print $2}' /proc/"$agent"/status)
        hwm=$(awk '/VmHWM/ {print $2}' /proc/"$agent"/status)
        threads=$(awk '/Threads/ {print $2}' /proc/"$agent"/status)
    fi
    kill -TERM "$agent"
    wait "$agent" || true
    agent=""
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "update-agent run, idle, connected to mosquitto on loopback ($RUNS runs, $(nproc) cores)"
echo "  exec -> connected and subscribed (online=true seen by a subscriber): median $(median "${ready_ms[@]}") ms (runs: ${ready_ms[*]})"
echo "  MQTT link start -> subscribed (agent's own log):                  median $(median "${link_ms[@]}") ms"
echo "  idle RSS after ${IDLE} s: $((rss / 1024)).$(((rss % 1024) * 10 / 1024)) MiB (peak $((hwm / 1024)).$(((hwm % 1024) * 10 / 1024)) MiB, $threads threads)"
