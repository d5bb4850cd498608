#!/usr/bin/env bash
# A firmware CI job: build the bundle for the board, fail the pipeline on any quality regression, keep the
# manifest as an artifact. Exit codes: 0 ok, 1 user error (including a failed quality gate), 2 bug.
set -euo pipefail
TARGET=${TARGET:-rpi5}
MODEL=${MODEL:-smollm2-135m}

if ! edgepack --json build --target "$TARGET" "$MODEL" --out dist --force > build.json; then
  # One JSON document even on failure: surface the reason and the numbers.
  python3 -c 'import json; e = json.load(open("build.json"))["error"]; print("build failed:", e["message"]); print("hint:", e.get("hint"))'
  exit 1
fi
BUNDLE=$(python3 -c 'import json; print(json.load(open("build.json"))["result"]["bundle"])')
edgepack --json inspect "$BUNDLE" > inspect.json          # re-verifies every file's sha256
cp "$BUNDLE/edgepack.json" "manifest-$TARGET.json"         # the replay record, as a CI artifact
# edgepack deploy --host "$BOARD" "$BUNDLE" --json > deploy.json   # once deploy lands (issue 4)
