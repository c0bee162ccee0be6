#!/usr/bin/env bash
# `update-agent install` against this machine's physical limits and against RAUC (issue 15), run
# by hand (not in CI: it needs root, loop devices, minutes and several GiB under target/):
#   agent    update-agent install of a signed release (file:// URL, 4 KiB block index) into a
#            file slot: write, checkpoints, read-back past the page cache, activation. Slot A,
#            the booted one, holds the release before (other bytes of the same size), as on a
#            gateway: an agent that hashed it to plan a delta would pay for that here
#   dd       dd bs=1M conv=fsync of the same image into the target slot: the write limit
#   rd       dd bs=1M iflag=direct of the whole target slot: a read past the page cache, which
#            the agent's read-back cannot do faster (printed beside the targets: agent / (dd + rd),
#            what an install that writes, then reads every byte back, costs on storage that
#            cannot serve the two at once)
#   sha-all  openssl dgst -sha256 of the image split into one part per core, in parallel: the
#            hashing limit (one part on one core)
#   sha-1    openssl dgst -sha256 of the whole image on one core
#   rauc     rauc install of a plain bundle of the same image into a raw file slot (Debian's rauc,
#            `rauc service` on a private system bus, started and stopped by this script; RAUC
#            checks the bundle's signature but does not read the slot back): a baseline only
# For each image size and each core set (all cores; `taskset -c 0`), the tools take turns round
# by round (interleaved; the order turned by one every other round, and every second round run
# backwards, so neighbours swap places), the source image warm in the page
# cache. The slots are loop devices over files that read and write their file with O_DIRECT, as
# a gateway's are partitions with no second page cache beneath them (LOOP=dio, the default off
# tmpfs; LOOP=1: loop devices that go through the file's page cache; LOOP=0, the default on
# tmpfs: the files themselves; a regular file serialises an O_DIRECT read with a buffered write
# of the same file, a block device does not). Slot A holds the release before; the target is written in place by
# every writing tool and refilled with the release before ahead of each turn (untimed): no tool
# pays for the filesystem allocating blocks, and the memory in use stays the same from round to
# round (on a VM whose freed memory goes back to the host, reallocating it cost dd up to 15x on
# tmpfs). Medians
# of the rounds; peak RSS from /usr/bin/time (for rauc: the service's VmHWM, one service a round).
# Targets (issue 15), printed as ratios:
#   all cores: agent <= 1.25 x max(dd, sha-all), agent <= 0.5 x rauc
#   one core:  agent <= 1.25 x (sha-1 + dd)
#   agent peak RSS <= 16 MiB
#
# Usage: benches/install_vs_limits.sh [ROUNDS]        (ROUNDS >= 3, default 3)
#   SIZES_MIB="512 2048" (default), CORES="all one" (default), RAUC=0 leaves RAUC out.
#   BIN=path/to/update-agent: the agent that installs (default: the release build); it may be
#   the device build (scripts/measure-size makes it). TOOLS_BIN=path: the one with the
#   operator's tools (keygen, release create) when BIN has none; default BIN.
#   BASELINE_BIN=path: another agent (an earlier build) that takes its turn in every round as
#   the tool "agent-base", so a change is compared under the same load, not across runs.
#   INSTALL_TOML="key = value": added to both agents' [install] table (e.g. readback_overlap).
#   UNDER=dir: where the images, slots and bundles live (in dir/bench-install; default target).
#   UNDER=/dev/shm takes the disk out: every tool then runs at what the cores allow, which is
#   the balance of a gateway whose cores hash slower than its storage writes (with LOOP=0,
#   O_DIRECT is refused on tmpfs, so the agent's read-back drops the cache and reads through it).
# Needs: root (loop devices; RAUC mounts the bundle on one), rauc, squashfs-tools, dbus, openssl,
# util-linux (taskset), time. Data lives in target/bench-install/ (or UNDER) and is deleted
# at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SIZES_MIB=${SIZES_MIB:-512 2048}
CORES=${CORES:-all one}
RAUC=${RAUC:-1}
LOOP=${LOOP:-auto}
[[ $ROUNDS -ge 3 ]] || { echo "ROUNDS must be at least 3 (medians)" >&2; exit 2; }

