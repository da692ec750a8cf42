# Sourced by the GPU scripts: emulates a smaller card. `hog GIB` starts a process that takes all free
# GPU memory but GIB GiB (0.25 for 256 MiB) and holds it until `unhog`; the program started after it
# sees only what is left, as on a card of that size.
hog() {
  rm -f /tmp/hog.stop /tmp/hog.ready
  python3 - "$1" <<'PY' &
import os, sys, time, torch
free, total = torch.cuda.mem_get_info()
keep = int(float(sys.argv[1]) * (1 << 30))
x = torch.empty(max(free - keep, 0), dtype=torch.uint8, device="cuda")
open("/tmp/hog.ready", "w").write(str(x.numel()))
while not os.path.exists("/tmp/hog.stop"):
    time.sleep(0.2)
PY
  HOG_PID=$!
  for _ in $(seq 150); do [ -f /tmp/hog.ready ] && break; sleep 0.2; done
}
unhog() {
  touch /tmp/hog.stop
  wait "$HOG_PID" 2>/dev/null
}
