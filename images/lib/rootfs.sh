# Shared helpers for the image recipes (sourced by images/*/build, POSIX sh).
# They build a minimal rootfs by copying host binaries plus the libraries `ldd` lists,
# and write an OCI config.json for a service that runs as its own non-root user
# inside a user namespace (uid/gid 0 -> 0, size 65536: CRIU can then dump it without
# CAP_SYS_RESOURCE, which hosts such as CI lack) and its own network namespace.

die() { printf '%s: error: %s\n' "${PROG:-build}" "$*" >&2; exit 1; }
log() { printf '%s: %s\n' "${PROG:-build}" "$*" >&2; }

# need_root: the recipes chown to the service user, chroot and mount.
need_root() { [ "$(id -u)" = 0 ] || die "run as root (it chowns files to the service user and uses chroot)"; }

# need_pkg PKG FILE...: make sure every FILE exists, installing the Debian package PKG
# with apt-get when running as root; otherwise fail saying which package to install.
need_pkg() {
  _pkg=$1; shift
  _missing=
  for _f in "$@"; do [ -e "$_f" ] || _missing="$_missing $_f"; done
  [ -z "$_missing" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian package $_pkg (missing:$_missing)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$_pkg" >/dev/null 2>&1 || {
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$_pkg" >/dev/null
    } || die "apt-get install $_pkg failed"
    for _f in "$@"; do [ -e "$_f" ] || die "$_f still missing after installing $_pkg"; done
  else
    die "missing$_missing: install the Debian package '$_pkg' (apt-get install $_pkg), or run this recipe as root"
  fi
}

# rootfs_init ROOT: an empty merged-/usr tree (bin, sbin, lib, lib64 -> usr/...).
rootfs_init() {
  _r=$1
  mkdir -p "$_r/usr/bin" "$_r/usr/sbin" "$_r/usr/lib/x86_64-linux-gnu" "$_r/usr/lib64" \
           "$_r/usr/local/bin" "$_r/etc" "$_r/proc" "$_r/sys" "$_r/dev" "$_r/tmp" \
           "$_r/var/tmp" "$_r/run" "$_r/root"
  ln -s usr/bin "$_r/bin"; ln -s usr/sbin "$_r/sbin"
  ln -s usr/lib "$_r/lib"; ln -s usr/lib64 "$_r/lib64"
  chmod 1777 "$_r/tmp" "$_r/var/tmp"
  chmod 700 "$_r/root"
  printf '127.0.0.1 localhost\n::1 localhost\n' > "$_r/etc/hosts"
  : > "$_r/etc/resolv.conf"
  printf '/bin/sh\n' > "$_r/etc/shells"
  printf 'passwd: files\ngroup: files\nhosts: files\n' > "$_r/etc/nsswitch.conf"
}

# rootfs_users ROOT NAME UID GID HOME: passwd/group with root, NAME and nobody.
rootfs_users() {
  _r=$1 _n=$2 _u=$3 _g=$4 _h=$5
  printf 'root:x:0:0:root:/root:/bin/sh\n%s:x:%s:%s:%s:%s:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' \
    "$_n" "$_u" "$_g" "$_n" "$_h" > "$_r/etc/passwd"
  printf 'root:x:0:\n%s:x:%s:\nnogroup:x:65534:\n' "$_n" "$_g" > "$_r/etc/group"
  printf 'root:*::0:99999:7:::\n%s:*::0:99999:7:::\n' "$_n" > "$_r/etc/shadow"
  chmod 640 "$_r/etc/shadow"
}

# copy_file ROOT PATH: copy PATH into ROOT at the same path, dereferencing it; when PATH is
# a symlink, the link is recreated too (binaries such as redis-server look at argv[0]).
copy_file() {
  _r=$1 _p=$2
  [ -e "$_p" ] || die "copy_file: $_p does not exist"
  _real=$(readlink -f "$_p")
  mkdir -p "$_r$(dirname "$_real")"
  [ -e "$_r$_real" ] || cp -p "$_real" "$_r$_real"
  if [ "$_real" != "$_p" ] && [ ! -e "$_r$_p" ] && [ ! -L "$_r$_p" ]; then
    mkdir -p "$_r$(dirname "$_p")"
    if [ "$(readlink -f "$(dirname "$_p")")" = "$(dirname "$_real")" ]; then
      ln -s "$(basename "$_real")" "$_r$_p"     # same directory: relative link
    else
      ln -s "$_real" "$_r$_p"
    fi
  fi
}

