#!/usr/bin/env bash
# The GPU check: on a machine with one H100/H200, in at most ~9 minutes (each part has a timeout),
#   1. the gpu-marked tests,
#   2. fastemd profile emd   (eager / compiled torch / Triton / POT),
#   3. fastemd profile step  (the optimisation ladder at batch 256, ResNet-50, 224/224, bf16) + batch sweep,
#   4. fastemd profile e2e   (DALI when installed, else the reference loader: said so in the table),
#   5. fastemd profile data  (DALI gpu vs the reference loader, when DALI is installed),
# then a short table. Full logs and JSON go into LOGDIR.
#
#   usage: tools/gpu_check.sh LOGDIR          (PYTHON=python3 by default; FASTEMD_GPU_CHECK_QUICK=1
#                                              shrinks every size, to test this script on a CPU)
set -uo pipefail
logs=$(mkdir -p "${1:?usage: tools/gpu_check.sh LOGDIR}" && cd "$1" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
quick=${FASTEMD_GPU_CHECK_QUICK:-0}
device=cuda; [ "$quick" = 1 ] && device=cpu
cd "$logs"  # never the checkout: `python -m` would put the source folder fastemd/ first on sys.path

if ! $py -c "import fastemd.kernels, fastemd.pipelines" 2>/dev/null; then
  # No network on the GPU machines: install the checkout alone; torch, triton, numpy, pillow, rich are there.
  $py -m pip install --no-deps --no-build-isolation -q -e "$repo" > install.log 2>&1 \
    || { echo "gpu_check: cannot install fastemd (see $logs/install.log)"; exit 1; }
fi
# DALI and pycocotools, absent from the GPU image, travel as .device/part* (tools/device_bundle.sh):
# unpacked into this interpreter's site-packages once every part is there and the sum matches.
if [ -f "$repo/.device/part1/MANIFEST" ] && ! $py -c "import nvidia.dali" 2>/dev/null; then
  site=$($py -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  if bash "$repo/tools/device_unpack.sh" "$repo/.device" "$site" > bundle.log 2>&1; then
    echo "gpu_check: $(tail -1 bundle.log)" >&2
  else
    echo "gpu_check: no DALI: $(tail -1 bundle.log)" >&2
  fi
fi
{
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  $py - <<'PY'
import torch, importlib.util
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for name in ("triton", "nvidia.dali", "ot", "pycocotools"):
    spec = importlib.util.find_spec(name.split(".")[0]) and importlib.util.find_spec(name)
    print(name, getattr(__import__(name, fromlist=["_"]), "__version__", "?") if spec else "not installed")
PY
} > env.txt 2>&1

declare -A rc
run() {  # run NAME SECONDS CMD...: output to NAME.log, exit status kept for the table
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$name.log" 2>&1
  rc[$name]=$?
  echo "gpu_check: $name exit ${rc[$name]} in $((SECONDS - start)) s" >&2
}

if [ "$quick" = 1 ]; then
  step_args=(--batch 4 --steps 2 --warmup 1 model.arch=resnet18 model.width=8 model.proj_hidden=32
             model.pred_hidden=32 model.proj_dim=16 data.view1_size=64 data.view2_size=64)
  emd_args=(--batch 8 --sizes 9 --iters 2 --impls torch)
  e2e_args=(--preset demo --batch 4 --steps 2 --warmup 1 data.workers=1)
  data_args=(--pairs 32 --batch-size 8 --workers 1 --images 8)
else
  # Sized so that the whole script stays under ~9 minutes even when every step hits its timeout
  # (one device-tool call is at most 10): compiles dominate, so few timed steps.
  step_args=(--batch 256 --steps 10 --warmup 3 --sweep)
  emd_args=(--impls torch,compile,triton --batch 512,64 --sizes 49,25 --min-time 0.1)  # the design point first
  e2e_args=(--batch 256 --steps 20 --warmup 3 data.workers=8)
  data_args=(--pairs 2048 --batch-size 256 --workers 2)
fi

# --continue-on-collection-errors: a test file importing a package the GPU image lacks (pycocotools,
# POT) must not stop the gpu tests of the other files.
# -v: one line per test, so a run cut by its time limit still says which tests passed.
run tests_gpu 120 $py -m pytest -m gpu -v -p no:cacheprovider --continue-on-collection-errors "$repo/tests"
run profile_emd 90 $py -m fastemd.cli profile emd --device $device --json "${emd_args[@]}"
run profile_step 240 $py -m fastemd.cli profile step --device $device --json "${step_args[@]}"
# e2e on the demo dataset's image folder (a folder needs no pycocotools, absent from some GPU images)
demo=$logs/demo-data
[ -d "$demo/train2017" ] || $py -m fastemd.cli make-demo-data "$demo" --num-images 256 > make_demo.log 2>&1
run profile_e2e 45 $py -m fastemd.cli profile e2e --device $device --json "${e2e_args[@]}" "data.sources=$demo/train2017"
if $py -c "import nvidia.dali" 2>/dev/null; then
  run profile_data 45 $py -m fastemd.cli profile data --device $device --json --source "$demo/train2017" "${data_args[@]}"
fi

for name in "${!rc[@]}"; do echo "$name ${rc[$name]}"; done > status.txt
$py - "$logs" <<'PY'
import json, sys
from pathlib import Path

logs = Path(sys.argv[1])
status = dict(line.split() for line in (logs / "status.txt").read_text().splitlines())
env = (logs / "env.txt").read_text()
device = next((l.split(" ", 1)[1] for l in env.splitlines() if l.startswith("device ")), "?")

def last_json(name):
    try:
        lines = [l for l in (logs / f"{name}.log").read_text().splitlines() if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None

rows = []
tail = (logs / "tests_gpu.log").read_text().strip().splitlines()[-1:] if (logs / "tests_gpu.log").exists() else ["-"]
rows.append(("gpu tests", tail[0] if tail else "-"))
emd = last_json("profile_emd")
if emd and emd.get("partial"):
    rows.append(("emd", "cut short by its time limit: the sizes it finished"))
if emd:  # the issue's design point first: B 512, M = N 49, forward + backward
    recs = [r for r in emd["results"] if "fwd_bwd_s" in r]
    for (B, M) in sorted({(r["B"], r["M"]) for r in recs}, key=lambda k: (k[1] != 49, k[0] != 512, k)):
        at = {r["impl"]: r for r in recs if (r["B"], r["M"]) == (B, M)}
        parts = [f"{name} {1e3 * r['fwd_bwd_s']:.3f} ms" for name, r in at.items()]
        if "triton" in at:
            t = at["triton"]
            parts.append(f"triton x{at['torch']['fwd_bwd_s'] / t['fwd_bwd_s']:.1f} vs eager" if "torch" in at else "")
            if "compile" in at:
                parts.append(f"x{at['compile']['fwd_bwd_s'] / t['fwd_bwd_s']:.1f} vs compiled")
            if t.get("floor_fwd_bwd_s"):
                parts.append(f"{t['fwd_bwd_s'] / t['floor_fwd_bwd_s']:.1f}x its floor")
        rows.append((f"emd fwd+bwd B{B} {M}x{M}", ", ".join(p for p in parts if p)))
        if len(rows) > 4:
            break
step = last_json("profile_step")
if step:
    if step.get("partial"):
        rows.append(("step ladder", "cut short by its time limit: the rungs it finished"))
    for r in step["rungs"]:
        mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f} GB"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.0f}%"
        rows.append((f"step + {r['rung']}", f"{r['images_per_s']:,.0f} img/s  {r['ms_per_step']:.1f} ms  x{r['speedup']:.2f}  {mem}  MFU {mfu}"))
    if "sweep" in step:
        rows.append(("largest batch", str(step["sweep"]["largest_batch"])))
e2e = last_json("profile_e2e")
if e2e:
    note = f" ({e2e['loader_note']})" if e2e.get("loader_note") else ""
    rows.append(("e2e", f"{e2e['images_per_s']:,.0f} img/s, data wait {e2e['data_wait_pct']:.1f}%, loader {e2e['loader']}{note}"))
data = last_json("profile_data")
if data:
    for r in data["results"]:
        rows.append((f"data {r['loader']} {r['views'][0]}/{r['views'][1]}",
                     f"{r['pairs_per_s']:,.0f} pairs/s, {r['cores_busy']} cores busy, {1e3 * r['core_s_per_pair']:.2f} CPU ms/pair"))
print(f"\nfastemd gpu_check on {device}  (logs: {logs})")
for name, code in sorted(status.items()):
    if code != "0":
        rows.append((f"{name} FAILED", f"exit {code}: see {name}.log"))
width = max(len(r[0]) for r in rows)
for name, value in rows:
    print(f"  {name:<{width}}  {value}")
PY
