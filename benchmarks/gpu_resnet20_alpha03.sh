#!/bin/bash
# ResNet-20 on the GPU, BiDST and its control at alpha 0.3: 24 runs, N at a time, each killed at DEADLINE seconds.
out=${1:-runs/gpu-a03}; par=${2:-16}; deadline=${3:-420}
cells() {
  for s in 0 1 2; do for sp in 0.98 0.95 0.9; do for m in bidst control; do echo "$sp $s $m"; done; done; done
  for s in 3 4 5; do for m in bidst control; do echo "0.98 $s $m"; done; done
}
one() {
  sp=$1; s=$2; m=$3; extra=""; [ "$m" = control ] && extra="method_args.mask_lr=0"
  name=$m-a03-sp$(python3 -c "print(round($sp*100))")-s$s
  timeout $deadline python3 -m bidst train --config configs/fashion-mnist.yaml model=resnet20 epochs=4 distribution=erk \
    threads=1 progress=false log_every=1000 device=cuda data_root=.fmnist/fashion-mnist method=bidst match_flops=rigl \
    sparsity=$sp seed=$s method_args.drop_fraction=0.3 $extra --run-dir $out/$name > /dev/null 2> $out/$name.err
}
export -f one; export out deadline
mkdir -p $out
cells | xargs -P $par -L 1 bash -c 'one $0 $1 $2'