if [[ -z "${BIN:-}" ]]; then
    cargo build --locked --release --quiet
    BIN=target/release/update-agent
fi
BIN=$(realpath "$BIN")
TOOLS_BIN=$(realpath "${TOOLS_BIN:-$BIN}")
BASELINE_BIN=${BASELINE_BIN:+$(realpath "$BASELINE_BIN")}
for tool in openssl dd taskset /usr/bin/time; do
    command -v "$tool" >/dev/null || { echo "$tool is missing" >&2; exit 2; }
done
if [[ $RAUC == 1 ]]; then
    for tool in rauc mksquashfs dbus-daemon; do
        command -v "$tool" >/dev/null ||
            { echo "$tool is missing: apt-get install rauc squashfs-tools dbus (or RAUC=0)" >&2; exit 2; }
    done
    [[ $(id -u) == 0 ]] || { echo "rauc install mounts the bundle: run as root (or RAUC=0)" >&2; exit 2; }
fi
NCPU=$(nproc)

work=$(realpath -m "${UNDER:-target}/bench-install")
rm -rf "$work"
mkdir -p "$work"
# A loop device over a tmpfs file keeps every block twice (its own cache and the file's pages);
# on this VM that churn made 2 GiB rounds vary 5x. So on tmpfs the slots stay files.
if [[ $LOOP == auto ]]; then
    LOOP=dio
    [[ $(stat -f -c %T "$work") == tmpfs ]] && LOOP=0
fi
[[ $LOOP == 0 || $LOOP == 1 || $LOOP == dio ]] || { echo "LOOP is 0, 1, dio or auto" >&2; exit 2; }
bus_pid=""
service_pid=""
loops=()
cleanup() {
    # Only the processes this script started, by their ids; only the loop devices it attached.
    [[ -n "$service_pid" ]] && kill "$service_pid" 2>/dev/null
    [[ -n "$bus_pid" ]] && kill "$bus_pid" 2>/dev/null
    wait 2>/dev/null || true
    for loop in "${loops[@]}"; do losetup -d "$loop"; done
    rm -rf "$work"
}
trap cleanup EXIT
trap "exit 1" INT TERM

now() { date +%s.%N; }
# Runs a command under /usr/bin/time; sets $seconds and $rss_kib (peak RSS).
timed() {
    local begun ended
    begun=$(now)
    /usr/bin/time -f %M -o "$work/time.out" "$@" >"$work/cmd.out" 2>&1 ||
        { echo "failed: $*" >&2; cat "$work/cmd.out" >&2; exit 1; }
    ended=$(now)
    seconds=$(awk -v a="$begun" -v b="$ended" 'BEGIN { printf "%.3f", b - a }')
    rss_kib=$(tail -n 1 "$work/time.out")
}
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
warm() { cat "$1" >/dev/null; }

# The operator's side, once: a signing key for the agent's releases, a certificate for RAUC's.
"$TOOLS_BIN" keygen --out "$work/signer" >/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/rauc.key" -out "$work/rauc.crt" \
    -days 30 -subj /CN=bench 2>/dev/null

if [[ $RAUC == 1 ]]; then
    cat >"$work/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=$work/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <!-- Without the bare eavesdrop rule the service's replies do not reach the client. -->
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <allow user="*"/>
  </policy>
</busconfig>
EOF
    dbus-daemon --config-file="$work/bus.conf" --fork --print-pid >"$work/bus.pid"
    bus_pid=$(cat "$work/bus.pid")
    export DBUS_SYSTEM_BUS_ADDRESS=unix:path=$work/bus.sock
fi

