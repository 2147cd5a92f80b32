#!/bin/bash
# Graft PixArt-Sigma on Slurm: teacher data → stage 1 → stage 2 → GenEval → speed, from the repository root:
#
#   sbatch slurm/pixart_hyena_x.sh                                     # the headline recipe, one 8×H100 node
#   sbatch --nodes=4 -p PARTITION -A ACCOUNT slurm/pixart_hyena_x.sh   # 4 nodes = 32 ranks (any sbatch option)
#   sbatch slurm/pixart_hyena_x.sh RECIPE --set stage2.optim.lr=5e-5   # another PixArt recipe, recipe overrides
#   STEPS="stage2 geneval" sbatch slurm/pixart_hyena_x.sh              # some steps only
#
# One job runs the steps in order; each rank starts under srun and reads its rank, world size and local rank from
# Slurm, the master address is the job's first node. Why one job rather than a chain of dependent jobs: one wait in
# the queue for the whole pipeline, and one way to survive the time limit — every step is skipped once finished
# and resumes where it stopped, so the job requeues itself near the limit (USR1 below) and `scontrol requeue`, a
# preemption or a node failure lose at most the steps since the last checkpoint. `python slurm/launch.py` runs the
# same pipeline as dependent jobs instead (job arrays for the data, per-step resources).
#
# Arguments: [RECIPE] [--set KEY=VALUE ...] [--allow-change KEY ...] — both go to both training stages.
# Environment (sbatch passes the submitting shell's environment to the job):
#   RECIPE         the recipe, if not given as an argument  [recipes/pixart_sigma_2k_hyena_x_50.yaml]
#   OUT            run folder: stage1/ stage2/ export/ geneval/ speed/, and slurm/ (finished steps)
#                  [the recipe's output_dir: runs/<recipe name>]
#   PIPELINE       T5 + tokenizer + VAE (diffusers folder)  [weights/pixart_sigma_base]
#   TEACHER        the teacher transformer: it generates the data and it is grafted (recipe model.pretrained)
#                  [weights/pixart_sigma_2k]
#   DATA           generated data: prompts*.txt, shard folders stage1/ stage2/ val/, null_caption.safetensors; the
#                  recipe's stage1.shards / data.train / data.val / data.null_caption point there  [data/pixart_2k]
#   PROMPTS        number of prompts (= teacher images) for stage 1, stage 2 and validation  ["8000 12000 256"]
#   STEPS          the steps to run  ["prompts generate stage1 stage2 geneval speed"]
#   GENERATE_ARGS  more `python -m data.generate` options  ["--height 2048 --width 2048 --dtype bf16"]
#   GENEVAL_ARGS   more `python eval/geneval.py` options (detector and CLIP weights; --metadata and --object-names on
#                  nodes without internet)  ["--height 2048 --width 2048 --dtype bf16 --detector-path
#                  weights/mask2former-swin-small-coco-instance --clip weights/clip-vit-l-14-openai"]
#   SPEED_ARGS     `python eval/speed.py` options  ["--ckpt $TEACHER --grafted-ckpt $OUT/export"]
#   PYTHON         the interpreter  [.venv/bin/python if there, else python3]
#   REPO           the repository  [the folder sbatch was called from]
# Logs: slurm-<job name>-<job id>.out in the folder sbatch was called from (a requeued job appends to it); the
# engine's own logs, metrics and checkpoints are under OUT.
#
#SBATCH --job-name=pixart_hyena_x
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
source "$REPO/slurm/steps.sh" || { echo "error: run sbatch from the repository root, or set REPO" >&2; exit 2; }
job_setup

if [[ $# -gt 0 && $1 != -* ]]; then RECIPE=$1; shift; fi
check_train_args "$@"
RECIPE=${RECIPE:-recipes/pixart_sigma_2k_hyena_x_50.yaml}
PIPELINE=${PIPELINE:-weights/pixart_sigma_base}
TEACHER=${TEACHER:-weights/pixart_sigma_2k}
DATA=${DATA:-data/pixart_2k}
read -r N_STAGE1 N_STAGE2 N_VAL <<< "${PROMPTS:-8000 12000 256}"
STEPS=${STEPS:-prompts generate stage1 stage2 geneval speed}
# The data and teacher paths come after the arguments, so that they win over the same keys there.
PATHS=(--set "model.pretrained=$TEACHER" --set "stage1.shards=$DATA/stage1" --set "data.train=$DATA/stage2"
       --set "data.val=$DATA/val" --set "data.null_caption=$DATA/null_caption.safetensors")
OUT=${OUT:-$(recipe_out "$RECIPE" "$@" "${PATHS[@]}")}
TRAIN=("$RECIPE" "$@" "${PATHS[@]}" --set "output_dir=$OUT")
read -r -a GENERATE <<< "${GENERATE_ARGS:---height 2048 --width 2048 --dtype bf16}"
read -r -a GENEVAL <<< "${GENEVAL_ARGS:---height 2048 --width 2048 --dtype bf16 \
--detector-path weights/mask2former-swin-small-coco-instance --clip weights/clip-vit-l-14-openai}"
read -r -a SPEED <<< "${SPEED_ARGS:---ckpt $TEACHER --grafted-ckpt $OUT/export}"
echo "== recipe $RECIPE → $OUT; steps: $STEPS"

# Unique prompts, split into stage 1, stage 2 and validation files; image i of a split gets seed = its line number
# in prompts.txt (the --seed offsets below), so no two teacher images share a seed.
make_prompts() {  # make_prompts N_STAGE1 N_STAGE2 N_VAL
    mkdir -p "$DATA"
    "$PYTHON" -m data.prompt_generator --n $(($1 + $2 + $3)) --seed 0 --out "$DATA/prompts.txt"
    head -n "$1" "$DATA/prompts.txt" > "$DATA/prompts_stage1.txt"
    tail -n +$(($1 + 1)) "$DATA/prompts.txt" | head -n "$2" > "$DATA/prompts_stage2.txt"
    tail -n +$(($1 + $2 + 1)) "$DATA/prompts.txt" > "$DATA/prompts_val.txt"
}

if wanted prompts; then step "$DATA" prompts make_prompts "$N_STAGE1" "$N_STAGE2" "$N_VAL"; fi
if wanted generate; then
    first=0
    for split in stage1 stage2 val; do  # the teacher's images, shards split over every rank
        step "$DATA" "generate-$split" ranks "$PYTHON" -m data.generate --pipeline "$PIPELINE" \
            --transformer "$TEACHER" --prompts "$DATA/prompts_$split.txt" --out "$DATA/$split" --seed "$first" \
            "${GENERATE[@]}"
        first=$((first + $(wc -l < "$DATA/prompts_$split.txt")))
    done
    step "$DATA" null-caption one "$PYTHON" -m recipes.null_caption --pipeline "$PIPELINE" \
        --out "$DATA/null_caption.safetensors"
fi
if wanted stage1; then step "$OUT" stage1 ranks "$PYTHON" -m recipes.train "${TRAIN[@]}" --stage 1; fi
if wanted stage2; then step "$OUT" stage2 ranks "$PYTHON" -m recipes.train "${TRAIN[@]}" --stage 2; fi
if wanted geneval; then
    step "$OUT" geneval ranks "$PYTHON" eval/geneval.py --ckpt "$OUT/export" --pipeline "$PIPELINE" \
        --out "$OUT/geneval" "${GENEVAL[@]}"
fi
if wanted speed; then step "$OUT" speed one "$PYTHON" eval/speed.py --out "$OUT/speed" "${SPEED[@]}"; fi
echo "== job $SLURM_JOB_ID: pipeline finished; export in $OUT/export"
