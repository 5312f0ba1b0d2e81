#!/usr/bin/env bash
# The GPU check, in one go (a GPU machine is lent for minutes, not hours): scan zoo models on CUDA
# with `fast` and `standard` beside the committed CPU scans (benchmarks/device_scan.py), then the CLI
# end to end on CUDA (model -> report + trigger, inputs with that trigger). Usage, from the repo root:
#     bash benchmarks/gpu_check.sh OUT_DIR [SECONDS_FOR_STANDARD]
set -u
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [SECONDS_FOR_STANDARD]}
budget=${2:-300}
device=${DEVICE:-cuda}  # DEVICE=cpu tries the script here
fast_budget=${FAST_BUDGET:-60}
mkdir -p "$out/fast" "$out/standard"
export PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
zoo=examples/zoo fam=examples/zoo-families
has() { [ -d "$zoo/$1" ] || [ -d "$fam/$1" ]; }
models() { for m in "$@"; do has "$m" && printf -- '--model %s ' "$m"; done; }

# fast first: it also warms CUDA up (context, cuDNN) before the standard timings
python3 benchmarks/device_scan.py --device "$device" --preset fast --budget "$fast_budget" --out-dir "$out/fast" \
    $(models baddiffusion-box benign-a cm-baddiffusion-box)
python3 benchmarks/device_scan.py --device "$device" --preset standard --budget "$budget" --out-dir "$out/standard" \
    $(models baddiffusion-box benign-a trojdiff-blend villan-box-corner ve-villan-box ldm-baddiffusion-box \
              ve-benign ldm-benign benign-n baddiffusion-patch-corner benign-b)

# the CLI on CUDA: a scan with previews, then input detection with its trigger
tmp=$(mktemp -d)
python3 -m terd_scan.cli model "$zoo/baddiffusion-box" --preset fast --device "$device" -f json --out "$tmp/scan" \
    > "$out/cli-model.json"
echo "terd-scan model --device $device: exit $?"
python3 examples/make_noise_dir.py "$tmp/noises" --zoo-model "$zoo/baddiffusion-box" > /dev/null
python3 -m terd_scan.cli inputs "$tmp/noises/noises/mixed" --trigger "$tmp/scan/trigger.safetensors" -f json \
    > "$out/cli-inputs.json"
echo "terd-scan inputs (trigger from the CUDA scan): exit $? (1 = poisoned noises found, as expected)"
python3 -m terd_scan.cli inputs "$tmp/noises/noises/benign" --trigger "$tmp/scan/trigger.safetensors" -q
echo "terd-scan inputs on benign noises: exit $? (0 expected)"
cp "$tmp/scan/trigger.png" "$out/cli-trigger.png" 2>/dev/null
ls "$tmp/scan"
