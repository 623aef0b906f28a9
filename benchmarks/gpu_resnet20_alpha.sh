#!/bin/bash
# ResNet-20 on the GPU (the GPU grid's command per run) at drop fraction ALPHA for EPOCHS epochs, PAR runs at a
# time, each killed at DEADLINE seconds. CELLS: "grid" = BiDST and its control at 90/95/98%, seeds 0-2, plus
# seeds 3-5 at 98%; "val98" = BiDST, its control and RigL at 98% on the validation seeds 100-102 and the test
# seeds 0-2; "long98" = BiDST, its control and RigL at 98% on the test seeds 0-2 (for longer runs); "pair98" =
# BiDST and its control at 98% on the test seeds 0-5.
#   bash benchmarks/gpu_resnet20_alpha.sh runs/gpu-a03 16 420 0.3 grid
#   bash benchmarks/gpu_resnet20_alpha.sh runs/gpu-long 9 500 0.3 long98 10
out=${1:-runs/gpu-a03}; par=${2:-16}; deadline=${3:-420}; alpha=${4:-0.3}; set=${5:-grid}; epochs=${6:-4}
cells() {
  if [ "$set" = long98 ]; then
    for s in 0 1 2; do for m in bidst control rigl; do echo "0.98 $s $m"; done; done
    return
  fi
  if [ "$set" = pair98 ]; then
    for s in 0 1 2 3 4 5; do for m in bidst control; do echo "0.98 $s $m"; done; done
    return
  fi
  if [ "$set" = val98 ]; then
    for s in 100 101 102 0 1 2; do for m in bidst control rigl; do echo "0.98 $s $m"; done; done
    return
  fi
  for s in 0 1 2; do for sp in 0.98 0.95 0.9; do for m in bidst control; do echo "$sp $s $m"; done; done; done
  for s in 3 4 5; do for m in bidst control; do echo "0.98 $s $m"; done; done
}
one() {
  sp=$1; s=$2; m=$3
  case $m in
    bidst) args="method=bidst match_flops=rigl";;
    control) args="method=bidst match_flops=rigl method_args.mask_lr=0";;
    *) args="method=$m";;
  esac
  name=$m-a$(python3 -c "print(f'{round($alpha*10):02d}')")-sp$(python3 -c "print(round($sp*100))")-s$s
  timeout $deadline python3 -m bidst train --config configs/fashion-mnist.yaml model=resnet20 epochs=$epochs distribution=erk \
    threads=1 progress=false log_every=1000 device=cuda data_root=.fmnist/fashion-mnist $args \
    sparsity=$sp seed=$s method_args.drop_fraction=$alpha --run-dir $out/$name > /dev/null 2> $out/$name.err
}
export -f one; export out deadline alpha epochs
mkdir -p $out
cells | xargs -P $par -L 1 bash -c 'one $0 $1 $2'