# copy_libs ROOT FILE...: copy the shared libraries FILE... need (per ldd) into ROOT.
copy_libs() {
  _r=$1; shift
  for _lib in $(ldd "$@" 2>/dev/null | awk '
      $2 == "=>" && $3 ~ /^\// { print $3; next }
      $1 ~ /^\// && $1 !~ /:$/ { print $1 }' | sort -u); do
    copy_file "$_r" "$_lib"
  done
}

# copy_bins ROOT BIN...: copy binaries and their libraries.
copy_bins() {
  _r=$1; shift
  for _b in "$@"; do copy_file "$_r" "$_b"; done
  copy_libs "$_r" "$@"
}

# add_busybox ROOT: static busybox with applet links for every name not already present
# (the service wrappers use its sh, ip and su).
add_busybox() {
  _r=$1
  _bb=/bin/busybox
  need_pkg busybox-static "$_bb"
  file -L "$_bb" 2>/dev/null | grep -q 'statically linked' ||
    ldd "$_bb" 2>&1 | grep -q 'not a dynamic' ||
    die "$_bb is dynamically linked: install busybox-static"
  cp "$_bb" "$_r/usr/bin/busybox"
  # busybox makes its own links (one process instead of ~270 ln); it leaves existing files
  chroot "$_r" /usr/bin/busybox --install -s 2>/dev/null || die "busybox --install failed in $_r"
  rm -f "$_r/linuxrc"
}

# json_args ARG...: a JSON array body of the arguments.
json_args() {
  _out=
  for _a in "$@"; do
    _esc=$(printf '%s' "$_a" | sed 's/\\/\\\\/g; s/"/\\"/g')
    _out="$_out${_out:+, }\"$_esc\""
  done
  printf '%s' "$_out"
}

# write_config BUNDLE HOSTNAME ENV_JSON ARG...: config.json for a service container: root
# (mapped to host root) in a user namespace with uid/gid 0 -> 0 size 65536, its own
# network, pid, ipc, uts and mount namespaces, writable rootfs, /tmp on tmpfs.
# The process starts as root with CAP_NET_ADMIN (to bring loopback up) and
# CAP_SETUID/CAP_SETGID (to switch to the service user with su); capabilities are
# dropped at that switch. ENV_JSON: extra comma-separated JSON strings (or "").
write_config() {
  _b=$1 _host=$2 _env=$3; shift 3
  _caps='"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETUID", "CAP_SETGID", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE"'
  cat > "$_b/config.json" <<JSON
{
  "ociVersion": "1.0.2",
  "process": {
    "terminal": false,
    "user": {"uid": 0, "gid": 0},
    "args": [$(json_args "$@")],
    "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm", "HOME=/root"${_env:+, $_env}],
    "cwd": "/",
    "capabilities": {
      "bounding": [$_caps],
      "effective": [$_caps],
      "permitted": [$_caps]
    },
    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
    "noNewPrivileges": true
  },
  "root": {"path": "rootfs", "readonly": false},
  "hostname": "$_host",
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=262144k"]},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
  ],
  "linux": {
    "uidMappings": [{"containerID": 0, "hostID": 0, "size": 65536}],
    "gidMappings": [{"containerID": 0, "hostID": 0, "size": 65536}],
    "resources": {"devices": [{"allow": false, "access": "rwm"}]},
    "namespaces": [
      {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "user"}
    ],
    "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
      "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
    "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
  }
}
JSON
}

# write_start ROOT USER CMDLINE: /usr/local/bin/start, the container's entry point: brings
# loopback up in the container's fresh network namespace, then becomes USER and execs
# CMDLINE (a shell command line without single quotes), so the service ends up as the
# container's pid 1 with no shell left around it.
write_start() {
  _r=$1 _u=$2 _c=$3
  case $_c in *"'"*) die "write_start: no single quotes in the command line, please" ;; esac
  cat > "$_r/usr/local/bin/start" <<SH
#!/bin/sh
# Entry point: loopback up (a new network namespace starts with it down), then run the
# service as $_u. stdout/stderr are whatever the runtime gives (use /dev/null or pipes:
# CRIU cannot dump a container whose stdio is a host file).
set -e
# libcontainer 0.7.0 (stasis's container core) re-opens a /dev/null stdio read-only
# (runc opens it O_RDWR): writes to stdout/stderr then fail with EBADF, which kills
# programs that check (Python's print). Re-open such descriptors for writing.
for fd in 1 2; do
  [ "\$(readlink /proc/\$\$/fd/\$fd 2>/dev/null)" != /dev/null ] || eval "exec \$fd>/dev/null"
done
ip link set lo up
cd /
exec su -s /bin/sh -c 'exec $_c' $_u
SH
  chmod 755 "$_r/usr/local/bin/start"
}

# now_ms: wall clock in milliseconds.
now_ms() { date +%s%3N; }
