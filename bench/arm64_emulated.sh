#!/usr/bin/env bash
# The device side of fedboard on an emulated Raspberry Pi 4 (arm64, Cortex-A72 under qemu-user).
#
#   sudo bash bench/arm64_emulated.sh              # everything
#   sudo bash bench/arm64_emulated.sh --skip-tests # root, install, import checks, the real round, numerics
#
# 1. builds (once, cached in $FEDBOARD_ARM64_ROOT, default /var/tmp/fedboard-arm64) a Debian
#    bookworm arm64 root with debootstrap from the Debian mirror apt already uses on this host,
#    qemu-user-static registered through binfmt_misc (apt-get installs what is missing);
# 2. bind-mounts a Raspberry Pi 4 /proc/cpuinfo (bench/arm64/cpuinfo-pi4.txt) over the guest's:
#    qemu-user passes the host's x86 cpuinfo through and LiteRT's CPU detection crashes on it; and
#    /proc, /dev, /sys; copies the checkout's working tree in; gives pip in the root the host's pip
#    settings (indexes, find-links, CA bundle, constraints; local directories bind-mounted read-only);
# 3. installs `fedboard[edge]` from that copy into a venv in the root (plus pytest, hypothesis) and
#    checks that `import tensorflow` fails there and `import edge_client, protocol` works;
# 4. runs the device-side tests in the root (list below; bundles they need are exported on the host
#    with TensorFlow and handed in by bench/arm64/edge_bundles_plugin.py);
# 5. runs one real round: Mosquitto (`fedboard broker-config`: passwords, ACL) and `fedboard
#    aggregator` on the host (x86) on 127.0.0.1, `fedboard client add-text` then `fedboard client`
#    in the root (arm64): round 1 must commit v1 with the arm64 update accepted; round 2's plan
#    brings v1 to the device (which trains round 2 on it); then `fedboard predict` in the root;
# 6. numerics: 1 and 10 training steps on x86 and arm64 (same bundle, weights, batch), and codec
#    payloads of a fixed update, which must be bit-identical (bench/arm64/one_step.py);
# 7. prints what it measured; exits non-zero if anything failed. Idempotent (run it again: the root,
#    the venv and the host-exported bundles are reused); stops and unmounts all it started (trap EXIT).
#
# Time on 2 shared cores: debootstrap 6-10 min (first run only), pip about 1.5 min, host exports
# about 1 min (when models/ or the bundle tests changed), tests 6-8 min, the rest under 1 min.
# Knobs: QEMU_CPU (cortex-a72 = Pi 4, cortex-a76 = Pi 5), FEDBOARD_ARM64_TESTS="test_x test_y",
# FEDBOARD_ARM64_TEST_BUDGET_S (900), FEDBOARD_ARM64_ROUND_TIMEOUT_S (600), FEDBOARD_EXAMPLES
# (Hypothesis examples per property in the root, 10), PYTHON (the host's interpreter).
# Needs root, a Debian mirror and PyPI, and on the host the checkout's server side (TensorFlow,
# pytest: `pip install -e '.[dev]'`, as .ci/run does). Emulation is 30-100x slower than a real
# device: this checks correctness on arm64, never speed.
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
CACHE="${FEDBOARD_ARM64_ROOT:-/var/tmp/fedboard-arm64}"
ROOTFS="$CACHE/rootfs"
SUITE="${FEDBOARD_ARM64_SUITE:-bookworm}"
QEMU_CPU="${QEMU_CPU:-cortex-a72}"        # a Raspberry Pi 4; cortex-a76 for a Pi 5
export QEMU_CPU
HOST_PY="${PYTHON:-python3}"
GUEST_SRC=/opt/fedboard-src                # the checkout's copy inside the root
GUEST_VENV=/opt/fedboard-venv
GUEST_WORK=/opt/fedboard-run               # bundles, client state, test scratch (inside the root)
TEST_BUDGET_S="${FEDBOARD_ARM64_TEST_BUDGET_S:-900}"
ROUND_TIMEOUT_S="${FEDBOARD_ARM64_ROUND_TIMEOUT_S:-600}"
RUN_TESTS=1
for arg in "$@"; do
  case "$arg" in
    --skip-tests) RUN_TESTS=0 ;;
    -h|--help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

SCRIPT_START=$(date +%s.%N)
declare -a PHASES=() MOUNTS=() PIDS=() FAILURES=()
declare -A RESULT=()

