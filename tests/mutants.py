"""Bugs that train: the field's known bugs in self-supervised learning code, each written as a small rewrite of
this project's code, with the tests that must catch it.

    python -m tests.mutants                 # every entry: apply it to a copy of the tree, run its tests
    python -m tests.mutants NAME [NAME...]  # some entries
    python -m tests.mutants --list          # the catalogue: name, the bug, where it happened, the tests
    python -m tests.mutants --check         # only check that every entry still applies to the tree

Each entry is one bug: its rewrite (file, exact old text, new text; the old text must occur exactly once),
what it does to training, where it happened in the field (an issue or pull request, or "found in this
project's review"), and the test node IDs that must fail with it. The runner copies the tree (the files git
tracks or would track, as they are in the working tree now) to a temporary directory, checks that those tests
pass there, then applies one entry at a time and runs its tests (pytest -x, no xdist): failing tests are
"caught", passing ones "survived". The exit status is non-zero if any entry survives, cannot be applied, or
breaks its tests' collection instead of failing them. It runs outside the default suite (a full run takes
about 15 minutes on 2 cores); tests/test_mutants.py checks only the catalogue's shape, at every run.

This module imports nothing outside the standard library: docs/bugs_hook.py reads it to write the docs page.
"""
import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REVIEW = "found in this project's review"


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    group: str
    bug: str  # what the code does wrong, one sentence
    effect: str  # what it does to training, one sentence
    edits: tuple  # ((file, old text, new text), ...), applied in order
    tests: tuple  # the pytest node IDs that must catch it
    field: tuple  # links to where it happened, or (REVIEW,)


def M(name, group, bug, effect, edits, tests, field):
    return Mutant(name, group, bug, effect, tuple(edits), tuple(tests), tuple(field))


W_RANKS = "tests/test_distributed.py::test_one_step_on_W_ranks_equals_one_process[{}-2]"
RESUME = "tests/test_resume.py::test_interrupted_and_resumed_run_ends_with_the_weights_of_a_straight_run[{}]"
SCHEDULES = "tests/test_optim.py::test_the_real_loop_follows_each_methods_schedules[{}]"
EPOCHS = "tests/test_data.py::test_each_epoch_of_the_loop_draws_a_new_order_and_new_views"
KNN = "tests/test_data.py::test_the_knn_monitor_votes_on_eval_mode_features_of_unaugmented_images"
GATHER = "dist.gather_with_grad(z1), dist.gather_with_grad(z2)  # (N, dim)"
SET_EPOCH = "loader.sampler.set_epoch(self.epoch, skip=(self.step % self.steps_per_epoch) * loader.batch_size)"
SPLIT_MEAN = 'self.running_mean.copy_(reduce(mean, "(s c) -> c", "mean", s=S))'
RECIPE_STEP = "tests/test_recipes.py::test_each_recipe_number_arrives_at_the_step[{}]"
RECIPE_BN = "tests/test_recipes.py::test_the_bn_of_every_module_on_two_ranks[{}]"
RECIPE_LINEAR = "tests/test_recipes.py::test_the_linear_protocols_lr_and_schedule_at_the_step[{}]"
RECIPE_VIEWS = "tests/test_recipes.py::test_each_views_augmentation_draws_the_recipes_parameters[{}]"
SPLIT_BN = "tests/test_moco.py::test_split_bn_of_each_file_keeps_the_statistics_of_every_sub_batch_in_the_real_forward[{}]"

DISTRIBUTED, MOMENTUM, RESUMING, DATA, EVALUATION, OPTIMISER, LOSSES = (
    "Statistics across GPUs", "Momentum encoders, targets and queues", "Resuming a run", "The data pipeline",
    "Evaluation", "Optimiser and schedules", "Losses and architecture")

