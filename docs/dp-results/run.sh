#!/usr/bin/env bash
# Reproduces every number of docs/dp-results.md: each block is one `fl-clip21 tune` run
# whose tune.md / tune.csv / selection.csv / tune.png land in docs/dp-results/<name>/.
# Usage: docs/dp-results/run.sh NAME...   (from the repository root; no NAME: all of them)
# Wall times in docs/dp-results.md are from a 2-core shared CPU machine (numpy backend).
set -euo pipefail
TUNE=(python -m fl_clip21.cli tune)
OUT=docs/dp-results
S=scenarios/dp

run() {  # run NAME ARGS...: one tune, its wall time written to docs/dp-results/<NAME>.time
    local name=$1; shift
    local start=$SECONDS
    "${TUNE[@]}" "$@" --out "$OUT/$name" --overwrite --memory-budget 4GB
    echo "$name: $((SECONDS - start)) s" > "$OUT/$name.time"
}

# Priority 1: central (user-level) DP, MNIST-1D MLP, 1000 clients Dirichlet(0.1), 10% Poisson
# sampling (amplification), delta = 1e-5, eps 1 / 3 / 8; metric: test accuracy of the final model.
central_mlp1000_clip21() {
    run central-mlp1000-clip21 $S/mnist1d-mlp-1000-central.toml --set algorithms=clip21-sgd2m \
        --grid lr=0.1,0.3,1,3 --grid tau=0.1,0.3,1,3 --grid beta2=0.1,0.3,1 \
        --select-seeds 0 --eval-seeds 1,2,3 --metric final_accuracy
}
central_mlp1000_dpfedavg() {
    run central-mlp1000-dpfedavg $S/mnist1d-mlp-1000-central.toml --set algorithms=dp-fedavg \
        --grid lr=0.1,0.3,1,3 --grid tau=0.1,0.3,1,3 --grid local-steps=1,4 \
        --select-seeds 0 --eval-seeds 1,2,3 --metric final_accuracy
}
# Adaptive clipping at its defaults (target-quantile 0.5, clip-lr 0.2, count-stddev m/20), one local step;
# clip-sgd with central noise (the same iterates as dp-fedavg with local-steps 1, README "Algorithms").
central_mlp1000_others() {
    run central-mlp1000-others $S/mnist1d-mlp-1000-central.toml --set algorithms=dp-fedavg-adaptive,clip-sgd \
        --grid lr=0.1,0.3,1,3 --grid tau=0.1,0.3,1,3 \
        --select-seeds 0 --eval-seeds 1,2,3 --metric final_accuracy
}

# The coarse pass put clip21-sgd2m's winners at beta2 = 1 (its largest value) and at eps 8 at
# lr = 3 (the grid's end): a second pass around them, with beta1 = 1 too.
central_mlp1000_clip21_refine() {
    run central-mlp1000-clip21-refine $S/mnist1d-mlp-1000-central.toml --set algorithms=clip21-sgd2m \
        --grid lr=1,3,10 --grid tau=0.1,0.3 --grid beta1=0.5,1 --grid beta2=1 \
        --select-seeds 0 --eval-seeds 1,2,3 --metric final_accuracy
}

# Central DP at 5000 clients (30 rows each, Dirichlet(0.1), 10% Poisson sampling: m = 500 a round,
# so the per-round noise z tau / m is 5x smaller than at 1000 clients). Grids centred on the
# 1000-client winners (central-mlp1000-summary.md), one pass each, for lack of time.
central_mlp5000_clip21() {
    run central-mlp5000-clip21 $S/mnist1d-mlp-5000-central.toml --set algorithms=clip21-sgd2m \
        --grid lr=1,3,10 --grid tau=0.1,0.3,1 --grid beta1=1 --grid beta2=1 \
        --select-seeds 0 --eval-seeds 1,2,3 --metric final_accuracy
}
central_mlp5000_dpfedavg() {
    run central-mlp5000-dpfedavg $S/mnist1d-mlp-5000-central.toml --set algorithms=dp-fedavg \
        --grid lr=0.3,1,3 --grid tau=1,3 --grid local-steps=4 \
        --select-seeds 0 --eval-seeds 1,2,3 --metric final_accuracy
}
central_mlp5000_others() {
    run central-mlp5000-others $S/mnist1d-mlp-5000-central.toml --set algorithms=dp-fedavg-adaptive,clip-sgd \
        --grid lr=0.3,1,3 --grid tau=1,3 \
        --select-seeds 0 --eval-seeds 1,2,3 --metric final_accuracy
}