log() { printf '[arm64 %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
now() { date +%s.%N; }
phase_start() { PHASE_NAME="$1"; PHASE_T0=$(now); log "== $1"; }
phase_end() {
  local dt; dt=$(awk -v a="$PHASE_T0" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}')
  PHASES+=("$(printf '%-44s %8s s' "$PHASE_NAME" "$dt")"); log "== $PHASE_NAME: ${dt} s"
}

# ---------------------------------------------------------------------------------------------
# cleanup: everything started or mounted by this run, in reverse order
cleanup() {
  local rc=$?
  set +e
  local pid
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do
    pid=${PIDS[i]}
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
    fi
  done
  kill_root_processes
  unmount_all
  [ $rc -ne 0 ] && log "exit status $rc (phase: ${PHASE_NAME:-none})"
  exit $rc
}
kill_root_processes() {  # anything left running inside the root: only this script's chroots start them
  local p
  [ -d "$ROOTFS" ] || return 0
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOTFS" ] && kill -KILL "${p#/proc/}" 2>/dev/null
  done
  return 0
}
unmount_all() {
  local m
  for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do
    m=${MOUNTS[i]}
    if mountpoint -q "$m" 2>/dev/null; then umount -R "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"; fi
  done
  MOUNTS=()
  # also anything left below the root by an earlier, killed run
  if [ -d "$ROOTFS" ]; then
    awk -v r="$ROOTFS/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  fi
}
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot and bind mounts need it)" >&2; exit 1; }
mkdir -p "$CACHE"
exec 9>"$CACHE/lock"   # one run at a time per root: a second one would unmount the first's mounts
flock -n 9 || { echo "another run holds $CACHE/lock" >&2; exit 1; }
trap cleanup EXIT
trap 'exit 130' INT TERM


# ---------------------------------------------------------------------------------------------
# host packages and binfmt
ensure_host_packages() {
  local need=()
  command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
  command -v update-binfmts >/dev/null || [ -x /usr/sbin/update-binfmts ] || need+=(binfmt-support)
  command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
  [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
  if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  export PATH="$PATH:/usr/sbin:/sbin"
}

ensure_binfmt() {
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc"
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 || die "cannot register qemu-aarch64 with binfmt_misc"
  fi
  grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "binfmt qemu-aarch64 is disabled"
}

# The Debian mirror apt already uses on this host (one-line and deb822 formats).
debian_mirror() {
  local files=() f uri
  [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do [ -f "$f" ] && files+=("$f"); done
  uri=$(awk '
    /^[[:space:]]*#/ {next}
    FILENAME ~ /\.sources$/ {
      if ($1 == "URIs:") for (i = 2; i <= NF; i++) print $i
      next
    }
    $1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }
  ' "${files[@]}" 2>/dev/null | grep -E '/debian/?$' | head -n1)
  echo "${uri:-http://deb.debian.org/debian}"
}

build_root() {
  if [ -f "$CACHE/rootfs.ok" ] && [ -x "$ROOTFS/usr/bin/python3" ]; then
    log "reusing the arm64 root $ROOTFS ($(cat "$CACHE/rootfs.ok"))"
    return
  fi
  unmount_all
  # never delete through a bind mount (the host's /dev, /sys, ...)
  if awk -v r="$ROOTFS/" 'index($2, r) == 1 {found = 1} END {exit !found}' /proc/mounts; then
    die "something is still mounted below $ROOTFS; unmount it before the root is rebuilt"
  fi
  rm -rf --one-file-system "$ROOTFS" "$CACHE/rootfs.ok"
  mkdir -p "$CACHE/debs" "$ROOTFS"
  local mirror; mirror=$(debian_mirror)
  log "debootstrap $SUITE arm64 from $mirror (first stage)"
  debootstrap --arch=arm64 --foreign --variant=minbase --cache-dir="$CACHE/debs" \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
    "$SUITE" "$ROOTFS" "$mirror" >"$CACHE/debootstrap-1.log" 2>&1 \
    || { tail -n 30 "$CACHE/debootstrap-1.log" >&2; die "debootstrap first stage"; }
  install -m 0755 "$(command -v qemu-aarch64-static)" "$ROOTFS/usr/bin/qemu-aarch64-static"
  log "debootstrap second stage (emulated)"
  chroot "$ROOTFS" /debootstrap/debootstrap --second-stage >"$CACHE/debootstrap-2.log" 2>&1 \
    || { tail -n 30 "$CACHE/debootstrap-2.log" >&2; tail -n 30 "$ROOTFS/debootstrap/debootstrap.log" >&2 2>/dev/null; die "debootstrap second stage"; }
  printf 'deb %s %s main\n' "$mirror" "$SUITE" >"$ROOTFS/etc/apt/sources.list"
  echo "debian $SUITE arm64 from $mirror, built $(date -u +%FT%TZ)" >"$CACHE/rootfs.ok"
}

# ---------------------------------------------------------------------------------------------
# the guest: mounts, environment, the checkout's copy
guest_packages() {
  # packages the root needs besides debootstrap's --include (an older cached root may lack them)
  local missing=() p
  for p in mosquitto; do
    [ -e "$ROOTFS/usr/sbin/$p" ] || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]} in the root"
    # no daemon may start inside the root (mosquitto's package would start its service)
    printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"; chmod 0755 "$ROOTFS/usr/sbin/policy-rc.d"
    in_root_raw apt-get update -qq
    in_root_raw apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    in_root_raw apt-get clean
  fi
}

bind() {  # bind SRC DEST [ro]
  local src=$1 dest=$2
  [ -d "$src" ] && mkdir -p "$dest" || { mkdir -p "$(dirname "$dest")"; [ -e "$dest" ] || touch "$dest"; }
  mount --bind "$src" "$dest"
  MOUNTS+=("$dest")
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$dest"; fi
}

mount_guest() {
  unmount_all
  mkdir -p "$ROOTFS/proc" "$ROOTFS/sys" "$ROOTFS/dev"
  mount -t proc proc "$ROOTFS/proc"; MOUNTS+=("$ROOTFS/proc")
  # qemu-user shows the guest the host's x86 /proc/cpuinfo; LiteRT's CPU detection crashes on it
  bind "$HERE/arm64/cpuinfo-pi4.txt" "$ROOTFS/proc/cpuinfo" ro
  mount --rbind /sys "$ROOTFS/sys"; mount --make-rslave "$ROOTFS/sys"; MOUNTS+=("$ROOTFS/sys")
  mount --rbind /dev "$ROOTFS/dev"; mount --make-rslave "$ROOTFS/dev"; MOUNTS+=("$ROOTFS/dev")
  cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true
  cp -L /etc/hosts "$ROOTFS/etc/hosts" 2>/dev/null || true
  guest_pip_config
}

# pip inside the root: the host's pip settings (index, extra indexes, find-links, CA bundle,
# constraints, timeouts) as the root's /etc/pip.conf; local directories they name are bind-mounted
# read-only at the same paths, the CA bundle and constraint files copied.
guest_pip_config() {
  local conf="$ROOTFS/etc/pip.conf" key value item dir
  local -A seen=()
  : >"$CACHE/pip-settings"
  PYTHONPATH= "$HOST_PY" -m pip config list 2>/dev/null >"$CACHE/pip-settings" || true
  {
    echo "# written by bench/arm64_emulated.sh from the host's pip configuration"
    echo "[global]"
    while IFS= read -r line; do
      key=${line%%=*}; key=${key#*.}; value=${line#*=}; value=${value#\'}; value=${value%\'}
      [ -n "${seen[$key]:-}" ] && continue
      case "$key" in
        index-url|extra-index-url|find-links|trusted-host|default-timeout|timeout|retries|proxy|prefer-binary|only-binary) ;;
        cert|client-cert|constraint) ;;
        *) continue ;;
      esac
      seen[$key]=1
      if [ "$key" = cert ] || [ "$key" = constraint ] || [ "$key" = client-cert ]; then
        [ -f "$value" ] || continue
        mkdir -p "$ROOTFS/etc/fedboard-arm64"
        cp -L "$value" "$ROOTFS/etc/fedboard-arm64/$key"
        value="/etc/fedboard-arm64/$key"
      else
        for item in $value; do
          dir=""
          case "$item" in
            file://*) dir=${item#file://} ;;
            /*) dir=$item ;;
          esac
          [ -n "$dir" ] && [ -d "$dir" ] || continue
          [ "$(basename "$dir")" = simple ] && dir=$(dirname "$dir")   # a PEP 503 tree links to ../files
          mountpoint -q "$ROOTFS$dir" || bind "$dir" "$ROOTFS$dir" ro
        done
      fi
      echo "$key = $value"
    # one value per key; the environment (:env:, sorted first) wins over the config files, as in pip
    done < <(grep -E "^(:env:|global|install)\." "$CACHE/pip-settings" | sort -t. -k1,1 -s | awk -F= '{k=$1; sub(/^[^.]*\./, "", k); if (!(k in s)) {s[k]=1; print}}')
    # the host's environment may name a CA bundle for pip and for Python's ssl
    if [ -z "${seen[cert]:-}" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
      mkdir -p "$ROOTFS/etc/fedboard-arm64"
      cp -L /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/fedboard-arm64/cert"
      echo "cert = /etc/fedboard-arm64/cert"
    fi
  } >"$conf"
}

# Run a command in the root, as the device would: a clean environment, the Pi's CPU.
# BG_EXEC=exec FUNCTION ... &: the background job's PID is then the command's own (signals reach it)
in_root_raw() {
  ${BG_EXEC:-} chroot "$ROOTFS" /usr/bin/env -i HOME=/root LANG=C.UTF-8 LC_ALL=C.UTF-8 TERM=dumb \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin QEMU_CPU="$QEMU_CPU" \
    DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    ${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} ${no_proxy:+no_proxy=$no_proxy} \
    ${HTTP_PROXY:+HTTP_PROXY=$HTTP_PROXY} ${HTTPS_PROXY:+HTTPS_PROXY=$HTTPS_PROXY} ${NO_PROXY:+NO_PROXY=$NO_PROXY} \
    "$@"
}
in_venv() {  # in_venv DIR CMD...: in the root's venv, working directory DIR
  local dir=$1; shift
  in_root_raw /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$dir" \
    env PATH="$GUEST_VENV/bin:/usr/sbin:/usr/bin:/sbin:/bin" VIRTUAL_ENV="$GUEST_VENV" PYTHONDONTWRITEBYTECODE=1 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt "$@"
}

copy_checkout() {
  # The working tree as it is (tracked and untracked files, .gitignore honoured), not HEAD.
  rm -rf "$ROOTFS$GUEST_SRC"
  mkdir -p "$ROOTFS$GUEST_SRC"
  (cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$ROOTFS$GUEST_SRC"
}

# ---------------------------------------------------------------------------------------------
# host side: bundles, keys, broker, aggregator (the checkout's code, with TensorFlow)
host_fedboard() { ${BG_EXEC:-} env PYTHONPATH="$REPO" TF_CPP_MIN_LOG_LEVEL=2 "$HOST_PY" -m device_sim.cli "$@"; }

sources_hash() {  # a hash of the files that determine the host-exported artefacts
  (cd "$REPO" && cat models/*.py "$@" | sha256sum | cut -c1-16)
}

free_port() { "$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() {  # wait_for TIMEOUT_S DESCRIPTION COMMAND...: poll every second
  local timeout=$1 what=$2; shift 2
  local t0=$SECONDS
  until "$@"; do
    if (( SECONDS - t0 >= timeout )); then log "timed out after ${timeout} s waiting for $what"; return 1; fi
    sleep 1
  done
}

elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

# ---------------------------------------------------------------------------------------------
# Device-side tests: they import edge_client, protocol and the device's models only (all of them
# take about 8 min emulated on 2 busy cores, with Hypothesis at 10 examples per property). Those
# with a training bundle get it from the host (TensorFlow), recorded by
# bench/arm64/edge_bundles_plugin.py. Left out: test_edge_install.py (links the host's own
# installation into a venv) and test_device.py (runs the aggregator in-process: server extra; the
# real round below covers device and aggregator end to end). FEDBOARD_ARM64_TESTS="test_a test_b"
# runs those instead.
BUNDLE_TESTS=(test_runtime test_trainer test_suggest)
DEVICE_TESTS=(
  test_bundle test_cli_entry test_client_config test_config test_corpus test_eligibility test_envelope
  test_linux_platform test_local_dp test_messages test_model_message test_mqtt_hub test_no_tensorflow
  test_outbox test_partition test_platform test_residuals test_signing test_synthetic test_task
  test_text_windows test_textstore test_timers test_tokenizer test_topics test_transport
  test_codec_bitpack test_codec_container test_codec_floats test_codec_indices test_codec_pipeline
  test_codec_quantize test_codec_quantize_chunked test_codec_sign test_codec_sparsify test_codec_spec
  test_codec_stages test_codec_transforms test_codec_zstd_stage
  test_secagg_client test_secagg_device test_secagg_driver test_secagg_errors test_secagg_keys
  test_secagg_messages test_secagg_params test_secagg_prg test_secagg_quantize test_secagg_server
  test_secagg_shamir
  "${BUNDLE_TESTS[@]}"
)
if [ -n "${FEDBOARD_ARM64_TESTS:-}" ]; then read -r -a DEVICE_TESTS <<<"$FEDBOARD_ARM64_TESTS"; fi
# Not run in the root, each with its reason (printed in the summary):
DESELECT=(
  "tests/test_synthetic.py::test_generation_is_fast"
)
DESELECT_WHY=(
  "a speed assertion: it measures the emulator, not the device"
)

record_host_bundles() {
  local dir="$CACHE/host/test-bundles" files=() t stamp
  for t in "${BUNDLE_TESTS[@]}"; do files+=("tests/$t.py"); done
  stamp=$(sources_hash tests/conftest.py "${files[@]}" bench/arm64/edge_bundles_plugin.py)
  mkdir -p "$CACHE/host"
  if [ "$(cat "$dir.ok" 2>/dev/null)" = "$stamp" ]; then
    log "reusing the host-exported test bundles ($dir)"
  else
    log "exporting the test bundles on the host: pytest ${files[*]} (record)"
    rm -rf "$dir" "$dir.ok"; mkdir -p "$dir"
    (cd "$REPO" && PYTHONPATH="$REPO/bench/arm64" FEDBOARD_BUNDLES_DIR="$dir" FEDBOARD_BUNDLES_MODE=record \
       TF_CPP_MIN_LOG_LEVEL=2 timeout --kill-after=30 900 "$HOST_PY" -m pytest -q -p no:cacheprovider \
       -p edge_bundles_plugin "${files[@]}" >"$RUN/host-record.log" 2>&1) \
      || { tail -n 40 "$RUN/host-record.log" >&2; die "the host's bundle-recording test run failed"; }
    echo "$stamp" >"$dir.ok"
  fi
  rm -rf "$ROOTFS$GUEST_WORK/test-bundles"; cp -a "$dir" "$ROOTFS$GUEST_WORK/test-bundles"
}

run_guest_tests() {
  local files=() t rc=0 deselect=()
  for t in "${DEVICE_TESTS[@]}"; do files+=("tests/$t.py"); done
  for t in "${DESELECT[@]}"; do deselect+=(--deselect "$t"); done
  log "pytest in the root (${#files[@]} files, budget ${TEST_BUDGET_S} s)"
  set +e
  in_venv "$GUEST_SRC" env PYTHONPATH="$GUEST_SRC/bench/arm64" FEDBOARD_BUNDLES_DIR="$GUEST_WORK/test-bundles" \
    FEDBOARD_BUNDLES_MODE=replay HYPOTHESIS_PROFILE=emulated CI=1 \
    timeout --kill-after=30 "$TEST_BUDGET_S" python -m pytest -q -p no:cacheprovider -p edge_bundles_plugin \
    -rs --durations=15 "${deselect[@]}" "${files[@]}" >"$RUN/pytest.log" 2>&1
  rc=$?
  set -e
  RESULT[tests_summary]=$(grep -E '(passed|failed|error|skipped).* in [0-9.]+s' "$RUN/pytest.log" | tail -n1)
  RESULT[tests_files]="${#files[@]} files: ${DEVICE_TESTS[*]}"
  RESULT[tests_skips]=$(grep -E '^SKIPPED' "$RUN/pytest.log" | sed 's/^/  /' || true)
  tail -n 30 "$RUN/pytest.log" >&2
  # a failure is reported at the end; the round still runs
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    FAILURES+=("the device-side tests overran their ${TEST_BUDGET_S} s budget (log: $RUN/pytest.log)")
  elif [ $rc -ne 0 ]; then
    FAILURES+=("device-side tests failed in the root, pytest status $rc (log: $RUN/pytest.log)")
  fi
}

# ---------------------------------------------------------------------------------------------
main() {
  RUN="$CACHE/run"          # this run's host-side files (logs, broker, keys); replaced every run
  phase_start "host packages, binfmt"
  ensure_host_packages
  ensure_binfmt
  phase_end

  phase_start "arm64 root (debootstrap, or reuse)"
  build_root
  RESULT[root]=$(cat "$CACHE/rootfs.ok")
  phase_end

  phase_start "mounts, guest packages, copy of the checkout"
  rm -rf "$RUN"; mkdir -p "$RUN"
  mount_guest
  guest_packages
  copy_checkout
  rm -rf "$ROOTFS$GUEST_WORK"; mkdir -p "$ROOTFS$GUEST_WORK"
  phase_end

  phase_start "pip install fedboard[edge] in the root"
  [ -x "$ROOTFS$GUEST_VENV/bin/python" ] || in_root_raw python3 -m venv "$GUEST_VENV"
  in_venv / python -m pip install -q "$GUEST_SRC[edge]" pytest hypothesis pytest-timeout \
    >"$RUN/pip.log" 2>&1 || { tail -n 30 "$RUN/pip.log" >&2; die "pip install in the root"; }
  # the checkout changes between runs at the same version number: always reinstall it
  in_venv / python -m pip install -q --no-deps --force-reinstall "$GUEST_SRC" >>"$RUN/pip.log" 2>&1 \
    || { tail -n 30 "$RUN/pip.log" >&2; die "pip install (the checkout) in the root"; }
  RESULT[venv_mb]=$(du -sm "$ROOTFS$GUEST_VENV" | cut -f1)
  phase_end

  phase_start "import checks in the root"
  in_venv / python -c "$IMPORT_CHECK" >"$RUN/imports.log" 2>&1 || { cat "$RUN/imports.log" >&2; die "import checks"; }
  RESULT[guest]=$(tail -n1 "$RUN/imports.log")
  log "${RESULT[guest]}"
  phase_end

  if [ "$RUN_TESTS" = 1 ]; then
    phase_start "host: export the tests' bundles (TensorFlow)"
    record_host_bundles
    phase_end
    phase_start "device-side tests in the root"
    run_guest_tests
    phase_end
  else
    RESULT[tests_summary]="skipped (--skip-tests)"
  fi

  phase_start "host: small bundle, keys, broker"
  local bundle="$CACHE/host/small.fbz" stamp
  stamp=$(sources_hash)
  mkdir -p "$CACHE/host"
  if [ "$(cat "$bundle.ok" 2>/dev/null)" != "$stamp" ] || [ ! -f "$bundle" ]; then
    host_fedboard export-bundle --corpus builtin --vocab-size 500 --embed-dim 16 --units 32 --out "$bundle" \
      >"$RUN/export.log" 2>&1 || { tail -n 20 "$RUN/export.log" >&2; die "export-bundle on the host"; }
    echo "$stamp" >"$bundle.ok"
  fi
  host_fedboard keygen --out "$RUN/keys" >/dev/null
  local port; port=$(free_port)
  host_fedboard broker-config --out "$RUN/broker" --devices 1 --fleet pi --device-prefix pi --port "$port" \
    --bind 127.0.0.1 --user root >/dev/null
  mosquitto -c "$RUN/broker/mosquitto.conf" >"$RUN/mosquitto.log" 2>&1 &
  PIDS+=($!)
  wait_for 20 "mosquitto on 127.0.0.1:$port" \
    "$HOST_PY" -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null \
    || { cat "$RUN/mosquitto.log" >&2; die "mosquitto did not start"; }
  # the device's files, as a Pi would have them
  local g="$ROOTFS$GUEST_WORK"
  cp "$RUN/keys/aggregator.pub" "$g/aggregator.pub"
  cp "$RUN/broker/credentials/pi-0001.password" "$g/broker.password"
  printf '%s\n' \
    '[device]' 'id = "pi-0001"' 'fleet = "pi"' 'state_dir = "state"' 'data = "state/texts.db"' '' \
    '[broker]' 'host = "127.0.0.1"' "port = $port" 'username = "pi-0001"' 'password_file = "broker.password"' \
    'keepalive_s = 30' 'bootstrap_timeout_s = 300' '' \
    '[trust]' 'aggregator_public_key = "aggregator.pub"' '' \
    '[policy]' 'require_idle = false' 'require_unmetered = false' 'require_charging = false' \
    'max_cpu_temp_c = 200' 'min_free_memory_mb = 0' '' \
    '[training]' 'threads = 1' >"$g/client.toml"
  (cd "$REPO" && PYTHONPATH="$REPO" "$HOST_PY" -c "$SAMPLE_TEXTS") >"$g/texts.txt"
  RESULT[bundle]="$(du -k "$bundle" | cut -f1) KB, exported on x86 (builtin corpus, vocab 500, embed 16, units 32)"
  phase_end

  phase_start "arm64 client add-text"
  local texts=(); mapfile -t texts <"$g/texts.txt"
  in_venv "$GUEST_WORK" fedboard client --config client.toml add-text "${texts[@]}" >"$RUN/add-text.log" 2>&1 \
    || { cat "$RUN/add-text.log" >&2; die "client add-text in the root"; }
  RESULT[add_text]=$(tail -n1 "$RUN/add-text.log")
  phase_end

  phase_start "one real round (x86 aggregator, arm64 client)"
  # Two rounds: a device fetches a new model when the next round's plan arrives, so round 2's plan
  # is what brings the committed v1 to the device (which then trains round 2 on it); without a
  # round 3 the device keeps v1, which predict then answers from.
  BG_EXEC=exec host_fedboard aggregator --bundle "$bundle" --key "$RUN/keys/aggregator.key" --broker "127.0.0.1:$port" \
    --username aggregator --password-file "$RUN/broker/credentials/aggregator.password" --fleet pi \
    --clients-per-round 1 --over-selection 1 --expected-checkins 1 --min-reports 1 --no-pace-steering \
    --checkin-window-s "$ROUND_TIMEOUT_S" --report-deadline-s "$ROUND_TIMEOUT_S" --codec q8 --local-epochs 1 \
    --max-steps 4 --rounds 2 --checkpoint-dir "$RUN/aggregator-state" --metrics-jsonl "$RUN/metrics.jsonl" \
    >"$RUN/aggregator.log" 2>&1 &
  local agg=$!; PIDS+=($agg)
  BG_EXEC=exec in_venv "$GUEST_WORK" fedboard client --config client.toml >"$RUN/client.log" 2>&1 &
  local client=$!; PIDS+=($client)
  local t0; t0=$(now)
  wait_for "$ROUND_TIMEOUT_S" "round 1 to end" grep -qE '^round 1: ' "$RUN/aggregator.log" \
    || { tail -n 30 "$RUN/aggregator.log" "$RUN/client.log" >&2; die "round 1 did not end in ${ROUND_TIMEOUT_S} s"; }
  RESULT[round]=$(grep -m1 -E '^round 1: ' "$RUN/aggregator.log")
  RESULT[round_s]=$(elapsed "$t0")
  grep -qE '^round 1: committed v1 1/1 reports' "$RUN/aggregator.log" \
    || { tail -n 40 "$RUN/aggregator.log" "$RUN/client.log" >&2; die "round 1 did not commit with the arm64 update"; }
  wait_for 120 "the client's ack" grep -q 'accepted=True' "$RUN/client.log" \
    || { tail -n 40 "$RUN/client.log" >&2; die "the arm64 client never saw its update accepted"; }
  RESULT[ack]=$(grep -m1 -E 'accepted=True' "$RUN/client.log" | sed 's/^ *//')
  wait_for "$ROUND_TIMEOUT_S" "round 2 to end (the aggregator to exit)" bash -c "! kill -0 $agg 2>/dev/null" \
    || { tail -n 30 "$RUN/aggregator.log" "$RUN/client.log" >&2; die "round 2 did not end in ${ROUND_TIMEOUT_S} s"; }
  local rc=0; wait "$agg" || rc=$?
  RESULT[aggregator_exit]=$rc
  [ "$rc" -eq 0 ] || FAILURES+=("the aggregator exited with status $rc (log: $RUN/aggregator.log)")
  RESULT[round2]=$(grep -m1 -E '^round 2: ' "$RUN/aggregator.log" || echo "no round 2")
  if grep -q 'trusted model version 1 saved' "$RUN/client.log"; then
    RESULT[model_v1]=$(grep -m1 'trusted model version 1 saved' "$RUN/client.log" | sed 's/^ *//')
  else
    RESULT[model_v1]="not received"
    FAILURES+=("the arm64 client did not receive and save the committed model v1 (log: $RUN/client.log)")
  fi
  kill -TERM "$client" 2>/dev/null || true
  wait_for 120 "the client to stop" bash -c "! kill -0 $client 2>/dev/null" || kill -KILL "$client"
  rc=0; wait "$client" || rc=$?
  RESULT[client_exit]=$rc
  [ "$rc" -eq 0 ] || FAILURES+=("the arm64 client exited with status $rc after SIGTERM (log: $RUN/client.log)")
  RESULT[metrics]=$("$HOST_PY" -c "$METRICS_SUMMARY" "$RUN/metrics.jsonl" 2>&1 || true)
  phase_end

  phase_start "arm64 predict"
  in_venv "$GUEST_WORK" fedboard predict "see you at the" --config client.toml >"$RUN/predict.log" 2>&1 \
    || { cat "$RUN/predict.log" >&2; die "predict in the root"; }
  RESULT[predict]=$(grep -vE '^(INFO: |[0-9]{4}-[0-9]{2}-[0-9]{2} )' "$RUN/predict.log" || true)
  phase_end

  phase_start "numerics: 10 training steps, codecs (x86 vs arm64)"
  cp "$bundle" "$g/small.fbz"
  (cd "$REPO" && PYTHONPATH="$REPO" "$HOST_PY" bench/arm64/one_step.py "$bundle" "$RUN/numerics-x86" --steps 10) >/dev/null
  in_venv "$GUEST_WORK" python "$GUEST_SRC/bench/arm64/one_step.py" small.fbz numerics-arm64 --steps 10 >/dev/null
  local nrc=0
  RESULT[numerics]=$(cd "$REPO" && PYTHONPATH="$REPO" "$HOST_PY" bench/arm64/one_step.py --compare \
    "$RUN/numerics-x86" "$g/numerics-arm64") || nrc=$?
  [ $nrc -eq 0 ] || { echo "${RESULT[numerics]}" >&2; die "codec payloads differ between x86 and arm64"; }
  phase_end

  PHASE_NAME="report"
  report
}