CATALOGUE = [
    # --- statistics across GPUs -------------------------------------------------------------------------------
    M("simclr-negatives-not-gathered", DISTRIBUTED,
      "SimCLR's NT-Xent takes its negatives from this GPU's batch only (no all-gather).",
      "Each anchor meets 2n − 2 negatives instead of 2N − 2, so the loss and its gradient change with the number "
      "of GPUs and a large global batch buys nothing.",
      [("simclr.py", GATHER, "z1, z2  # (n, dim): this rank's views only"),
       ("simclr.py", "start=dist.rank() * n)", "start=0)")],
      [W_RANKS.format("simclr")],
      ["https://github.com/Lightning-Universe/lightning-bolts/issues/179"]),
    M("gather-backward-not-summed", DISTRIBUTED,
      "The all-gather's backward returns this rank's slice of its own loss's gradient, without summing the "
      "gradients that the other ranks' losses send back to this rank's samples.",
      "Every loss on gathered tensors (SimCLR's negatives, Barlow Twins' C, VICReg's statistics) trains with a "
      "gradient that is wrong at W > 1 (1/W of the right one where every rank holds the same loss).",
      [("common/dist.py", "        grad = grad.contiguous()\n        dist.all_reduce(grad)\n",
        "        grad = grad.contiguous()\n")],
      ["tests/test_distributed.py::test_gather_with_grad_gives_the_single_process_gradient[2]",
       W_RANKS.format("simclr")],
      ["https://github.com/lightly-ai/lightly/issues/1528"]),
    M("barlow-gradient-over-W", DISTRIBUTED,
      "Barlow Twins' gathered embeddings carry gradient only through this rank's own slice, the others gathered "
      "as constants (what an all-reduce of C without gradient amounts to).",
      "With W GPUs every gradient is 1/W of the global loss's: the effective lr, and the weight decay's balance "
      "against the gradient, change with the number of GPUs.",
      [("barlow.py", GATHER,
        "[torch.cat([z if r == dist.rank() else part for r, part in enumerate(dist.gather(z).chunk(dist.world()))])"
        " for z in (z1, z2)]  # (N, dim)")],
      [W_RANKS.format("barlow")],
      ["https://github.com/lightly-ai/lightly/issues/1977"]),
    M("vicreg-statistics-not-gathered", DISTRIBUTED,
      "VICReg's variance and covariance are computed on this GPU's batch instead of the gathered global batch.",
      "The regularisers see N/W samples: their values and gradients change with the number of GPUs.",
      [("vicreg.py", "loss = vicreg_loss(z_all, z_all_, *self.coeffs)", "loss = vicreg_loss(z, z_, *self.coeffs)")],
      [W_RANKS.format("vicreg")],
      ["https://github.com/KevinMusgrave/pytorch-metric-learning/issues/535"]),
    M("unigrad-F-not-reduced", DISTRIBUTED,
      "UniGrad's F is updated with this rank's batch correlation, not the mean over ranks.",
      "Each rank holds its own F, so the negative term λ·F u₁ differs between GPUs and from the one-GPU run.",
      [("unigrad.py", "        F_batch = dist.all_reduce_mean(F_batch)  # the global batch (every rank holds N / world "
        "samples)\n", "")],
      [W_RANKS.format("unigrad")],
      [REVIEW]),
    M("simclr-bn-per-gpu", DISTRIBUTED,
      "SimCLR runs with each GPU's own BatchNorm statistics instead of global BN (SimCLR §2.2).",
      "BN leaks which views belong together within a GPU's batch, the contrastive task gets easier than it "
      "should, and the representation learns less.",
      [("simclr.py", "model = run.prepare(build_model(args))", "model = run.prepare(build_model(args), sync_bn=False)")],
      ["tests/test_cli.py::test_simclr_one_process_and_torchrun"],
      [REVIEW]),
    M("moco-per-rank-queue", DISTRIBUTED,
      "MoCo enqueues this rank's keys only, without gathering the keys of all GPUs first.",
      "Each GPU keeps its own queue, refreshed W times slower and different on every GPU.",
      [("mocov1.py", "keys = dist.gather(k)  # (N, dim)", "keys = k  # (n, dim): this rank's keys only")],
      ["tests/test_moco.py::test_shufflebn_and_queue_across_two_ranks"],
      ["https://github.com/lightly-ai/lightly/issues/1018"]),
    M("moco-shuffle-not-shared", DISTRIBUTED,
      "ShuffleBN's permutation is drawn on every GPU instead of being drawn on rank 0 and broadcast.",
      "The ranks disagree on the permutation: keys are gathered into an order their unshuffle does not undo, "
      "so queries meet other images' keys as positives.",
      [("mocov1.py", "perm = dist.broadcast(torch.randperm(len(x_all), device=x.device))",
        "perm = torch.randperm(len(x_all), device=x.device)")],
      ["tests/test_moco.py::test_shufflebn_and_queue_across_two_ranks"],
      [REVIEW]),
    # --- momentum encoders, targets and queues ------------------------------------------------------------------
    M("byol-tau-constant", MOMENTUM,
      "BYOL's target decay τ is held at τ_base instead of rising to 1 by the cosine schedule of §3.3.",
      "The target keeps moving fast to the end of training, and the late representation is noisier.",
      [("byol.py", "tau = target_decay(run.step, total, args.tau_base)", "tau = args.tau_base")],
      ["tests/test_noncontrastive.py::test_byol_main_moves_the_target_after_each_step_with_the_cosine_tau",
       SCHEDULES.format("byol")],
      ["https://github.com/lucidrains/byol-pytorch/issues/82"]),
    M("byol-tau-over-one-epoch", MOMENTUM,
      "BYOL's τ cosine counts the steps of one epoch instead of the whole run.",
      "τ reaches 1 after the first epoch, then swings between τ_base and 1 every two epochs instead of rising "
      "once over the whole run.",
      [("byol.py", "tau = target_decay(run.step, total, args.tau_base)",
        "tau = target_decay(run.step, len(loader), args.tau_base)")],
      [SCHEDULES.format("byol")],
      ["https://github.com/vturrisi/solo-learn/issues/248"]),
    M("byol-target-update-before-step", MOMENTUM,
      "BYOL's target is moved towards the online weights before the optimiser step instead of after it.",
      "The target lags one step behind the official update, averaging the previous online weights.",
      [("byol.py", "        optimizer.step()  # θ ← optimizer(θ, ∇_θ L^BYOL, η): Eq. 3, its first line\n"
        "        net.update_target(tau)  # ξ ← τξ + (1 − τ)θ: Eq. 3's second line (Eq. 1), after the optimiser step\n",
        "        net.update_target(tau)\n        optimizer.step()\n")],
      ["tests/test_noncontrastive.py::test_byol_main_moves_the_target_after_each_step_with_the_cosine_tau"],
      [REVIEW]),
    M("moco-key-encoder-moved-after-keys", MOMENTUM,
      "MoCo moves its key encoder (Eq. 2) after computing the keys instead of before.",
      "The keys come from the previous step's key encoder, one step staler than the official code's.",
      [("mocov2.py", "            momentum_update(self.encoder_q, self.encoder_k, self.m)  # Eq. 2, before the keys "
        "(official code)\n", ""),
       ("mocov2.py", "            k = unshuffle(F.normalize(self.encoder_k(x_k), dim=1))  # (n, dim), back in query "
        "order\n", "            k = unshuffle(F.normalize(self.encoder_k(x_k), dim=1))\n"
        "            momentum_update(self.encoder_q, self.encoder_k, self.m)  # after the keys\n")],
      ["tests/test_moco.py::test_forward_moves_the_key_encoder_by_eq2_before_it_computes_the_keys[mocov2]"],
      [REVIEW]),
    M("moco-no-unshuffle", MOMENTUM,
      "MoCo's keys are left in ShuffleBN's order instead of being put back beside their queries.",
      "Each query is paired with another image's key as its positive: the task is noise.",
      [("mocov1.py", "k = unshuffle(F.normalize(self.encoder_k(x_k), dim=1))",
        "k = F.normalize(self.encoder_k(x_k), dim=1)")],
      ["tests/test_moco.py::test_forward_pairs_each_query_with_the_key_of_its_own_image[mocov1]"],
      [REVIEW]),
    M("mocov1-split-bn-first-sub-batch", MOMENTUM,
      "MoCo v1's split BN keeps the running mean of its first sub-batch instead of the average over sub-batches.",
      "The running statistics, which the kNN monitor and any evaluation use, describe an eighth of each batch.",
      [("mocov1.py", SPLIT_MEAN, "self.running_mean.copy_(mean[: len(self.running_mean)])")],
      ["tests/test_moco.py::test_split_batchnorm_normalises_each_interleaved_sub_batch[layout0]",
       SPLIT_BN.format("mocov1")],
      [REVIEW]),
    M("mocov2-split-bn-first-sub-batch", MOMENTUM,
      "MoCo v2's own copy of the split BN keeps the running mean of its first sub-batch only.",
      "As for MoCo v1: the evaluation's BN statistics describe an eighth of each batch.",
      [("mocov2.py", SPLIT_MEAN, "self.running_mean.copy_(mean[: len(self.running_mean)])")],
      [SPLIT_BN.format("mocov2")],
      [REVIEW]),
    M("unigrad-F-updated-after-the-loss", MOMENTUM,
      "UniGrad's loss uses the previous step's F, updated with this batch only afterwards.",
      "The negative gradient λ·F u₁ lags a step behind the official order (pretrainer.py: F, then the loss).",
      [("unigrad.py", "            update_F(self.F, self.F_ready, z1m, z2m, self.rho)  # with this step's batch, then "
        "the loss\n        loss = unigrad_loss(z1, z2, z1m, z2m, self.F, self.lambd)\n",
        "        loss = unigrad_loss(z1, z2, z1m, z2m, self.F, self.lambd)\n        with torch.no_grad():\n"
        "            update_F(self.F, self.F_ready, z1m, z2m, self.rho)\n")],
      ["tests/test_unigrad.py::test_forward_uses_F_updated_with_this_batch"],
      [REVIEW]),
    # --- resuming a run -------------------------------------------------------------------------------------------
    M("moco-queue-lost-on-resume", RESUMING,
      "MoCo's queue is a buffer left out of the checkpoint.",
      "A resumed run starts from a queue of random vectors, which serve as negatives until K new keys have "
      "been enqueued (K/N steps), at every restart.",
      [("mocov1.py", 'self.register_buffer("queue", F.normalize(torch.randn(args.dim, args.K), dim=0))',
        'self.register_buffer("queue", F.normalize(torch.randn(args.dim, args.K), dim=0), persistent=False)')],
      [RESUME.format("mocov1")],
      ["https://github.com/galilai-group/stable-pretraining/pull/401"]),
    M("moco-pointer-lost-on-resume", RESUMING,
      "MoCo's queue pointer is a buffer left out of the checkpoint.",
      "A resumed run enqueues from slot 0 again, overwriting the newest keys and keeping stale ones for a "
      "whole turn of the queue.",
      [("mocov2.py", 'self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))',
        'self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long), persistent=False)')],
      ["tests/test_resume.py::test_moco_resumes_mid_queue_with_its_queue_and_pointer"],
      [REVIEW]),
    M("unigrad-F-lost-on-resume", RESUMING,
      "UniGrad's moving average F is a buffer left out of the checkpoint.",
      "A resumed run restarts F from zeros: the negative gradient is too weak until the average refills.",
      [("unigrad.py", 'self.register_buffer("F", torch.zeros(args.dim, args.dim, dtype=torch.float32))',
        'self.register_buffer("F", torch.zeros(args.dim, args.dim, dtype=torch.float32), persistent=False)')],
      [RESUME.format("unigrad")],
      [REVIEW]),
    M("byol-tau-restarts-on-resume", RESUMING,
      "BYOL's τ is computed from the steps this process took, not from the run's step count.",
      "Every restart sends τ back to τ_base: the target speeds up again after each resume.",
      [("byol.py", "for x1, x2 in run.batches(loader):", "k = 0\n    for x1, x2 in run.batches(loader):"),
       ("byol.py", "tau = target_decay(run.step, total, args.tau_base)",
        "tau, k = target_decay(k, total, args.tau_base), k + 1")],
      [RESUME.format("byol")],
      [REVIEW]),
    M("unigrad-m-restarts-on-resume", RESUMING,
      "UniGrad's momentum m is computed from the steps this process took, not from the run's step count.",
      "Every restart sends m back to m_base: the momentum branch speeds up again after each resume.",
      [("unigrad.py", "for x1, x2 in run.batches(loader):", "k = 0\n    for x1, x2 in run.batches(loader):"),
       ("unigrad.py", "net.m.fill_(momentum_schedule(run.step, total, args.m_base))",
        "net.m.fill_(momentum_schedule(k, total, args.m_base)); k += 1")],
      [RESUME.format("unigrad")],
      [REVIEW]),
    M("rng-not-restored-on-resume", RESUMING,
      "A resumed run does not restore the random generators' state from the checkpoint.",
      "After a restart the random draws (MoCo's ShuffleBN permutation) repeat those of the run's start.",
      [("common/train.py", "        checkpoint.set_rng_state(rng[dist.rank()] if len(rng) == dist.world() else "
        "rng[0])\n", "")],
      [RESUME.format("mocov1")],
      ["https://github.com/huggingface/transformers/issues/17032"]),
    M("sampler-restarts-the-epoch-on-resume", RESUMING,
      "A run resumed mid-epoch starts the epoch's sample order from its first batch again.",
      "The first part of the epoch is seen twice and its end never, at every restart.",
      [("common/train.py", SET_EPOCH, "loader.sampler.set_epoch(self.epoch)")],
      [RESUME.format("simsiam")],
      ["https://github.com/allenai/open-instruct/pull/1523"]),
    M("optimizer-state-not-restored", RESUMING,
      "A resumed run does not load the optimiser's state (momentum buffers).",
      "The momentum buffers restart from zero at every resume: each restart changes the trajectory.",
      [("common/train.py", '            self.optimizer.load_state_dict(ckpt["optimizer"])\n', "")],
      [RESUME.format("simsiam")],
      ["https://github.com/google/brax/issues/655"]),
    M("epoch-not-restored", RESUMING,
      "A resumed run restores the step count but not the epoch.",
      "Epoch-based schedules (cosine per epoch, milestones) and the sampler's order restart from epoch 0.",
      [("common/train.py", 'self.step, self.epoch = ckpt["step"], ckpt["epoch"]', 'self.step = ckpt["step"]')],
      [RESUME.format("simsiam")],
      ["https://github.com/facebookresearch/fairchem/pull/146"]),
    M("checkpoint-written-in-place", RESUMING,
      "The run writes checkpoint.pt with a plain torch.save onto the file, not to a temporary file renamed over "
      "it.",
      "A kill or a full disk during the write leaves a truncated checkpoint: the run cannot resume at all.",
      [("common/train.py", 'checkpoint.write({self.checkpoint: state, self.dir / "backbone.pt": '
        'self.backbone.state_dict()})',
        'torch.save(state, self.checkpoint), torch.save(self.backbone.state_dict(), self.dir / "backbone.pt")')],
      ["tests/test_resume.py::test_a_write_that_dies_inside_run_save_leaves_the_last_checkpoint"],
      [REVIEW]),
    # --- the data pipeline --------------------------------------------------------------------------------------
    M("views-one-draw", DATA,
      "The two views of an image are one augmentation draw returned twice.",
      "The positive pair is identical: the invariance task is trivial and nothing useful is learned.",
      [("common/data.py", "run(self.t1, image), run(self.t2, image)", "(lambda view: (view, view))(run(self.t1, image))")],
      [EPOCHS, "tests/test_distributed.py::test_views_are_a_function_of_the_seed_only"],
      [REVIEW]),
    M("sampler-epoch-ignored", DATA,
      "The loop never tells the sampler the epoch (set_epoch).",
      "Every epoch visits the images in the same order, with the same augmentation draws.",
      [("common/train.py", SET_EPOCH,
        "loader.sampler.set_epoch(0, skip=(self.step % self.steps_per_epoch) * loader.batch_size)")],
      [EPOCHS],
      ["https://github.com/Spijkervet/SimCLR/pull/26"]),
    M("augmentation-seed-without-epoch", DATA,
      "Each sample's augmentation seed depends on the sample but not on the epoch.",
      "Every image gets the same two views in every epoch: the augmentation stops augmenting after the first.",
      [("common/data.py", "hash((self.seed, self.epoch, i))", "hash((self.seed, i))")],
      [EPOCHS],
      ["https://github.com/facebookresearch/DepthContrast/issues/14"]),
    M("augmentation-seed-per-rank", DATA,
      "Each sample's augmentation seed depends on the rank that loads it.",
      "The views, and so the run, change with the number of GPUs.",
      [("common/data.py", "hash((self.seed, self.epoch, i))", "hash((self.seed + self.rank, self.epoch, i))")],
      ["tests/test_distributed.py::test_sampler_ranks_together_see_the_single_process_batches"],
      [REVIEW]),
    M("sampler-order-per-rank", DATA,
      "The sampler's shuffle is seeded differently on each rank.",
      "The ranks' shards overlap: some images are seen twice an epoch and others never.",
      [("common/data.py", "shuffle=True, seed=seed, drop_last=True)",
        "shuffle=True, seed=seed + (dist.rank() if rank is None else rank), drop_last=True)")],
      ["tests/test_distributed.py::test_sampler_ranks_together_see_the_single_process_batches"],
      ["https://github.com/karpathy/llm.c/issues/792"]),
    M("asymmetric-views-made-symmetric", DATA,
      "Barlow Twins' second view is built with the first view's blur and solarization probabilities.",
      "The asymmetric augmentation of BYOL Table 6, which the method uses, is lost.",
      [("barlow.py", "augment(args, args.blur2, args.solarize2))", "augment(args, args.blur1, args.solarize1))")],
      ["tests/test_noncontrastive.py::test_main_builds_the_two_asymmetric_views_of_the_paper[barlow]"],
      ["https://github.com/lucidrains/byol-pytorch/issues/31"]),
    # --- evaluation -------------------------------------------------------------------------------------------------
    M("knn-monitor-in-training-mode", EVALUATION,
      "The kNN monitor runs the backbone in training mode.",
      "Features use each evaluation batch's statistics, and the evaluation moves the running statistics that "
      "training and the saved backbone keep.",
      [("common/evaluate.py", "    backbone.eval()\n", "    backbone.train()\n")],
      [KNN],
      [REVIEW]),
    M("knn-memory-bank-augmented", EVALUATION,
      "The evaluation transform crops at random instead of resizing and centre-cropping.",
      "The kNN memory bank and the queries are random crops: the monitor's accuracy is noisy and too low.",
      [("common/data.py", "v2.CenterCrop(image_size)", "v2.RandomResizedCrop(image_size, antialias=True)")],
      [KNN],
      [REVIEW]),
    M("knn-monitor-drops-its-temperature", EVALUATION,
      "The monitor's vote is called without the run's --knn-t (the default t is used).",
      "The logged kNN accuracy is not the protocol the run names.",
      [("common/evaluate.py", "knn_predict(queries, memory, memory_labels, k, t, num_classes)",
        "knn_predict(queries, memory, memory_labels, k, num_classes=num_classes)")],
      [KNN],
      [REVIEW]),
    M("knn-vote-ignores-t", EVALUATION,
      "The weighted kNN vote uses exp(sim) instead of exp(sim / t).",
      "With t = 0.1 the nearest neighbours lose most of their weight: the vote drifts towards a majority vote.",
      [("common/evaluate.py", "(sim / t).exp()", "sim.exp()")],
      ["tests/test_data.py::test_knn_weighting_follows_exp_sim_over_t"],
      [REVIEW]),
    M("linear-probe-bn-in-training-mode", EVALUATION,
      "The linear probe's frozen backbone runs in training mode.",
      "BN normalises with each probe batch's statistics and moves its running statistics: the backbone is not "
      "the one that was trained.",
      [("common/linear.py", "backbone = gpu.model(backbone)", "backbone = gpu.model(backbone).train()")],
      ["tests/test_evaluation.py::test_standard_protocol_beats_chance_and_resumes_exactly"],
      ["https://github.com/kdexd/virtex/issues/16"]),
    # --- optimiser and schedules --------------------------------------------------------------------------------
    M("lars-decays-bn-and-biases", OPTIMISER,
      "LARS applies weight decay and the trust ratio to BN parameters and biases too.",
      "BN's γ and β are decayed towards 0 and take trust-scaled steps, which the papers exclude.",
      [("common/optim.py", "if w.ndim > 1]", "if w.ndim >= 1]")],
      ["tests/test_optim.py::test_lars_matches_reference_over_steps[shape1]"],
      ["https://github.com/vturrisi/solo-learn/issues/301"]),
    M("lars-without-trust-ratio", OPTIMISER,
      "LARS leaves out the layer-wise trust ratio η‖w‖/‖g‖.",
      "It becomes plain SGD at learning rates tuned for trust-scaled steps (η = 0.001 makes each layer's step "
      "lr × a thousandth of its weight norm).",
      [("common/optim.py", "ratio = eta * w_norm / d_norm", "ratio = torch.ones_like(w_norm)")],
      ["tests/test_optim.py::test_lars_matches_reference_over_steps[shape0]"],
      [REVIEW]),
    M("simclr-lars-lr-outside-momentum", OPTIMISER,
      "SimCLR's LARS applies the lr after the momentum buffer instead of inside it (the official classic_momentum).",
      "While the lr changes (warmup, cosine) each step differs from the official one (43% at warmup step 2).",
      [("simclr.py", "lr_in_momentum=True)", "lr_in_momentum=False)")],
      ["tests/test_cli.py::test_simclr_one_process_and_torchrun"],
      [REVIEW]),
    M("byol-warmup-dropped", OPTIMISER,
      "BYOL's learning rate starts at its peak instead of warming up linearly.",
      "The first steps take the peak learning rate from random weights, where the paper warms up for 10 "
      "epochs.",
      [("byol.py", "lr = optim.warmup_cosine(run.step, total, warmup, init_lr)",
        "lr = optim.cosine(run.step, total, init_lr)")],
      [SCHEDULES.format("byol")],
      [REVIEW]),
    M("mocov1-milestones-not-scaled", OPTIMISER,
      "MoCo v1's lr milestones (120 and 160 of 200 epochs) are not scaled to --epochs.",
      "A shorter run never decays its lr.",
      [("mocov1.py", "milestones = [int(e) * args.epochs // 200 for e in args.schedule.split(\",\")]",
        "milestones = [int(e) for e in args.schedule.split(\",\")]")],
      [SCHEDULES.format("mocov1")],
      [REVIEW]),
    M("simsiam-predictor-lr-decays", OPTIMISER,
      "SimSiam's predictor follows the cosine with the rest instead of keeping its initial lr (--fix-pred-lr).",
      "The predictor's lr decays with the encoder's, which SimSiam §4.2 reports as slightly worse than a fixed "
      "one (the ImageNet recipe).",
      [("simsiam.py", '**({"fixed_lr": init_lr} if args.fix_pred_lr else {})', "**{}")],
      [SCHEDULES.format("simsiam")],
      [REVIEW]),
    M("barlow-biases-at-the-weights-lr", OPTIMISER,
      "Barlow Twins' biases and BN parameters get the weights' lr instead of their own lr-biases.",
      "Those parameters take steps about 60× too large (0.3 against 0.0048).",
      [("barlow.py", '{"params": biases, "peak": args.lr_biases * scale}', '{"params": biases, "peak": args.lr * scale}')],
      [SCHEDULES.format("barlow")],
      [REVIEW]),
    # --- losses and architecture ----------------------------------------------------------------------------------
    M("simclr-candidates-detached", LOSSES,
      "SimCLR's candidates (every view an anchor is compared with) carry no gradient.",
      "Half of Eq. 1's gradient is lost: negatives are no longer pushed away from their anchors.",
      [("simclr.py", "candidates = F.normalize(fp32(torch.cat([z1_all, z2_all])), dim=1)",
        "candidates = F.normalize(fp32(torch.cat([z1_all, z2_all])), dim=1).detach()")],
      ["tests/test_simclr.py::test_forward_gradient_is_the_gradient_of_twice_eq1_through_every_candidate"],
      [REVIEW]),
    M("simclr-self-similarity-kept", LOSSES,
      "NT-Xent keeps each anchor's similarity with itself in the denominator (k ≠ i not masked).",
      "The constant exp(1/τ), the largest term, sits in every denominator: it takes softmax weight from the "
      "positive and the negatives and shrinks the gradient, and the loss can no longer approach 0.",
      [("simclr.py", '        logits[torch.arange(2 * n, device=z1.device), self_index] = float("-inf")  # k ≠ i in the '
        'denominator\n', "")],
      ["tests/test_simclr.py::test_nt_xent_matches_the_loop_over_pairs"],
      ["https://github.com/Lightning-Universe/lightning-bolts/issues/695"]),
    M("simsiam-no-stop-gradient", LOSSES,
      "SimSiam's target z is not detached (no stop-gradient).",
      "The representation collapses to a constant within a few epochs (SimSiam Fig. 2).",
      [("simsiam.py", "z = F.normalize(fp32(z.detach()), dim=1)", "z = F.normalize(fp32(z), dim=1)")],
      ["tests/test_losses.py::test_D_stops_the_gradient_of_z", "tests/test_losses.py::test_stop_gradient_holds_in_the_model"],
      [REVIEW]),
    M("cifar-stem-missing", LOSSES,
      "ResNet on 32-px images keeps the ImageNet stem (7×7 stride-2 convolution and max-pool).",
      "A 32-px image is down to 8 px before the first residual stage; the linked reports could not reach the "
      "papers' CIFAR-10 accuracy until the stem was changed.",
      [("common/resnet.py", "    if cifar_stem:\n", "    if False:\n")],
      ["tests/test_cli.py::test_models_of_both_recipes_have_the_papers_shapes"],
      ["https://github.com/PatrickHua/SimSiam/issues/3", "https://github.com/lightly-ai/lightly/issues/650"]),
    # --- recipe numbers where they act (tests/test_recipes.py) -----------------------------------------------------
    M("simsiam-per-gpu-bn", DISTRIBUTED,
      "SimSiam's main() prepares its model without global BN (run.prepare(..., sync_bn=False)).",
      "From W = 2 on every BN normalises by its GPU's sub-batch instead of the global batch, which the official "
      "code's SyncBN gives; the linked reproduction reached 65.1% instead of 68.0% without it.",
      [("simsiam.py", "model = run.prepare(build_model(args))  # SyncBN over all ranks",
        "model = run.prepare(build_model(args), sync_bn=False)  # SyncBN over all ranks")],
      [RECIPE_BN.format("simsiam")],
      ["https://github.com/taoyang1122/pytorch-SimSiam/issues/2"]),
    M("mocov2-global-bn", DISTRIBUTED,
      "MoCo v2's main() leaves global BN on in both encoders (run.prepare without sync_bn=False).",
      "The key encoder's BN statistics again span the whole batch, so a query's positive key shares statistics "
      "with it and the shuffle of ShuffleBN no longer hides it: the pretext task can be solved by the signature.",
      [("mocov2.py", "model = run.prepare(build_model(args), sync_bn=False)  # per-GPU BN",
        "model = run.prepare(build_model(args))  # per-GPU BN")],
      [RECIPE_BN.format("mocov2")],
      ["https://github.com/facebookresearch/moco/issues/46", "https://github.com/vturrisi/solo-learn/issues/184"]),
    M("vicreg-no-lr-scaling", OPTIMISER,
      "VICReg's peak lr is the base lr, without the linear scaling rule (init_lr = args.lr).",
      "The lr is N/256 times too low: 2× at the CIFAR-10 batch of 512, 8× at the ImageNet batch of 2048.",
      [("vicreg.py", "init_lr = args.lr * args.batch_size / 256  # linear scaling rule",
        "init_lr = args.lr  # linear scaling rule")],
      [RECIPE_STEP.format("vicreg-cifar10"), RECIPE_STEP.format("vicreg-imagenet")],
      [REVIEW]),
    M("linear-lr-not-scaled", EVALUATION,
      "common/linear.py never multiplies the protocol's base lr by B/256, also where the official code scales it.",
      "The linear evaluation's lr is B/256 times too low: 1/2 in the CIFAR-10 protocol, 1/16 in SimCLR's, BYOL's, "
      "SimSiam's and UniGrad's ImageNet protocols; every linear accuracy reported shifts.",
      [("common/linear.py", 'base = r["lr"] * r["batch_size"] / 256 if r["scale"] else r["lr"]', 'base = r["lr"]')],
      [RECIPE_LINEAR.format(p) for p in ("cifar10", "simclr", "byol", "simsiam", "unigrad")],
      [REVIEW]),
    M("barlow-no-zero-init", LOSSES,
      "Barlow Twins' ResNet keeps each residual block's last BN γ at 1 (zero_init_residual=False).",
      "The official code zero-initialises those γ, so every block starts as the identity; without it the start "
      "of training differs from the recipe's.",
      [("barlow.py", "zero_init_residual=True)", "zero_init_residual=False)")],
      [RECIPE_STEP.format("barlow-cifar10"), RECIPE_STEP.format("barlow-imagenet"),
       "tests/test_recipes.py::test_the_imagenet_resnet50_zero_inits_where_the_official_code_does[barlow]"],
      [REVIEW]),
    M("byol-no-zero-init", LOSSES,
      "BYOL's ResNet-50 keeps each bottleneck's last BN γ at 1, where the official haiku ResNet starts it at 0.",
      "Every bottleneck block of the ImageNet recipe starts as a full residual branch instead of the identity; "
      "the start of training differs from the official code's.",
      [("byol.py", 'zero_init_residual=args.arch == "resnet50")', "zero_init_residual=False)")],
      ["tests/test_recipes.py::test_the_imagenet_resnet50_zero_inits_where_the_official_code_does[byol]"],
      [REVIEW]),
    M("simclr-hue-not-scaled", DATA,
      "SimCLR's hue shift is drawn from ±0.2 instead of ±0.2·s.",
      "At the CIFAR-10 strength s = 0.5 the hue jitter is twice the paper's (App. A); the colour distortion is "
      "no longer one strength s.",
      [("simclr.py", "tf_image.uniform(g, x, -0.2 * s, 0.2 * s)", "tf_image.uniform(g, x, -0.2, 0.2)")],
      [RECIPE_VIEWS.format("simclr-cifar10")],
      [REVIEW]),
    # --- issue 25, part B: the kNN against Wu et al. 2018, the exported backbone --------------------------------
    M("knn-features-unnormalised", EVALUATION,
      "The kNN monitor leaves the backbone's features unnormalised, so its 'cosine' similarity is a dot product.",
      "Neighbours and votes favour features of large norm: every kNN number in the logs and in knn.json shifts.",
      [("common/evaluate.py", "feats.append(F.normalize(f.float(), dim=1))", "feats.append(f.float())")],
      ["tests/test_knn_reference.py::test_the_knn_monitor_of_a_real_run_is_wu_et_al_weighted_knn",
       "tests/test_knn_reference.py::test_the_offline_knn_is_wu_et_al_weighted_knn"],
      ["https://github.com/Reza-Safdari/SimSiam-91.9-top1-acc-on-CIFAR10/issues/2"]),
    M("mocov1-exports-the-key-encoder", EVALUATION,
      "MoCo v1 exports and monitors the momentum key encoder's ResNet instead of the query encoder's θ_q.",
      "backbone.pt, the kNN monitor and the linear evaluation read the key encoder, a moving average of θ_q, "
      "not the network the paper evaluates.",
      [("mocov1.py", "self.backbone = self.encoder_q[0]", "self.backbone = self.encoder_k[0]")],
      ["tests/test_export.py::test_backbone_pt_and_the_knn_monitor_hold_the_evaluated_encoder[mocov1]"],
      [REVIEW]),
]
BY_NAME = {m.name: m for m in CATALOGUE}


