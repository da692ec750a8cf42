# Sourced by the GPU scripts that drive a running studio ($URL): `post LABEL PATH JSON` POSTs JSON to
# PATH and prints one JSON line: the label, the HTTP status, the seconds it took and the start of the
# answer (images left out).
post() {
  local t0 t1 status
  t0=$(date +%s.%N)
  status=$(curl -s -o /tmp/body -w '%{http_code}' -X POST "$URL$2" -H 'Content-Type: application/json' -d "$3")
  t1=$(date +%s.%N)
  python3 - "$1" "$status" "$t0" "$t1" <<'PY'
import json, sys
label, status, t0, t1 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
body = open("/tmp/body", "rb").read()
try:
    parsed = json.loads(body)
    for key in ("image", "images"):
        parsed.pop(key, None)
    body = json.dumps(parsed)[:400]
except Exception:
    body = body[:400].decode("utf8", "replace")
print(json.dumps({"what": label, "status": status, "seconds": round(t1 - t0, 2), "body": body}))
PY
}