IMPORT_CHECK='
import importlib.metadata as md, platform, sys
try:
    import tensorflow  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("tensorflow is importable in the edge venv: fedboard[edge] must not bring it")
import edge_client, protocol, models.runtime  # noqa: F401,E401
from ai_edge_litert.interpreter import Interpreter  # noqa: F401
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("Model")), "?")
litert, numpy = md.version("ai-edge-litert"), md.version("numpy")
print(f"{platform.machine()}, Python {platform.python_version()}, ai-edge-litert {litert}, numpy {numpy}; "
      f"/proc/cpuinfo: {model}; import tensorflow: fails (good); import edge_client, protocol: ok")
'

METRICS_SUMMARY='
import json, sys
m = next(r for r in map(json.loads, filter(str.strip, open(sys.argv[1]))) if r.get("round") == 1)
print(", ".join(f"{k}={m.get(k)}" for k in ("round", "committed", "version", "participants", "goal", "checkins",
                                                "rejected", "train_loss", "uplink_bytes", "model_bytes")))
'

SAMPLE_TEXTS='
from models.synthetic import synthetic_corpus
users = synthetic_corpus(seed=0).users
print("\n".join(users[sorted(users)[0]][:40]))
'

report() {
  local total; total=$(elapsed "$SCRIPT_START")
  printf '\n================ fedboard on emulated arm64 (QEMU_CPU=%s, a Raspberry Pi 4 /proc/cpuinfo) ================\n' "$QEMU_CPU"
  printf 'root:        %s\n' "${RESULT[root]}"
  printf 'guest:       %s\n' "${RESULT[guest]}"
  printf 'venv:        %s MB (%s in the root)\n' "${RESULT[venv_mb]}" "$GUEST_VENV"
  printf 'tests:       %s\n' "${RESULT[tests_summary]:-}"
  printf '             %s\n' "${RESULT[tests_files]:-}"
  [ -n "${RESULT[tests_skips]:-}" ] && printf 'skipped:\n%s\n' "${RESULT[tests_skips]}"
  if [ "$RUN_TESTS" = 1 ]; then
    printf 'deselected:\n'
    for i in "${!DESELECT[@]}"; do printf '  %s: %s\n' "${DESELECT[i]}" "${DESELECT_WHY[i]}"; done
  fi
  printf 'bundle:      %s\n' "${RESULT[bundle]}"
  printf 'add-text:    %s\n' "${RESULT[add_text]}"
  printf 'round:       %s (wall %s s)\n' "${RESULT[round]}" "${RESULT[round_s]}"
  printf 'client ack:  %s\n' "${RESULT[ack]}"
  printf 'model v1:    %s\n' "${RESULT[model_v1]:-}"
  printf 'round 2:     %s (its plan brought v1 to the device)\n' "${RESULT[round2]}"
  printf 'exit status: client %s (SIGTERM), aggregator %s (--rounds 2)\n' "${RESULT[client_exit]}" "${RESULT[aggregator_exit]}"
  printf 'metrics r1:  %s\n' "${RESULT[metrics]}"
  printf 'predict (arm64, from the v1 it saved; full output in predict.log):\n%s\n' "$(sed 's/^/  /' <<<"${RESULT[predict]}")"
  printf 'numerics (x86 vs arm64, same bundle, weights and batch):\n%s\n' "$(sed 's/^/  /' <<<"${RESULT[numerics]}")"
  printf 'phases:\n'; printf '  %s\n' "${PHASES[@]}"
  printf 'total wall time: %s s\n' "$total"
  printf 'logs: %s\n' "$RUN"
  if [ ${#FAILURES[@]} -gt 0 ]; then
    printf 'FAILED:\n'; printf '  %s\n' "${FAILURES[@]}"
    return 1
  fi
  printf 'PASSED\n'
}

main; exit  # one line: bash reads a script as it runs it, so an edit during a run cannot leak in
