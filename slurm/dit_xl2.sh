#!/bin/bash
# Graft DiT-XL/2 (ImageNet 256²) on Slurm: latent shards → stage 1 → stage 2 → FID-50K, for any recipe in
# recipes/dit_xl2/ (one per configuration of the paper's table), from the repository root:
#
#   sbatch slurm/dit_xl2.sh recipes/dit_xl2/mha_hyena_y_50.yaml
#   sbatch --nodes=2 -p PARTITION -A ACCOUNT slurm/dit_xl2.sh recipes/dit_xl2/mlp_r3_75.yaml --set stage2.steps=25000
#   IMAGES="imagenet/train8k imagenet/train128k imagenet/val8k" sbatch slurm/dit_xl2.sh RECIPE   # shards first
#   STEPS=fid sbatch slurm/dit_xl2.sh RECIPE                                                       # one step
#
# Same design as pixart_hyena_x.sh (read its header): one job, ranks under srun, finished steps skipped, requeue
# near the time limit, training resumed from its last complete checkpoint.
#
# Arguments: [RECIPE] [--set KEY=VALUE ...] [--allow-change KEY ...] — both go to both training stages.
# Environment:
#   RECIPE          the recipe, if not given as an argument  [recipes/dit_xl2/mha_hyena_x_50.yaml]
#   OUT             run folder: stage1/ stage2/ export/ fid/, and slurm/ (finished steps)  [the recipe's output_dir]
#   DATA            latent shard folders train8k/ (stage 1) train128k/ (stage 2) val8k/; the recipe's stage1.shards,
#                   data.train and data.val point there  [data/imagenet256]
#   IMAGES          ImageNet-style class folders to encode into those three shard folders, in that order (8 images a
#                   class, the paper's 128-a-class subset, held-out images); unset: the shards are already there  []
#   VAE             the SD VAE the latents and FID samples go through  [weights/sd-vae-ft-ema]
#   TEACHER         overrides the recipe's model.pretrained  [the recipe's: weights/DiT-XL-2-256x256.pt]
#   STEPS           the steps to run  ["precompute stage1 stage2 fid"]
#   PRECOMPUTE_ARGS more `python -m data.precompute images` options  ["--resolution 256 --flip"]
#   FID_ARGS        more `python -m eval.fid sample` options (default: 50,000 samples, 250 steps, CFG 1.5)  []
#   FID_REF         ADM's reference batch  [weights/VIRTUAL_imagenet256_labeled.npz]
#   INCEPTION       the FID Inception weights  [weights/pt_inception-2015-12-05-6726825d.pth]
#   PYTHON, REPO    as in pixart_hyena_x.sh
# Logs: slurm-<job name>-<job id>.out where sbatch was called; FID numbers in OUT/fid/fid_results.md.
#
#SBATCH --job-name=dit_xl2
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
RECIPE=${RECIPE:-recipes/dit_xl2/mha_hyena_x_50.yaml}
DATA=${DATA:-data/imagenet256}
VAE=${VAE:-weights/sd-vae-ft-ema}
STEPS=${STEPS:-precompute stage1 stage2 fid}
# The data and teacher paths come after the arguments, so that they win over the same keys there.
PATHS=(--set "stage1.shards=$DATA/train8k" --set "data.train=$DATA/train128k" --set "data.val=$DATA/val8k")
if [[ -n ${TEACHER:-} ]]; then PATHS+=(--set "model.pretrained=$TEACHER"); fi
OUT=${OUT:-$(recipe_out "$RECIPE" "$@" "${PATHS[@]}")}
read -r -a PRECOMPUTE <<< "${PRECOMPUTE_ARGS:---resolution 256 --flip}"
read -r -a FID <<< "${FID_ARGS:-}"
FID_REF=${FID_REF:-weights/VIRTUAL_imagenet256_labeled.npz}
INCEPTION=${INCEPTION:-weights/pt_inception-2015-12-05-6726825d.pth}
TRAIN=("$RECIPE" "$@" "${PATHS[@]}" --set "output_dir=$OUT")
echo "== recipe $RECIPE → $OUT; steps: $STEPS"

if wanted precompute; then
    if [[ -z ${IMAGES:-} ]]; then
        echo "== precompute: IMAGES is not set; training reads the shards already in $DATA"
    else
        read -r -a folders <<< "$IMAGES"
        if [[ ${#folders[@]} -ne 3 ]]; then
            echo "error: IMAGES needs 3 class folders (stage 1, stage 2, validation), got: $IMAGES" >&2
            exit 2
        fi
        splits=(train8k train128k val8k)
        for i in 0 1 2; do  # VAE latents of every image (and its mirror image), shards split over every rank
            step "$DATA" "precompute-${splits[i]}" ranks "$PYTHON" -m data.precompute images --images "${folders[i]}" \
                --vae "$VAE" --out "$DATA/${splits[i]}" "${PRECOMPUTE[@]}"
        done
    fi
fi
if wanted stage1; then step "$OUT" stage1 ranks "$PYTHON" -m recipes.train "${TRAIN[@]}" --stage 1; fi
if wanted stage2; then step "$OUT" stage2 ranks "$PYTHON" -m recipes.train "${TRAIN[@]}" --stage 2; fi
if wanted fid; then
    step "$OUT" fid-sample ranks "$PYTHON" -m eval.fid sample --ckpt "$OUT/export" --vae "$VAE" --out "$OUT/fid" \
        "${FID[@]}"
    step "$OUT" fid-score one "$PYTHON" -m eval.fid score --samples "$OUT/fid/samples.npz" --ref "$FID_REF" \
        --inception "$INCEPTION"
fi
echo "== job $SLURM_JOB_ID: pipeline finished; export in $OUT/export"