# --- applying an entry ------------------------------------------------------------------------------------------

class DoesNotApply(Exception):
    pass


def mutated(mutant, root=ROOT):
    """{file: its text with the entry's edits applied}; DoesNotApply when an old text does not occur exactly once."""
    texts = {}
    for file, old, new in mutant.edits:
        if file not in texts:
            path = Path(root) / file
            if not path.is_file():
                raise DoesNotApply(f"{mutant.name}: {file} does not exist")
            texts[file] = path.read_text(encoding="utf-8")
        count = texts[file].count(old)
        if count != 1:
            raise DoesNotApply(f"{mutant.name}: {file} holds {count} copies of {old.strip()[:70]!r} (needs 1)")
        texts[file] = texts[file].replace(old, new)
    return texts


def tree_files(root=ROOT):
    """The files git tracks or would track (not ignored), as they are in the working tree."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (Path(root) / f).is_file()]


def copy_tree(dest, root=ROOT):
    for f in tree_files(root):
        target = Path(dest) / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(root) / f, target)


# --- running ------------------------------------------------------------------------------------------------------

def pytest(tree, tests, timeout):
    """Run the node IDs in `tree` (pytest -x, no xdist, quiet); (exit status, output, seconds). 124 on a timeout."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "--no-header", "-p", "no:cacheprovider", "-n", "0",
               "-o", "addopts=-ra", *tests]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(tree), COLUMNS="400")  # (whole summary lines)
    env.pop("PYTEST_XDIST_WORKER", None)
    start = time.time()
    p = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        output, _ = p.communicate(timeout=timeout)
        code = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        output, code = p.communicate()[0] + f"\n(killed after {timeout} s)", 124
    return code, output, time.time() - start


