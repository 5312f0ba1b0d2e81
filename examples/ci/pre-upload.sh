#!/usr/bin/env bash
# Scan a local model folder and upload it to the Hugging Face Hub only if terd-scan says clean.
#   usage: examples/ci/pre-upload.sh MODEL_DIR REPO_ID [terd-scan options...]
# Exit codes: 0 uploaded, 1 backdoor found (not uploaded), 2 scan error (not uploaded).
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 MODEL_DIR REPO_ID [terd-scan options...]" >&2
  exit 2
fi
model_dir=$1 repo_id=$2
shift 2
out=$(mktemp -d)
terd-scan model "$model_dir" --out "$out" "$@"
status=$?
case $status in
  0) echo "terd-scan: clean; uploading $model_dir to $repo_id" >&2
     exec hf upload "$repo_id" "$model_dir" . --commit-message "terd-scan: clean" ;;
  1) echo "terd-scan: BACKDOOR found; not uploading. Report and trigger: $out" >&2
     exit 1 ;;
  *) echo "terd-scan: scan failed (exit $status); not uploading" >&2
     exit 2 ;;
esac