# The first pass put clip21-sgd2m's and dp-fedavg's winners at the ends of lr and tau: a second pass
# for each, further out and with the first pass's winners in it (so its winner is the best of both),
# and for dp-fedavg-adaptive and clip-sgd (their winners at lr = 3, the end, and mostly at an end of tau).
central_mlp5000_clip21_refine() {
    run central-mlp5000-clip21-refine $S/mnist1d-mlp-5000-central.toml --set algorithms=clip21-sgd2m \
        --grid lr=3,10,30 --grid tau=0.3,1,3 --grid beta1=1 --grid beta2=1 \
        --select-seeds 0 --eval-seeds 1,2,3 --metric final_accuracy
}
central_mlp5000_dpfedavg_refine() {
    run central-mlp5000-dpfedavg-refine $S/mnist1d-mlp-5000-central.toml --set algorithms=dp-fedavg \
        --grid lr=1,3,10 --grid tau=3,10 --grid local-steps=4 \
        --select-seeds 0 --eval-seeds 1,2,3 --metric final_accuracy
}
central_mlp5000_others_refine() {
    run central-mlp5000-others-refine $S/mnist1d-mlp-5000-central.toml --set algorithms=dp-fedavg-adaptive,clip-sgd \
        --grid lr=1,3,10 --grid tau=1,3,10 \
        --select-seeds 0 --eval-seeds 1,2,3 --metric final_accuracy
}

# Clip21-SGD2M with momentum (beta1 0.5) and a smaller error-feedback step (beta2 0.3) around its
# winners: the passes above keep beta1 = beta2 = 1, the 1000-client winners.
central_mlp5000_clip21_betas() {
    run central-mlp5000-clip21-betas $S/mnist1d-mlp-5000-central.toml --set algorithms=clip21-sgd2m \
        --grid lr=3,10 --grid tau=0.3,1 --grid beta1=0.5,1 --grid beta2=0.3,1 \
        --select-seeds 0 --eval-seeds 1,2,3 --metric final_accuracy
}

# Priority 2: local DP, the table. Two grids per scenario:
#   fine (reduced from the 11 x 11 x 3 x 5): lr, tau in half decades, beta1 in {0.5, 1}, beta2 in {0.01, 0.1, 0.3, 1}
#   authors' (coarse, as in the authors' public scripts): lr in {10, 1, 0.1, 0.01, 1e-3},
#   tau in {1e-2, 1e-3, 1e-4, 1e-5}, beta2 in {0.01, 0.1}, beta1 the scenario's 0.5
# Digits: test accuracy of the final model; logreg-nonconvex: final train loss.
FINE=(--grid lr=0.01,0.03,0.1,0.3,1,3,10 --grid tau=0.001,0.003,0.01,0.03,0.1,0.3,1
      --grid beta1=0.5,1 --grid beta2=0.01,0.1,0.3,1)
