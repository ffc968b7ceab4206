# The device runs that built configs/tiny/base on one H200 (`bash docs/probes/pretrain_gpu.sh` with $OUT set):
# phase 1, lookup text only (421 s, results/pretrain_tiny_base_phase1_gpu.log), then phase 2 from it, lookups mixed
# with worked arithmetic (309 s beside two other settings, results/pretrain_tiny_base_phase2_gpu.log: run C).
# The device image has torch + transformers but not datasets, which data_recipes/__init__ imports; pretraining never
# uses it, so a stub module stands in.
mkdir -p /tmp/stub && echo "Dataset = None" > /tmp/stub/datasets.py
export PYTHONPATH=$PWD:/tmp/stub OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false
python -m pipelines.pretrain --out $OUT/base_lookup --steps 5000 --batch 128 --lr 2e-3 --eval-every 500 \
    > $OUT/phase1.log 2>&1
python -m pipelines.pretrain --model $OUT/base_lookup --out $OUT/tiny_base --steps 3000 --batch 160 \
    --arithmetic-share 0.2 --lr 1e-3 --eval-every 500 > $OUT/phase2.log 2>&1
for f in $OUT/phase1.log $OUT/phase2.log; do tr '\r' '\n' < $f | grep -ao "step [0-9]* ([0-9]* s).*\|wrote.*"; done