def first_failure(output):
    """The first failing test and the start of its message, from pytest's short summary (-ra)."""
    found = re.findall(r"^(?:FAILED|ERROR) (.+)$", output, re.MULTILINE)
    return found[0][:240] if found else ""


def run_one(mutant, tree, timeout):
    """Apply one entry in `tree`, run its tests, restore the files: (verdict, seconds, detail)."""
    try:
        texts = mutated(mutant, tree)
    except DoesNotApply as e:
        return "does not apply", 0.0, str(e)
    originals = {f: (Path(tree) / f).read_text(encoding="utf-8") for f in texts}
    try:
        for f, text in texts.items():
            (Path(tree) / f).write_text(text, encoding="utf-8")
        code, output, seconds = pytest(tree, mutant.tests, timeout)
    finally:
        for f, text in originals.items():
            (Path(tree) / f).write_text(text, encoding="utf-8")
    if code == 1:
        return "caught", seconds, first_failure(output)
    if code == 0:
        return "SURVIVED", seconds, "every test passed with the bug"
    if code == 124:
        return "caught (timeout)", seconds, "the tests ran past the limit"
    tail = " | ".join(line for line in output.strip().splitlines()[-3:])
    return "ERROR", seconds, f"pytest exit status {code}: {tail}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="entries to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    parser.add_argument("--check", action="store_true", help="check that every entry applies, run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="entries run at once, each in its own copy (default 1)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per entry's tests (default 900)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests without any bug")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown entries: {', '.join(unknown)}; --list names them")
    chosen = [BY_NAME[n] for n in args.names] if args.names else CATALOGUE
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.group}]\n  bug:    {m.bug}\n  effect: {m.effect}\n  field:  {', '.join(m.field)}")
            print("".join(f"  test:   {t}\n" for t in m.tests))
        return 0
    problems = []
    for m in chosen:
        try:
            mutated(m)
        except DoesNotApply as e:
            problems.append(str(e))
    if args.check or problems:
        print("\n".join(problems) or f"all {len(chosen)} entries apply")
        return 1 if problems else 0
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        trees = [Path(tmp) / f"tree{j}" for j in range(max(1, args.jobs))]
        for tree in trees:
            copy_tree(tree)
        print(f"{len(chosen)} entries; copies of the tree in {tmp}", flush=True)
        if not args.no_baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            code, output, seconds = pytest(trees[0], tests, args.timeout * 2)
            print(f"baseline: the {len(tests)} tests without any bug: exit {code} in {seconds:.0f} s", flush=True)
            if code != 0:
                print(output[-3000:])
                print("the tests fail without any bug: a verdict would mean nothing; fix them first")
                return 1
        free = list(trees)
        results = {}

        def task(m):
            tree = free.pop()
            try:
                return run_one(m, tree, args.timeout)
            finally:
                free.append(tree)
        with concurrent.futures.ThreadPoolExecutor(len(trees)) as pool:
            futures = {pool.submit(task, m): m for m in chosen}
            for future in concurrent.futures.as_completed(futures):
                m = futures[future]
                verdict, seconds, detail = results[m.name] = future.result()
                print(f"{verdict:17s} {m.name:38s} {seconds:6.1f} s  {detail}", flush=True)
    bad = [n for n, (verdict, _, _) in results.items() if not verdict.startswith("caught")]
    print(f"{len(results) - len(bad)} of {len(results)} caught" + (f"; not caught: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


# --- the docs page ----------------------------------------------------------------------------------------------

def link_text(url):
    """owner/repo#N for a GitHub issue or pull request, the URL otherwise."""
    m = re.match(r"https://github\.com/([^/]+/[^/]+)/(?:issues|pull)/(\d+)$", url)
    return f"{m[1]}#{m[2]}" if m else url


def markdown():
    """The docs page's catalogue (docs/bugs_hook.py puts it where the page says): per group, one entry per bug,
    its name in bold, the bug, and a list of what it does to training, where it happened and the catching tests.
    (Entries, not a table: the tests' names are long identifiers that a table column could only break.)"""
    out = []
    for group in dict.fromkeys(m.group for m in CATALOGUE):
        out += [f"### {group}", ""]
        for m in (m for m in CATALOGUE if m.group == group):
            field = ", ".join(f"[{link_text(u)}]({u})" if u.startswith("http") else u for u in m.field)
            out += [f"**{m.name}**: {m.bug}", "", f"- *What it does to training:* {m.effect}",
                    f"- *In the field:* {field}", "- *Caught by:*"]
            out += [f"    - `{t.split('::')[0].removeprefix('tests/')}` `{t.split('::')[1]}`" for t in m.tests]
            out.append("")
    return "\n".join(out)

if __name__ == "__main__":
    sys.exit(main())