AUTHORS=(--grid lr=10,1,0.1,0.01,0.001 --grid tau=0.01,0.001,0.0001,0.00001 --grid beta2=0.01,0.1)
SEEDS=(--select-seeds 0 --eval-seeds 1,2,3)
local_grids() {  # local_grids NAME SCENARIO METRIC
    run "$1-fine" "$2" "${FINE[@]}" "${SEEDS[@]}" --metric "$3"
    run "$1-authors" "$2" "${AUTHORS[@]}" "${SEEDS[@]}" --metric "$3"
}
local_digits20() { local_grids local-digits20 $S/digits-20-dirichlet0.1-local.toml final_accuracy; }
local_digits200() { local_grids local-digits200 $S/digits-200-iid-local.toml final_accuracy; }
local_logreg() { local_grids local-logreg $S/logreg-nonconvex-local.toml final_loss; }
local_digits200_authors() {
    run local-digits200-authors $S/digits-200-iid-local.toml "${AUTHORS[@]}" "${SEEDS[@]}" --metric final_accuracy
}
# digits-100 ran its two grids as two commands (the fine one last, for lack of time).
local_digits100_fine() {
    run local-digits100-fine $S/digits-100-dirichlet1-local.toml "${FINE[@]}" "${SEEDS[@]}" --metric final_accuracy
}
local_digits100_authors() {
    run local-digits100-authors $S/digits-100-dirichlet1-local.toml "${AUTHORS[@]}" "${SEEDS[@]}" --metric final_accuracy
}
# The diagnosis: noise accumulated in g against the signal, at tuned winners (seed 1).
noise_in_g() {
    local py=(python docs/dp-results/noise_in_g.py)
    {
    "${py[@]}" $S/mnist1d-mlp-1000-central.toml clip21-sgd2m target-epsilon=8 lr=3 tau=0.3 beta1=1 beta2=1 seed=1
    # the same run without noise, then also with every client every round (no stale memories)
    "${py[@]}" --no-noise $S/mnist1d-mlp-1000-central.toml clip21-sgd2m lr=3 tau=0.3 beta1=1 beta2=1 seed=1
    "${py[@]}" --no-noise $S/mnist1d-mlp-1000-central.toml clip21-sgd2m lr=3 tau=0.3 beta1=1 beta2=1 seed=1 \
        fraction=1 sampling=fixed
    "${py[@]}" $S/digits-20-dirichlet0.1-local.toml clip21-sgd2m target-epsilon=27 lr=0.03 tau=0.03 beta1=0.5 beta2=0.3 seed=1
    "${py[@]}" $S/digits-200-iid-local.toml clip21-sgd2m target-epsilon=27 lr=1 tau=0.1 beta1=0.5 beta2=0.3 seed=1
    "${py[@]}" $S/digits-200-iid-local.toml clip21-sgd2m target-epsilon=27 lr=1 tau=0.1 beta1=0.5 beta2=0.3 seed=1 rounds=10
    # local DP at 5000 clients, clip21-sgd2m's tuned cell at eps 27 (local-mlp5000/tune.md; beta1 the scenario's)
    "${py[@]}" $S/mnist1d-mlp-5000-local.toml clip21-sgd2m target-epsilon=27 lr=0.3 tau=0.3 beta1=0.5 beta2=0.1 seed=1
    } > $OUT/noise_in_g.txt
}

# What the noise costs each method at its tuned cell (and Clip21 at tau = 1): the same runs without noise,
# seeds 1-3 (docs/dp-results.md, section 1).
noise_cost() {
    local py=(python $OUT/noise_cost.py $S/mnist1d-mlp-1000-central.toml)
    {
        echo "ε = 8"; echo
        "${py[@]}" --epsilon 8 clip-sgd:lr=3,tau=1 clip21-sgd2m:lr=3,tau=1,beta1=1,beta2=1 \
            clip21-sgd2m:lr=3,tau=0.3,beta1=1,beta2=1 dp-fedavg:lr=1,tau=3,local-steps=4
        echo; echo "ε = 1"; echo
        "${py[@]}" --epsilon 1 clip-sgd:lr=0.3,tau=1 clip21-sgd2m:lr=1,tau=1,beta1=1,beta2=1 \
            clip21-sgd2m:lr=1,tau=0.1,beta1=1,beta2=1 dp-fedavg:lr=0.3,tau=1,local-steps=4
    } > $OUT/noise-cost.md
}

