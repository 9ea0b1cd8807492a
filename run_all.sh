#!/usr/bin/env bash
# The whole pipeline on one sequence, stage after stage; run it again to resume (each stage keeps
# what it finished). At the end, or where a stage fails: each finished stage's time and the disk its
# outputs take.
#
#   bash run_all.sh -s data/basketball -e exp1 --encoder viclip --viclip-ckpt data/checkpoints/ViClip-InternVid-10M-FLT.pth \
#       -p "a man throwing the ball"
#   make run SEQ=data/basketball EXP=exp1 PROMPT="a man throwing the ball"
#
# Options: -s SEQ (required), -e EXP (default exp1), --encoder NAME (default viclip), --viclip-ckpt PATH,
# -l LAST (stop after this timestep, stages 1, 3, 5), -p PROMPT (repeat; stage 6 runs only with prompts),
# --demo (the small settings of make demo, for a CPU), --python PY (default python3). Anything after --
# goes to stage 1 (e.g. -- --downscale 2).
set -euo pipefail

seq="" exp=exp1 encoder=viclip python=python3 ckpt=() last=() prompts=() demo=() stage1_extra=()
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        -s|--seq) seq=$2; shift 2 ;;
        -e|--exp) exp=$2; shift 2 ;;
        --encoder) encoder=$2; shift 2 ;;
        --viclip-ckpt) ckpt=(--viclip-ckpt "$2"); shift 2 ;;
        -l|--last) last=(-l "$2"); shift 2 ;;
        -p|--prompt) prompts+=(-p "$2"); shift 2 ;;
        --demo) demo=(--demo); shift ;;
        --python) python=$2; shift 2 ;;
        -h|--help) usage ;;
        --) shift; stage1_extra=("$@"); break ;;
        *) echo "run_all.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$seq" ] || { echo "run_all.sh: -s SEQ is required, e.g. -s data/basketball (see --help)" >&2; exit 2; }
[ -d "$seq" ] || [ -d "data/$seq" ] || { echo "run_all.sh: -s $seq: neither $seq nor data/$seq is a folder" >&2; exit 2; }
[ -d "$seq" ] || seq="data/$seq"
name=$(basename "$seq") here=$(dirname "$0")

names=() seconds=()
stage() {  # stage LABEL COMMAND...: run it and note its time
    local label=$1 start
    shift
    echo "== $label: $*"
    start=$(date +%s)
    "$@" || {
        local rc=$?
        summary
        echo "run_all.sh: stage $label failed (exit $rc); fix what it says and run the same command again: the finished work is kept" >&2
        exit $rc
    }
    names+=("$label") seconds+=($(( $(date +%s) - start )))
}

outputs() {  # outputs LABEL: the files and folders that stage writes (stages 1 and 5, 2 and 6 share a folder)
    case "$1" in
        1*) find "output/$exp/$name" -mindepth 1 -maxdepth 1 ! -name legs ;;
        2*) find "results/$exp/$name" -mindepth 1 -maxdepth 1 -type f ;;
        3*) echo "$seq/interpolators/$encoder" ;;
        4*) echo "$seq/ae" ;;
        5*) echo "output/$exp/$name/legs" ;;
        6*) find "results/$exp/$name" -mindepth 1 -maxdepth 1 -type d ;;
    esac 2>/dev/null
}

disk() {  # disk PATH...: their size on disk together, e.g. 1.2G
    [ $# -gt 0 ] && du -sch "$@" 2>/dev/null | tail -n 1 | cut -f1 || echo 0
}

summary() {  # each finished stage's time in this run, and the disk its outputs take now
    local total=0 everything=() paths i
    echo "== time of this run per stage, and the disk of each stage's outputs now"
    printf '%-20s %8s %8s\n' stage seconds disk
    for i in "${!names[@]}"; do
        mapfile -t paths < <(outputs "${names[$i]}")
        printf '%-20s %8s %8s\n' "${names[$i]}" "${seconds[$i]}" "$(disk "${paths[@]}")"
        total=$(( total + seconds[i] )) everything+=("${paths[@]}")
    done
    printf '%-20s %8s %8s\n' all "$total" "$(disk "${everything[@]}")"
}

stage "1 train_d3dgs" "$python" "$here/train_d3dgs.py" -s "$seq" -e "$exp" "${demo[@]}" "${last[@]}" "${stage1_extra[@]}"
stage "2 visualize_d3dgs" "$python" "$here/visualize_d3dgs.py" -s "$seq" -e "$exp" "${demo[@]}" "${last[@]}"
stage "3 extract_features" "$python" "$here/extract_features.py" -s "$seq" --encoder "$encoder" "${ckpt[@]}" "${last[@]}"
stage "4 train_autoencoder" "$python" "$here/train_autoencoder.py" -s "$seq" --encoder "$encoder" "${demo[@]}" --resume
stage "5 train_4legs" "$python" "$here/train_4legs.py" -s "$seq" -e "$exp" --encoder "$encoder" "${demo[@]}" "${last[@]}"
if [ ${#prompts[@]} -gt 0 ]; then
    stage "6 visualize_4legs" "$python" "$here/visualize_4legs.py" -s "$seq" -e "$exp" --encoder "$encoder" "${ckpt[@]}" "${prompts[@]}"
fi

echo "== done"
summary
