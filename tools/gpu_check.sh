#!/usr/bin/env bash
# shellcheck disable=SC2054,SC2317  # comma lists are CLI values; finish runs from a trap
# The GPU check: on a lent machine with one H100/H200, in one device-tool call (10 minutes at most),
# within a budget of FASTEMD_GPU_CHECK_BUDGET seconds (default 480) from the script's start.
# The most important figures first; each part has its own timeout (`timeout -k 10`), never more
# than what is left of the budget (a part with too little left is skipped, said so):
#
#   part (timeout s)         what
#   install (60)             pip install --no-deps -e the checkout (only when fastemd does not import)
#   dali_unpack (60)         the carried DALI bundle, .device/part* (only when it is there: 2nd call)
#   env (30)                 nvidia-smi, torch/CUDA/triton/DALI versions
#   tests_gpu (150)          the gpu-marked tests, the CUDA trainer tests (tests/test_train.py) first
#   profile_emd (60)         Triton EMD against eager torch, B 512/64 x M=N 49/25 (no compile here)
#   profile_step (180)       the step ladder at batch 256: fp32 > +channels_last > +amp > +triton >
#                            +compile: triton before compile, so the step is compiled once, Triton inside
#   demo_data (45)           1024 demo images (a folder: no pycocotools needed)
#   profile_e2e (45)         the real loader into the amp + Triton step, no compile (img/s, data wait)
#   e2e_epochs (90)          epoch boundaries, afresh vs spanning loaders: 3 epochs x 8 steps at batch 128
#   profile_data (45)        DALI gpu/cpu against the reference loader (only when DALI is installed)
#   profile_emd_compile (60) the compiled-torch EMD row at the design point B 512, 49x49 (cold compile)
#   profile_sweep (45)       the largest batch that fits (eager amp + Triton)
#
# After every part its log, the status so far and the summary table so far (summary.txt,
# results.json) are copied into COPY_TO, so that a call cut at its limit still returns what
# finished; an EXIT trap (also on SIGTERM, SIGINT, SIGHUP) writes the summary of what finished.
#
#   usage: tools/gpu_check.sh LOGDIR [COPY_TO]   COPY_TO: default $FASTEMD_GPU_CHECK_OUT, else $OUT
#          tools/gpu_check.sh --summary LOGDIR   the table of a finished or cut run again
#   env:   PYTHON (python3), FASTEMD_GPU_CHECK_BUDGET (480 s), FASTEMD_GPU_CHECK_PARTS (a comma list
#          of the parts above to run, default all; install, dali_unpack, env and demo_data run
#          when needed), FASTEMD_GPU_CHECK_QUICK=1 (every size tiny, --device cpu: to test this
#          script on a CPU).
#   test hook: FASTEMD_GPU_CHECK_TEST_HANG=PART[:SECONDS] replaces PART by a process that ignores
#          SIGTERM and sleeps, with a timeout of SECONDS (default 1): a part cut by its timeout
#          (tests/test_gpu_check.py). Never set it on the device.
set -uo pipefail
summary_only=0
if [ "${1:-}" = "--summary" ]; then summary_only=1; shift; fi
logs=$(mkdir -p "${1:?usage: tools/gpu_check.sh LOGDIR [COPY_TO]}" && cd "$1" && pwd) || exit 2
repo=$(cd "$(dirname "$0")/.." && pwd)
read -ra py <<< "${PYTHON:-python3}"
quick=${FASTEMD_GPU_CHECK_QUICK:-0}
budget=${FASTEMD_GPU_CHECK_BUDGET:-480}
grace=10  # timeout -k: SIGKILL this long after a SIGTERM that did not end the part
device=cuda; [ "$quick" = 1 ] && device=cpu
cd "$logs" || exit 2  # never the checkout: `python -m` would put the source folder fastemd/ first on sys.path

# The table: written after every part and by the EXIT trap (fastemd/profile/gpu_check.py: the
# standard library only, run by path, so it works before fastemd is installed and in a second).
summarize_py=$repo/fastemd/profile/gpu_check.py
summarize() {  # summary.txt, results.json; both copied out
  timeout -k 2 20 "${py[@]}" "$summarize_py" "$logs" "$budget" "$SECONDS" > summary.txt 2> summarize.err \
    || echo "gpu_check: the summary failed: $(tail -1 summarize.err)" >&2
  copy_out summary.txt results.json status.txt current.txt commands.txt
}
if [ "$summary_only" = 1 ]; then
  copy_to=""
  timeout -k 2 20 "${py[@]}" "$summarize_py" "$logs" "$budget" "?"
  exit
fi

copy_to=${2:-${FASTEMD_GPU_CHECK_OUT:-${OUT:-}}}
if [ -n "$copy_to" ]; then
  copy_to=$(mkdir -p "$copy_to" && cd "$copy_to" && pwd) || copy_to=""
  [ "$copy_to" = "$logs" ] && copy_to=""