# A device for one agent install: fresh state, slot A booted with the release before (a link
# to `old`: the agent only reads it), slot B the shared target.
agent_device() {
    local dev=$1 bytes=$2 old=$3
    rm -rf "$dev"
    mkdir -p "$dev/keys" "$dev/state"
    cp "$work/signer.pub" "$dev/keys/"
    ln -s "$old_slot" "$dev/slot-a"
    ln -s "$target" "$dev/slot-b"
    printf 'BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n' >"$dev/bootenv"
    echo 6a1c0f3e-0000-4000-8000-000000000001 >"$dev/boot_id"
    echo "update_agent.slot=A" >"$dev/cmdline"
    cat >"$dev/agent.toml" <<EOF
[device]
compatible = "bench-gw"
state_dir = "$dev/state"
factory_version = "1.0"
[trust]
keys_dir = "$dev/keys"
insecure_writable_anchor = true
[bootloader]
backend = "file"
path = "$dev/bootenv"
[slots]
a = { device = "$dev/slot-a", bootname = "A", size = $bytes }
b = { device = "$dev/slot-b", bootname = "B", size = $bytes }
[system]
boot_id_path = "$dev/boot_id"
cmdline_path = "$dev/cmdline"
reboot_command = ["true"]
[install]
${INSTALL_TOML:-}
EOF
}

rauc_system() {
    local dev=$1
    rm -rf "$dev"
    mkdir -p "$dev/mnt" "$dev/data"
    ln -s "$old_slot" "$dev/slot0"
    ln -s "$target" "$dev/slot1"
    cat >"$dev/system.conf" <<EOF
[system]
compatible=bench-gw
bootloader=noop
mountprefix=$dev/mnt
data-directory=$dev/data
[keyring]
path=$work/rauc.crt
[slot.rootfs.0]
device=$dev/slot0
type=raw
bootname=A
[slot.rootfs.1]
device=$dev/slot1
type=raw
bootname=B
EOF
}

# One `rauc install` with its own service (so VmHWM is this install's); sets $seconds, $rss_kib.
rauc_round() {
    local pin=("$@") dev=$work/rauc-dev
    rauc_system "$dev"
    "${pin[@]}" rauc service --conf="$dev/system.conf" --override-boot-slot=A \
        >"$work/rauc-service.log" 2>&1 &
    service_pid=$!
    for _ in $(seq 100); do
        dbus-send --system --dest=org.freedesktop.DBus --print-reply /org/freedesktop/DBus \
            org.freedesktop.DBus.NameHasOwner string:de.pengutronix.rauc 2>/dev/null |
            grep -q true && break
        sleep 0.05
    done
    local begun ended
    begun=$(now)
    "${pin[@]}" rauc install "$work/bundle.raucb" >"$work/cmd.out" 2>&1 ||
        { echo "rauc install failed:" >&2; cat "$work/cmd.out" "$work/rauc-service.log" >&2; exit 1; }
    ended=$(now)
    seconds=$(awk -v a="$begun" -v b="$ended" 'BEGIN { printf "%.3f", b - a }')
    rss_kib=$(awk '/^VmHWM:/ { print $2 }' "/proc/$service_pid/status")
    kill "$service_pid"
    wait "$service_pid" 2>/dev/null || true
    service_pid=""
    rm -rf "$dev"
}

# SHA-256 of the image in `parts` ranges, each by its own openssl, all at once.
sha_split() {
    local image=$1 parts=$2 mib=$3
    local per=$(((mib + parts - 1) / parts)) pids=() p
    for ((p = 0; p < parts; p++)); do
        dd if="$image" bs=1M skip=$((p * per)) count=$per status=none |
            openssl dgst -sha256 >/dev/null &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
}

declare -A results
tools=(dd rd sha-all sha-1 agent)
[[ -n $BASELINE_BIN ]] && tools+=(agent-base)
[[ $RAUC == 1 ]] && tools+=(rauc)

