#!/usr/bin/env bash
# One full deploy of the compare bench's full build by the release agent, on
# a journaled ext4 loop image, for profiling (docs/performance.md#profiling).
# Run `cargo bench --bench compare` once first: it generates the build into
# target/bench-artifacts/full. Root only (loop mount, drop_caches).
#
#   benches/profile-deploy.sh                          # phases and start->flip
#   benches/profile-deploy.sh strace -c -f -o /tmp/s   # syscall counts
#   benches/profile-deploy.sh perf record -g -o /tmp/p # CPU profile
#
# WT=N sets [unpack] writer-threads; DELTA=1 then deploys main2 from its
# delta (main live) and times that deploy instead. Leaves /var/tmp/deploy-agent-profile
# mounted and nginx running for the next run; `benches/profile-deploy.sh
# --clean` undoes both.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
BIN=${BIN:-$TARGET/release/deploy-agent}
ART=$(realpath "$TARGET/bench-artifacts/full")
W=/var/tmp/deploy-agent-profile
if [ "${1:-}" = --clean ]; then
  [ -f $W/nginx.pid ] && kill "$(cat $W/nginx.pid)" 2>/dev/null || true
  mountpoint -q $W/mnt && umount $W/mnt
  rm -rf $W
  exit 0
fi
[ -x "$BIN" ] || cargo build --release -p deploy-agent
[ -f "$ART/main.tar.gz" ] || { echo "run cargo bench --bench compare first" >&2; exit 1; }
mkdir -p $W/mnt
if ! mountpoint -q $W/mnt; then
  rm -f $W/img
  truncate -s 3G $W/img
  mkfs.ext4 -q -F -J size=64 $W/img
  mount -o loop $W/img $W/mnt
fi
rm -rf $W/mnt/root $W/mnt/manifest.json
if ! { [ -f $W/nginx.pid ] && kill -0 "$(cat $W/nginx.pid)" 2>/dev/null; }; then
  cat > $W/nginx.conf <<NG
daemon on; pid $W/nginx.pid; error_log $W/nginx.err; worker_processes 1;
events { worker_connections 64; }
http { access_log off; sendfile on; client_body_temp_path $W; proxy_temp_path $W;
  fastcgi_temp_path $W; uwsgi_temp_path $W; scgi_temp_path $W;
  server { listen 127.0.0.1:18080; root $ART; } }
NG
  nginx -c $W/nginx.conf
fi
sha=$(python3 -c "import json;print(json.load(open('$ART/main.tar.gz.json'))['sha256'])")
size=$(stat -c %s "$ART/main.tar.gz")
cat > $W/config.toml <<CF
deploy-root = "$W/mnt/root"
[source]
file = "$W/mnt/manifest.json"
[status]
socket = "$W/agent.sock"
[unpack]
writer-threads = ${WT:-2}
CF
# The same state before every run: nothing dirty, the artifact in the page cache.
sync
echo 3 > /proc/sys/vm/drop_caches
cat "$ART/main.tar.gz" > /dev/null
echo "{\"build\":\"p1\",\"url\":\"http://127.0.0.1:18080/main.tar.gz\",\"sha256\":\"$sha\",\"size\":$size,\"format\":\"tar.gz\"}" > $W/mnt/manifest.json
t0=$(date +%s.%N)
"$@" "$BIN" --log-format text run --config $W/config.toml > $W/agent.log 2>&1 &
pid=$!
until grep -q "flip complete" $W/agent.log 2>/dev/null; do
  kill -0 $pid 2>/dev/null || { cat $W/agent.log; exit 1; }
  sleep 0.01
done
t1=$(date +%s.%N)
if [ -n "${DELTA:-}" ]; then
  # Then main2 (1% of files changed) with its delta from main, the live build.
  python3 - "$ART" "$W/mnt/manifest.json" <<PY
import json, sys
art, out = sys.argv[1], sys.argv[2]
main = json.load(open(f"{art}/main.tar.gz.json"))
m2 = json.load(open(f"{art}/main2.tar.gz.json"))
d = json.load(open(f"{art}/main2.delta.tar.json"))
m = {"build": "p2", "url": "http://127.0.0.1:18080/main2.tar.gz", "sha256": m2["sha256"],
     "size": m2["size"], "format": "tar.gz",
     "delta": {"base": main["sha256"], "url": "http://127.0.0.1:18080/main2.delta.tar.zst",
               "sha256": d["sha256"], "size": d["size"]}}
open(out + ".new", "w").write(json.dumps(m))
PY
  sync
  t0=$(date +%s.%N)
  mv $W/mnt/manifest.json.new $W/mnt/manifest.json
  until [ "$(grep -c "flip complete" $W/agent.log)" -ge 2 ]; do sleep 0.01; done
  t1=$(date +%s.%N)
fi
kill -TERM $pid
wait $pid || true
grep -E "deploy phase|delta applied" $W/agent.log | sed -E 's/^.*(from=[^ ]+ to=[^ ]+ spent_ms=[0-9]+).*$/\1/'
python3 -c "print('start -> flip %.3f s' % ($t1 - $t0))"