# The same at 5000 clients, at the 5000-client winners (section 1b).
noise_cost_5000() {
    local py=(python $OUT/noise_cost.py $S/mnist1d-mlp-5000-central.toml)
    {
        echo "ε = 8"; echo
        "${py[@]}" --epsilon 8 clip-sgd:lr=3,tau=1 clip21-sgd2m:lr=10,tau=1,beta1=1,beta2=1 \
            dp-fedavg:lr=3,tau=3,local-steps=4
        echo; echo "ε = 1"; echo
        "${py[@]}" --epsilon 1 clip-sgd:lr=3,tau=1 clip21-sgd2m:lr=3,tau=0.3,beta1=1,beta2=1 \
            dp-fedavg:lr=1,tau=3,local-steps=4 clip21-sgd2m:lr=3,tau=1,beta1=1,beta2=1
    } > $OUT/noise-cost-5000.md
    {
        python docs/dp-results/noise_in_g.py $S/mnist1d-mlp-5000-central.toml clip21-sgd2m target-epsilon=8 \
            lr=10 tau=1 beta1=1 beta2=1 seed=1
        python docs/dp-results/noise_in_g.py --no-noise $S/mnist1d-mlp-5000-central.toml clip21-sgd2m \
            lr=10 tau=1 beta1=1 beta2=1 seed=1
    } > $OUT/noise_in_g-5000.txt
}

# Priority 3 (small grid, for lack of time): local DP on MNIST-1D, MLP, 1000 clients Dirichlet(0.1).
local_mlp1000() {
    run local-mlp1000 $S/mnist1d-mlp-1000-local.toml \
        --grid lr=0.1,0.3,1 --grid tau=0.1,0.3,1 --grid beta2=0.1,1 \
        --select-seeds 0 --eval-seeds 1,2,3 --metric final_accuracy
}
# Local DP at 5000 clients (30 rows each, Dirichlet(0.1), 10% Poisson sampling: m = 500 a round):
# the same grid as local_mlp1000.
local_mlp5000() {
    run local-mlp5000 $S/mnist1d-mlp-5000-local.toml \
        --grid lr=0.1,0.3,1 --grid tau=0.1,0.3,1 --grid beta2=0.1,1 \
        --select-seeds 0 --eval-seeds 1,2,3 --metric final_accuracy
}
# The combined tables and plots of docs/dp-results.md (from the tune.csv files above).
summaries() {
    local py=(python $OUT/summary.py)
    "${py[@]}" $OUT/central-mlp1000.png dp-fedavg $OUT/central-mlp1000-clip21-refine \
        $OUT/central-mlp1000-dpfedavg $OUT/central-mlp1000-others > $OUT/central-mlp1000-summary.md
    "${py[@]}" $OUT/central-mlp5000.png dp-fedavg $OUT/central-mlp5000-clip21-refine \
        $OUT/central-mlp5000-dpfedavg-refine $OUT/central-mlp5000-others-refine > $OUT/central-mlp5000-summary.md
    for x in local-digits20-fine local-digits20-authors local-digits200-fine local-digits200-authors \
             local-digits100-fine local-digits100-authors local-mlp1000 \
             local-mlp5000; do
        [ -f $OUT/$x/tune.csv ] && "${py[@]}" $OUT/$x.png clip-sgd $OUT/$x > $OUT/$x-summary.md
    done
    for x in local-logreg-fine local-logreg-authors; do
        "${py[@]}" "--ylabel=final train loss (mean +- std, held-out seeds)" $OUT/$x.png clip-sgd $OUT/$x \
            > $OUT/$x-summary.md
    done
}

names=("$@")
# Everything docs/dp-results.md reports, in order.
[ ${#names[@]} -gt 0 ] || names=(central_mlp1000_clip21 central_mlp1000_clip21_refine central_mlp1000_dpfedavg
                           central_mlp1000_others central_mlp5000_clip21 central_mlp5000_dpfedavg
                           central_mlp5000_others central_mlp5000_clip21_refine central_mlp5000_dpfedavg_refine
                           central_mlp5000_others_refine central_mlp5000_clip21_betas local_digits20 local_digits200 local_digits100_authors local_digits100_fine local_logreg
                           local_mlp1000 local_mlp5000 noise_in_g noise_cost noise_cost_5000 summaries)
for n in "${names[@]}"; do "$n"; done
