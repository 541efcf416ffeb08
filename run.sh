#!/usr/bin/env bash
# Commands for the papers' tables, and a smoke form that runs offline on a CPU.
#   bash run.sh smoke     # tiny random CLIP on generated images: checks that everything runs
#   bash run.sh demo      # the offline demo world, 3 seeds (zero-shot, CAP, CAP as released, Co-Reg)
#   bash run.sh cap       # CAP Table 1 as released (--as-released): 6 datasets x UL/SSL/TRZSL x seeds 1-3 (needs data + a GPU)
#   bash run.sh cap-paper # the same grid with the paper's formulas (cap.py's defaults)
#   bash run.sh coreg     # Co-Reg: its datasets x seeds 1-3 (needs data + a GPU)
#   bash run.sh zeroshot  # the zero-shot CLIP rows
# Extra arguments after the first go to every command, e.g. `bash run.sh cap --data-dir /data --download`.
# Each group ends with `python tools/summarize.py runs/<group> --paper <method>`: one table per (dataset, setting),
# the published number (docs/paper_results.json), ours (mean ± std over the seeds found) and ours − paper.
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-smoke}; shift || true
PY=${PYTHON:-python}
SEEDS=${SEEDS:-"1 2 3"}

case "$what" in
  smoke)
    T="--data synthetic --clip-model tiny --pretrained none --cache-dir cache/smoke --quiet"
    $PY zeroshot.py $T --out-dir runs/smoke/zeroshot "$@"
    for mode in ul ssl trzsl; do
      $PY cap.py $T --mode $mode --epochs 2 --iters 3 --out-dir runs/smoke/cap-$mode "$@"
    done
    $PY coreg.py $T --arch narrow --epochs 3 --warm-up 1 --start-cont 0 --out-dir runs/smoke/coreg "$@"
    ;;
  demo)
    for seed in $SEEDS; do
      $PY zeroshot.py --data demo --seed $seed --out-dir runs/demo/zeroshot-seed$seed "$@"
      $PY cap.py --data demo --mode ul --seed $seed --out-dir runs/demo/cap-seed$seed "$@"
      $PY cap.py --data demo --mode ul --as-released --seed $seed --out-dir runs/demo/cap-released-seed$seed "$@"
      $PY coreg.py --data demo --seed $seed --out-dir runs/demo/coreg-seed$seed "$@"
    done
    $PY tools/summarize.py runs/demo
    ;;
  zeroshot)
    for data in flowers102 resisc45 dtd eurosat cub fgvc_aircraft; do
      $PY zeroshot.py --data $data --out-dir runs/zeroshot/$data "$@"
    done
    $PY tools/summarize.py runs/zeroshot --paper zeroshot
    ;;
  cap|cap-paper)
    # cap: every behaviour of the released code (docs/cap.md), which produced the paper's table; cap-paper: the
    # paper's formulas. The release's described classes: descriptions/<data>.json, written once by
    # `python tools/release_descriptions.py <clone of Noahwangyuchen/CAP>`; without it, detection + --llm-url decide.
    release=""; [ "$what" = cap ] && release="--as-released"
    for data in flowers102 resisc45 dtd eurosat cub fgvc_aircraft; do
      desc=""; [ -f descriptions/$data.json ] && desc="--descriptions descriptions/$data.json"
      for mode in ul ssl trzsl; do
        for seed in $SEEDS; do
          $PY cap.py --data $data --mode $mode --seed $seed $release $desc --out-dir runs/$what/$data-$mode-seed$seed "$@"
        done
      done
    done
    $PY tools/summarize.py runs/$what --paper cap
    ;;
  coreg)
    # The released defaults (its README and train.py): warm-up 50 (100 on CIFAR-100); 800 epochs on CIFAR and SVHN,
    # 100 on the others; the cosine schedule always spans 800 epochs (hard-coded there).
    for data in cifar10 cifar100 svhn fashion_mnist eurosat fer2013 gtsrb; do
      size=32; case $data in eurosat|fer2013|gtsrb) size=64;; esac
      warm=50; [ $data = cifar100 ] && warm=100
      epochs=100; case $data in cifar10|cifar100|svhn) epochs=800;; esac
      for seed in $SEEDS; do
        # the release loops over range(num_epochs + 1) (train.py), one epoch more than its flag: pass that count
        $PY coreg.py --data $data --image-size $size --warm-up $warm --epochs $((epochs + 1)) --cosine-epochs 800 \
          --seed $seed --out-dir runs/coreg/$data-seed$seed "$@"
      done
    done
    $PY tools/summarize.py runs/coreg --paper coreg
    ;;
  *) echo "usage: bash run.sh smoke|demo|zeroshot|cap|cap-paper|coreg [extra flags]" >&2; exit 2;;
esac
