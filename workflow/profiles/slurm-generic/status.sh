#!/usr/bin/env bash
# Status of SLURM job $1 for Snakemake's cluster-generic executor: prints running, success or failed.
# scontrol answers from slurmctld's memory (jobs stay there MinJobAge, default 300 s, after they end), so
# no accounting is needed; sacct is asked only about jobs scontrol has forgotten. Always exits 0: a
# non-zero exit stops Snakemake.
if out=$(scontrol show job "$1" 2>&1); then
  state=$(grep -o 'JobState=[A-Z_]*' <<<"$out" | cut -d= -f2)
elif grep -q 'Invalid job id' <<<"$out"; then
  state=$(sacct -j "$1" -X -n -P -o State 2>/dev/null | head -n 1 | cut -d' ' -f1)
else
  echo running  # controller unreachable: ask again at the next check
  exit 0
fi
case "$state" in
  COMPLETED) echo success ;;
  PENDING | CONFIGURING | RUNNING | COMPLETING | SUSPENDED | REQUEUED | REQUEUE_HOLD | REQUEUE_FED | RESIZING \
    | SIGNALING | STAGE_OUT | STOPPED | RESV_DEL_HOLD) echo running ;;
  *) echo failed ;;  # FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, ..., or unknown
esac
