# shellcheck shell=bash
# Shared by the sbatch scripts beside it (sourced, not run): the job's environment, ranks under srun, steps that
# are skipped once they have finished, and a requeue before the time limit.
#
# A step is one command. When it succeeds, FOLDER/slurm/NAME.done records the command (FOLDER: the run folder, or
# the data folder for data steps, which other runs share); a later run of the job (a requeue, or the same sbatch
# line again) skips every step whose record holds the same command and reruns the others. Training and data
# generation resume by themselves, so a step killed half way continues where it stopped.

# The job's environment: run from the repository, ranks and master address from Slurm, requeue on USR1.
job_setup() {
    cd "$REPO" || exit 2
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
    fi
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    # Each rank reads its rank, world size and local rank from srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID);
    # values inherited from the submitting shell would override them.
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export MASTER_ADDR
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    trap requeue USR1
    echo "== job $SLURM_JOB_ID, run $((${SLURM_RESTART_COUNT:-0} + 1)): $SLURM_NTASKS ranks on $SLURM_JOB_NUM_NODES" \
         "node(s) ($SLURM_JOB_NODELIST), master $MASTER_ADDR:$MASTER_PORT, python $PYTHON"
}

# `#SBATCH --signal=B:USR1@300` lands here shortly before the time limit: put the job back in the queue. Slurm
# then stops the running step; the next run skips finished steps and resumes training from its last complete
# checkpoint (recipe `checkpoint_every`), so at most that many steps are computed twice.
requeue() {
    echo "== job $SLURM_JOB_ID: time limit near, requeueing; the next run resumes from the last checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
}

# Every rank of the job (all nodes); one failing rank stops the others instead of leaving them waiting.
ranks() { srun --kill-on-bad-exit=1 "$@"; }

# One rank, on the first node.
one() { srun --nodes=1 --ntasks=1 "$@"; }

# Is NAME among the space-separated STEPS?
wanted() { [[ " $STEPS " == *" $1 "* ]]; }

# step FOLDER NAME COMMAND...: run COMMAND unless FOLDER/slurm/NAME.done records this very command.
step() {
    local folder=$1 name=$2
    shift 2
    local marker=$folder/slurm/$name.done command pid rc=0 started=$SECONDS
    command=$(printf '%q ' "$@")
    if [[ -f $marker && $(<"$marker") == "$command" ]]; then
        echo "== $name: finished in an earlier run, skipped ($marker)"
        return 0
    fi
    echo "== $name: $command"
    "$@" &  # in the background, so that the USR1 trap runs while the step works
    pid=$!
    wait "$pid" || rc=$?
    while ((rc > 128)) && kill -0 "$pid" 2>/dev/null; do  # a trapped signal interrupted `wait`, not the step
        rc=0
        wait "$pid" || rc=$?
    done
    if ((rc != 0)); then
        echo "== $name: failed (exit $rc) after $((SECONDS - started)) s" >&2
        exit "$rc"
    fi
    mkdir -p "$folder/slurm"
    printf '%s' "$command" > "$marker.tmp" && mv "$marker.tmp" "$marker"
    echo "== $name: done in $((SECONDS - started)) s"
}

# The arguments for both training steps: recipe overrides (`--set`) and `--allow-change` only. A job resumes its
# run by itself at every requeue, so `--start-over` would delete the run again at each one (and stage 2 would
# delete stage 1's students), and `--resume` would pin one checkpoint; both are refused before any step starts.
check_train_args() {
    local arg
    for arg in "$@"; do
        case $arg in
            --start-over | --resume | --resume=*)
                echo "error: $arg is not for the pipeline: every run of the job continues its run folder. To start" \
                    "over, delete the run folder (OUT) first, or give another OUT" >&2
                exit 2 ;;
        esac
    done
}

# The run folder a recipe and its `--set` overrides resolve to; validates both before any step starts.
recipe_out() {
    "$PYTHON" -c 'import sys
from recipes.config import load_recipe
from recipes.train import parse_args
args = parse_args(sys.argv[1:])
print(load_recipe(args.recipe, args.overrides).out)' "$@"
}