for mib in $SIZES_MIB; do
    bytes=$((mib * 1024 * 1024))
    image=$work/rootfs-$mib.img
    # Incompressible bytes, quickly: AES-CTR of zeros.
    # (openssl ends on the broken pipe when head has had enough.)
    { openssl enc -aes-128-ctr -nosalt -pass pass:bench -in /dev/zero 2>/dev/null || true; } |
        head -c "$bytes" >"$image"
    old=$work/before-$mib.img
    { openssl enc -aes-128-ctr -nosalt -pass pass:before -in /dev/zero 2>/dev/null || true; } |
        head -c "$bytes" >"$old"
    target_file=$work/target-$mib.img
    cp "$old" "$target_file"
    # The slots: loop devices over the files (LOOP=0: the files themselves).
    if [[ $LOOP != 0 ]]; then
        direct_io=off
        [[ $LOOP == dio ]] && direct_io=on
        old_slot=$(losetup --find --show --read-only --direct-io=$direct_io "$old")
        loops+=("$old_slot")
        target=$(losetup --find --show --direct-io=$direct_io "$target_file")
        loops+=("$target")
    else
        old_slot=$old
        target=$target_file
    fi
    "$TOOLS_BIN" release create --key "$work/signer.key" --image "$image" --version 2.0 \
        --security-version 1 --compatible bench-gw --url "file://$image" --reboot \
        --out "$work/release-$mib.json" >/dev/null
    if [[ $RAUC == 1 ]]; then
        rm -rf "$work/bundle-content" "$work/bundle.raucb"
        mkdir "$work/bundle-content"
        ln "$image" "$work/bundle-content/rootfs.img"
        printf '[update]\ncompatible=bench-gw\nversion=2.0\n[bundle]\nformat=plain\n[image.rootfs]\nfilename=rootfs.img\n' \
            >"$work/bundle-content/manifest.raucm"
        # Stored uncompressed, like the agent's image (no transport compression on either side).
        rauc bundle --cert="$work/rauc.crt" --key="$work/rauc.key" \
            --mksquashfs-args="-noI -noD -noF -noX" \
            "$work/bundle-content" "$work/bundle.raucb" >/dev/null 2>&1
        rm -rf "$work/bundle-content"
    fi

    for cores in $CORES; do
        if [[ $cores == one ]]; then pin=(taskset -c 0); parts=1; else pin=(); parts=$NCPU; fi
        for ((round = 1; round <= ROUNDS; round++)); do
            line="  ${mib} MiB, $cores core(s), round $round:"
            # The order turns every other round and every second round runs backwards, so that
            # no tool always runs right after the same one (a delete of the last one's 2 GiB
            # slot file, its writeback, a warm cache), and two neighbours (agent, agent-base)
            # each go first as often as the other.
            shift_by=$((((round - 1) / 2) % ${#tools[@]}))
            order=("${tools[@]:shift_by}" "${tools[@]:0:shift_by}")
            if ((round % 2 == 0)); then
                reversed=()
                for ((k = ${#order[@]} - 1; k >= 0; k--)); do reversed+=("${order[k]}"); done
                order=("${reversed[@]}")
            fi
            line+=" [${order[*]}]"
            for tool in "${order[@]}"; do
                [[ $tool == sha-* || $tool == rd ]] ||
                    dd if="$old" of="$target" bs=1M conv=notrunc,fsync status=none
                warm "$image"
                [[ $tool == rauc ]] && warm "$work/bundle.raucb"
                case $tool in
                    dd)
                        timed "${pin[@]}" dd if="$image" of="$target" bs=1M conv=fsync,notrunc status=none ;;
                    rd) timed "${pin[@]}" dd if="$target" of=/dev/null bs=1M iflag=direct status=none ;;
                    sha-all) timed "${pin[@]}" bash -c "$(declare -f sha_split); sha_split '$image' $parts $mib" ;;
                    sha-1) timed taskset -c 0 openssl dgst -sha256 "$image" ;;
                    agent | agent-base)
                        agent_device "$work/dev" "$bytes" "$old"
                        agent_bin=$BIN
                        [[ $tool == agent-base ]] && agent_bin=$BASELINE_BIN
                        timed "${pin[@]}" "$agent_bin" install --config "$work/dev/agent.toml" "$work/release-$mib.json"
                        grep -q "activated" "$work/cmd.out" ||
                            { echo "the agent did not activate:" >&2; cat "$work/cmd.out" >&2; exit 1; }
                        cmp -s "$image" "$work/dev/slot-b" ||
                            { echo "slot B is not the image after the agent's install" >&2; exit 1; }
                        rm -rf "$work/dev" ;;
                    rauc) rauc_round "${pin[@]}" ;;
                esac
                results[$mib,$cores,$tool,t]+="$seconds "
                results[$mib,$cores,$tool,rss]+="$rss_kib "
                line+=" $tool $seconds s"
            done
            echo "$line"
        done
    done
    if [[ $LOOP != 0 ]]; then
        losetup -d "$old_slot" "$target"
        loops=()
    fi
    rm -f "$image" "$old" "$target_file" "$work/bundle.raucb" "$work/release-$mib.json" "$image.chunks"
