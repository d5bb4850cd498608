#!/usr/bin/env bash
# A firmware CI job in one script: build (failing the pipeline on any quality regression or denied license),
# sign, pack one reproducible archive, and deploy it to a board when BOARD is set. Exit codes: 0 ok, 1 a user
# error (`code` in the JSON says which: docs/json.md), 2 a bug. The CI services' own recipes: examples/ci/.
#   TARGET=rpi5 MODEL=smollm2-135m SIGNING_KEY=keys/release.key BOARD=pi.local examples/ci-pipeline.sh
set -euo pipefail
TARGET=${TARGET:-rpi5}
MODEL=${MODEL:-smollm2-135m}
OUT=${OUT:-dist}

fail() {  # one JSON document even on failure: print its code and message, exit 1
  python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["error"]; print(e["code"] + ":", e["message"]); print("hint:", e.get("hint"))' "$1"
  exit 1
}

edgepack --json build --target "$TARGET" "$MODEL" --out "$OUT" --force ${SIGNING_KEY:+--sign "$SIGNING_KEY"} \
  > build.json || fail build.json
BUNDLE=$(python3 -c 'import json; print(json.load(open("build.json"))["result"]["bundle"])')
edgepack --json pack "$BUNDLE" --out "$OUT/$(basename "$BUNDLE").tar.gz" > pack.json || fail pack.json
ARCHIVE=$(python3 -c 'import json; print(json.load(open("pack.json"))["result"]["archive"])')
cp "$BUNDLE/edgepack.json" "$OUT/$(basename "$BUNDLE").manifest.json"   # the replay record, as a CI artifact
if [ -n "${BOARD:-}" ]; then
  edgepack --json deploy "$ARCHIVE" --host "$BOARD" ${SIGNING_KEY:+--require-signature "$SIGNING_KEY.pub"} \
    > deploy.json || fail deploy.json
  python3 -c 'import json; r=json.load(open("deploy.json"))["result"]; print("deployed", r["bundle_id"], "to", r["host"])'
fi
echo "archive: $ARCHIVE"
