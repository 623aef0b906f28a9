#!/bin/bash
# ResNet-20 on a GPU: CUDA smokes of the BiDST options added since the last GPU check (held-out scores,
# allocate: scores, unrolled, implicit_diag, the sparse backend falling back to masked compute on CUDA; short runs
# whose topology changes every 8 steps; logs in $OUT/smoke), the CUDA test, then the
# held-out pilot at 98% (alpha 0.3, 4 epochs, seeds 100-105: scores on held-out batches, on the training batch, and
# the control, 5,000 items held out in every run), 18 runs at a time; about 5 minutes on one H200.
# Needs the Fashion-MNIST files in .fmnist/fashion-mnist; OUT defaults to runs/gpu-check.
#   bash benchmarks/gpu_resnet20_holdout.sh && bidst report runs/gpu-holdout
# Arguments: the seeds and the arms to train (defaults above); SMOKE=0 skips the smokes and the test:
#   SMOKE=0 bash benchmarks/gpu_resnet20_holdout.sh "106 107 108 109 110 111" "train control"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OUT=${OUT:-runs/gpu-check}
D=.fmnist/fashion-mnist
seeds=${1:-100 101 102 103 104 105}; arms=${2:-holdout train control}
if [ "${SMOKE:-1}" != 0 ]; then
nvidia-smi -L; python3 -c "import torch, numba, yaml; print(torch.__version__, numba.__version__, torch.cuda.is_available())"
mkdir -p $OUT/smoke
smoke() { name=$1; shift
  timeout 150 python3 -m bidst train --config configs/fashion-mnist.yaml device=cuda data_root=$D train_subset=4096 epochs=2 \
    threads=1 progress=false log_every=1000 sparsity=0.95 seed=0 method_args.mask_interval=8 "$@" --run-dir $OUT/smoke/$name > $OUT/smoke/$name.log 2>&1
  echo "smoke $name rc=$? $(grep -h 'final test' $OUT/smoke/$name.log) $(python3 -c "import json; j=json.load(open('$OUT/smoke/$name/summary.json')); print(j['topology_changes'], j['method_stats'])")"
  rm -rf $OUT/smoke/$name; }
smoke holdout method=bidst method_args.upper_data=holdout holdout_size=1024 holdout_batch=32 &
smoke allocate method=bidst method_args.swap=forced method_args.allocate=scores &
smoke unrolled method=bidst method_args.hypergradient=unrolled &
smoke sparse method=bidst backend=sparse &
smoke resnet-allocate model=resnet20 method=bidst method_args.swap=forced method_args.allocate=scores &
smoke resnet-holdout model=resnet20 method=bidst method_args.upper_data=holdout holdout_size=1024 &
smoke implicit method=bidst method_args.hypergradient=implicit_diag &
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_evolution.py -k cuda 2>&1 | tail -3
wait
fi
one() { s=$1; arm=$2
  case $arm in
    holdout) a="method_args.upper_data=holdout";; train) a="";; control) a="method_args.mask_lr=0";;
  esac
  timeout 400 python3 -m bidst train --config configs/fashion-mnist.yaml model=resnet20 epochs=4 distribution=erk \
    threads=1 progress=false log_every=1000 device=cuda data_root=$D method=bidst match_flops=rigl \
    method_args.drop_fraction=0.3 holdout_size=5000 holdout_batch=32 sparsity=0.98 seed=$s $a \
    --run-dir runs/gpu-holdout/$arm-s$s > runs/gpu-holdout/$arm-s$s.log 2>&1
  echo "$arm s$s rc=$?"; }
export -f one; export D
mkdir -p runs/gpu-holdout
start=$(date +%s)
for s in $seeds; do for arm in $arms; do echo "$s $arm"; done; done | xargs -P 18 -L 1 bash -c 'one $0 $1'
echo "grid took $(( $(date +%s) - start )) s"
tar czf $OUT/gpu-holdout.tgz --exclude=checkpoints runs/gpu-holdout