done

echo
printf '%-8s %-5s %-8s %9s %10s\n' image cores tool "median s" "peak RSS"
for mib in $SIZES_MIB; do
    for cores in $CORES; do
        for tool in "${tools[@]}"; do
            # shellcheck disable=SC2086
            t=$(median ${results[$mib,$cores,$tool,t]})
            # shellcheck disable=SC2086
            r=$(median ${results[$mib,$cores,$tool,rss]})
            results[$mib,$cores,$tool,med]=$t
            results[$mib,$cores,$tool,rssmed]=$r
            printf '%-8s %-5s %-8s %9.3f %7.1f MiB\n' "${mib}MiB" "$cores" "$tool" "$t" "$(awk -v k="$r" 'BEGIN { print k / 1024 }')"
        done
    done
done

echo
verdict() { awk -v v="$1" -v lim="$2" 'BEGIN { printf "%.2f (target <= %s: %s)", v, lim, (v <= lim) ? "met" : "NOT met" }'; }
for mib in $SIZES_MIB; do
    for cores in $CORES; do
        agent=${results[$mib,$cores,agent,med]}
        dd=${results[$mib,$cores,dd,med]}
        if [[ $cores == all ]]; then
            hash=${results[$mib,$cores,sha-all,med]}
            limit=$(awk -v a="$dd" -v b="$hash" 'BEGIN { print (a > b) ? a : b }')
            echo "${mib} MiB, all cores: agent / max(dd, sha-all) = $(verdict "$(awk -v a="$agent" -v l="$limit" 'BEGIN { print a / l }')" 1.25)"
            if [[ $RAUC == 1 ]]; then
                echo "${mib} MiB, all cores: agent / rauc = $(verdict "$(awk -v a="$agent" -v r="${results[$mib,$cores,rauc,med]}" 'BEGIN { print a / r }')" 0.5)"
            fi
            if [[ -n $BASELINE_BIN ]]; then
                echo "${mib} MiB, all cores: agent / agent-base = $(awk -v a="$agent" -v b="${results[$mib,$cores,agent-base,med]}" 'BEGIN { printf "%.2f", a / b }')"
            fi
        else
            sha1=${results[$mib,$cores,sha-1,med]}
            echo "${mib} MiB, one core: agent / (sha-1 + dd) = $(verdict "$(awk -v a="$agent" -v s="$sha1" -v d="$dd" 'BEGIN { print a / (s + d) }')" 1.25)"
            if [[ -n $BASELINE_BIN ]]; then
                echo "${mib} MiB, one core: agent / agent-base = $(awk -v a="$agent" -v b="${results[$mib,$cores,agent-base,med]}" 'BEGIN { printf "%.2f", a / b }')"
            fi
        fi
        rd=${results[$mib,$cores,rd,med]}
        echo "${mib} MiB, $cores core(s): agent / (dd + rd) = $(awk -v a="$agent" -v d="$dd" -v r="$rd" 'BEGIN { printf "%.2f", a / (d + r) }') (the write, then a read of the slot past the cache: no target)"
        echo "${mib} MiB, $cores core(s): agent peak RSS $(verdict "$(awk -v k="${results[$mib,$cores,agent,rssmed]}" 'BEGIN { print k / 1024 }')" 16) MiB"
    done
done
