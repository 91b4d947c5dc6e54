#!/usr/bin/env bash
# Runs one vlm-jax command on every worker of a Cloud TPU VM slice (multi-host).
#   launch/tpu_vm.sh TPU_NAME ZONE "vlm-jax train --config configs/llava15_ref.py:stage2 --workdir gs://BUCKET/run1"
# The workdir must be a path every worker can write: a gs:// bucket (the [tpu] extra) or a shared
# filesystem such as Filestore.
# Each worker needs this repo at ~/vlm-jax with `pip install -e ".[tpu]"` done (see the setup line).
# jax.distributed.initialize() finds the coordinator from the TPU metadata.
set -euo pipefail
tpu="$1"; zone="$2"; cmd="$3"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd ~/vlm-jax && VLM_JAX_DISTRIBUTED=1 $cmd"
# setup, once:
# gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
#   "git clone REPO ~/vlm-jax && cd ~/vlm-jax && pip install -e '.[tpu]'"