fi
copy_out() {  # copy_out FILE...: LOGDIR/FILE into COPY_TO, now
  [ -n "$copy_to" ] || return 0
  local f
  for f in "$@"; do
    [ -f "$logs/$f" ] && ! [ "$logs/$f" -ef "$copy_to/$f" ] && cp -f "$logs/$f" "$copy_to/$f" 2>/dev/null
  done
  return 0
}
: > status.txt
: > commands.txt
rm -f current.txt summary.txt results.json

declare -A limit=([install]=60 [dali_unpack]=60 [env]=30 [tests_gpu]=150 [profile_emd]=60 [profile_step]=180
                  [demo_data]=45 [profile_e2e]=45 [e2e_epochs]=90 [profile_data]=45 [profile_emd_compile]=60
                  [profile_sweep]=45)
selected=",${FASTEMD_GPU_CHECK_PARTS:-all},"
want() { [ "$selected" = ",all," ] || [[ $selected == *",$1,"* ]]; }
hang=${FASTEMD_GPU_CHECK_TEST_HANG:-}
hang_part=${hang%%:*}
hang_secs=1; [[ $hang == *:* ]] && hang_secs=${hang#*:}
child="" current="" part_start=0 part_limit=0

record() { echo "$1 $2 $3 $4" >> status.txt; }

run_part() {  # run_part NAME CMD...: output to NAME.log, status to status.txt, everything copied out
  local name=$1 lim=${limit[$1]} code; shift
  local left=$((budget - SECONDS - grace - 5))
  local cmd=("$@")
  if [ -n "$hang_part" ] && [ "$name" = "$hang_part" ]; then  # the test hook: a part that hangs
    cmd=(bash -c 'trap "" TERM; echo "test hook: hanging, ignoring SIGTERM"; exec sleep 3600')
    lim=$hang_secs
  fi
  if ((left < 5)); then
    record "$name" nobudget 0 "$((left > 0 ? left : 0))"
    echo "gpu_check: $name skipped: $((left > 0 ? left : 0)) s left of the ${budget} s budget" >&2
    summarize
    return 1
  fi
  ((left < lim)) && lim=$left
  printf '%s\t%s\n' "$name" "${cmd[*]}" >> commands.txt
  : > "$name.log"
  # the log as it grows, should the whole call be killed (a hard link, when COPY_TO is on this filesystem)
  [ -n "$copy_to" ] && ln -f "$name.log" "$copy_to/$name.log" 2>/dev/null
  current=$name part_start=$SECONDS part_limit=$lim
  echo "$name $lim $SECONDS" > current.txt
  summarize  # says which part is in flight, should the whole call be killed
  timeout -k "$grace" "$lim" "${cmd[@]}" > "$name.log" 2>&1 &
  child=$!
  wait "$child"
  code=$?
  child="" current=""
  rm -f current.txt
  [ -n "$copy_to" ] && rm -f "$copy_to/current.txt"
  record "$name" "$code" "$((SECONDS - part_start))" "$lim"
  echo "gpu_check: $name exit $code in $((SECONDS - part_start)) s (limit $lim s)" >&2
  copy_out "$name.log"
  summarize
  return "$code"
}

finish() {  # the EXIT trap: the summary of what finished, also on a signal
  local code=$?
  trap - EXIT INT TERM HUP
  if [ -n "$current" ]; then  # a part in flight: end it (timeout passes it on, SIGKILL after $grace s)
    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
    rm -f current.txt
    [ -n "$copy_to" ] && rm -f "$copy_to/current.txt"
    record "$current" interrupted "$((SECONDS - part_start))" "$part_limit"
    echo "gpu_check: $current interrupted after $((SECONDS - part_start)) s" >&2
    copy_out "$current.log"
  fi
  summarize
  echo
  cat summary.txt 2>/dev/null
  if [ "$code" = 0 ] && awk '$2 != "0" && $2 != "nodali" {bad = 1} END {exit !bad}' status.txt; then
    code=1  # a part failed, timed out or was skipped for lack of time: its figures are missing
  fi
  exit "$code"
}
trap finish EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

probe() { timeout -k 10 60 "${py[@]}" -c "$1" 2>/dev/null; }  # an untimed command could stall the budget
if ! probe "import fastemd.kernels, fastemd.pipelines"; then
  # No network on the GPU machines: install the checkout alone; torch, triton, numpy, pillow, rich are there.
  run_part install "${py[@]}" -m pip install --no-deps --no-build-isolation -q -e "$repo" \
    || { echo "gpu_check: cannot install fastemd (see $logs/install.log)" >&2; exit 1; }
fi
# DALI and pycocotools, absent from the GPU image, travel as .device/part* (tools/device_bundle.sh):
# unpacked into this interpreter's site-packages once every part is there and the sum matches.
if [ -f "$repo/.device/part1/MANIFEST" ] && ! probe "import nvidia.dali"; then
  site=$(probe "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  run_part dali_unpack bash "$repo/tools/device_unpack.sh" "$repo/.device" "$site" \
    && echo "gpu_check: $(tail -1 dali_unpack.log)" >&2
fi
cat > env.py <<'PY'
import importlib.util

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for name in ("triton", "nvidia.dali", "ot", "pycocotools"):
    spec = importlib.util.find_spec(name.split(".")[0]) and importlib.util.find_spec(name)
    print(name, getattr(__import__(name, fromlist=["_"]), "__version__", "?") if spec else "not installed")
PY
run_part env bash -c 'nvidia-smi 2>&1 || echo "nvidia-smi: not available"; exec "$@"' _ "${py[@]}" env.py
have_dali=0
probe "import nvidia.dali" && have_dali=1

demo=$logs/demo-data
if [ "$quick" = 1 ]; then
  n_demo=48
  tiny=(model.arch=resnet18 model.width=8 model.proj_hidden=32 model.pred_hidden=32 model.proj_dim=16
        data.view1_size=64 data.view2_size=64)
  emd_args=(--impls triton,torch --batch 8 --sizes 9 --iters 2 --min-time 0.05)
  step_args=(--batch 4 --steps 2 --warmup 1 --rungs fp32,channels_last "${tiny[@]}")
  e2e_args=(--preset demo --batch 4 --steps 2 --warmup 1 --images 16 data.workers=1)
  epochs_args=(--preset demo --batch 4 --epochs 2 --images 16 data.workers=1)
  data_args=(--pairs 32 --batch-size 8 --workers 1 --images 8)
  # a cold inductor compile costs ~30 s on a CPU: the plumbing is tested with the eager row
  emd_compile_args=(--impls torch --batch 4 --sizes 9 --iters 2 --min-time 0.05)
  sweep_args=(--batch 4 --steps 1 --warmup 0 --rungs fp32 --sweep "${tiny[@]}")
else
  n_demo=1024
  # Triton (and eager, its baseline) first: no compile in this part
  emd_args=(--impls triton,torch --batch 512,64 --sizes 49,25 --min-time 0.1)
  # triton before compile: the last rung compiles the step once, with Triton inside
  step_args=(--batch 256 --steps 10 --warmup 3 --rungs fp32,channels_last,amp,triton,compile)
  # no compile: the real loader into the amp + Triton step (1024 images: 4 steps an epoch, spanned)
  e2e_args=(--batch 256 --steps 20 --warmup 3 --rungs fp32,channels_last,amp,triton data.workers=8)
  # 8 steps an epoch: each mode runs 3 epochs and checkpoints at every epoch end
  epochs_args=(--batch 128 --epochs 3 --images 1024 --rungs fp32,channels_last,amp,triton data.workers=8)
  data_args=(--pairs 2048 --batch-size 256 --workers 2)
  emd_compile_args=(--impls torch,compile --batch 512 --sizes 49 --min-time 0.1)  # one cold compile
  sweep_args=(--batch 256 --steps 2 --warmup 1 --rungs channels_last,amp,triton --sweep)
fi
cli=("${py[@]}" -m fastemd.cli)

# -v: one line per test, so a run cut by its time limit still says which tests passed;
# --continue-on-collection-errors: a test file importing a package the GPU image lacks (pycocotools,
# POT) must not stop the gpu tests of the other files. The CUDA trainer tests first.
test_files=("$repo/tests/test_train.py")
for f in "$repo"/tests/test_*.py; do [ "$f" = "${test_files[0]}" ] || test_files+=("$f"); done
want tests_gpu && run_part tests_gpu "${py[@]}" -m pytest -m gpu -v -p no:cacheprovider \
  --continue-on-collection-errors "${test_files[@]}"
want profile_emd && run_part profile_emd "${cli[@]}" profile emd --device $device --json "${emd_args[@]}"
want profile_step && run_part profile_step "${cli[@]}" profile step --device $device --json "${step_args[@]}"
# e2e on the demo dataset's image folder (a folder needs no pycocotools, absent from some GPU images)
if { want profile_e2e || want e2e_epochs || want profile_data; } && ! [ -d "$demo/train2017" ]; then
  rm -rf "$demo"
  run_part demo_data "${cli[@]}" make-demo-data "$demo" --num-images $n_demo
fi
src=data.sources=$demo/train2017
want profile_e2e && run_part profile_e2e "${cli[@]}" profile e2e --device $device --json "${e2e_args[@]}" "$src"
want e2e_epochs && run_part e2e_epochs "${cli[@]}" profile e2e --device $device --json "${epochs_args[@]}" "$src"
if want profile_data; then
  if [ "$have_dali" = 1 ]; then
    run_part profile_data "${cli[@]}" profile data --device $device --json --source "$demo/train2017" "${data_args[@]}"
  else
    record profile_data nodali 0 0
  fi
fi
want profile_emd_compile && run_part profile_emd_compile "${cli[@]}" profile emd --device $device --json \
  "${emd_compile_args[@]}"
want profile_sweep && run_part profile_sweep "${cli[@]}" profile step --device $device --json "${sweep_args[@]}"
exit 0
