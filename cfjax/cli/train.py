"""``cfjax train flow|classifier|duq``: flags -> model configs and training recipes -> the trainers.

    cfjax train flow --data mnist5k --out DIR [--arch glow|ibinn|ibinn-small --epochs N | --steps N ...]
    cfjax train classifier --data mnist5k --out DIR [--arch cnn|resnet|mlp --epochs N ...]
    cfjax train duq --data mnist5k --out DIR [--source data|inversion --classifier DIR ...]

Every default is read from the library: the model configs (``ClassifierConfig``, ``DUQConfig``,
``InversionConfig``), the flow preset ``FlowArchitecture`` and the recipes ``RECIPES`` /
``ClassifierTraining`` / ``DUQTraining`` of :mod:`cfjax.pipelines`.
"""

from __future__ import annotations

import argparse

from cfjax.cli.common import (
    FINITE_FLOAT,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    add_batch_size,
    add_seed,
    add_training,
)
from cfjax.pipelines.training import CHECKPOINT_EVERY


def _recipe_help(recipes: dict) -> str:
    def one(arch, r):
        return (f"{arch}: {r['epochs']} epochs, batch {r['batch_size']}, {r['optimizer'].upper() if r['optimizer'] == 'sgd' else 'Adam'} "
                f"{r['lr']:g}, beta {r['beta']:g}")

    return "training (unset: the --arch recipe; " + "; ".join(one(a, r) for a, r in recipes.items() if a != "ibinn-small") + ")"


# --------------------------------------------------------------------------------------------
# train flow


def add_flow(p: argparse.ArgumentParser) -> None:
    from cfjax.pipelines.train_flow import ARCHS, IBINN_SMALL_BLOCKS, OPTIMIZERS, RECIPES, FlowArchitecture, FlowTraining

    a, t = FlowArchitecture(), FlowTraining()
    add_training(p, CHECKPOINT_EVERY)
    p.add_argument("--extra-train", action="append", default=[], metavar="FILE.npz",
                   help="add the images of an .npz (x, y) to the training split (repeatable); the test split stays --data's")
    p.add_argument("--arch", choices=ARCHS, default=a.arch,
                   help="flow architecture: glow (the shipped multi-scale Glow), ibinn (the IB-INN authors' network: "
                        "24+24 all-in-one blocks, DCT pooling, dense coupling), ibinn-small (8+8 blocks). Unset training "
                        f"options take the architecture's recipe (see README; default {a.arch})")
    g = p.add_argument_group(_recipe_help(RECIPES))
    g.add_argument("--epochs", type=POSITIVE_INT, default=None, help="passes over the training set")
    g.add_argument("--steps", type=POSITIVE_INT, default=None, help="total optimizer steps (overrides --epochs; sizes a run to the time available)")
    add_batch_size(g, None, "images per step")
    g.add_argument("--lr", type=POSITIVE_FLOAT, default=None, help="peak learning rate")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="adam (warm-up + cosine) or sgd (the IB-INN recipe)")
    g.add_argument("--beta", type=POSITIVE_FLOAT, default=None, help="IB trade-off: larger favours accuracy over likelihood")
    g.add_argument("--label-smoothing", type=NON_NEGATIVE_FLOAT, default=None, help="label smoothing of the L_Y term")
    g.add_argument("--train-prior", type=int, choices=(0, 1), default=None, help="1: learn the class prior (IB-INN), 0: keep it uniform")
    add_seed(p, f"seed of the initialisation, data order and noise (default {t.seed})")
    p.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                   help="start from this trained flow's weights (same --arch and network options) with a fresh "
                        "optimizer and a schedule of this run's own length: how a finished run is extended")
    p.add_argument("--noise-sigma", type=NON_NEGATIVE_FLOAT, default=a.noise_sigma, help=f"Gaussian input noise during training (default {a.noise_sigma})")
    p.add_argument("--preprocess", choices=("logit", "affine"), default=a.preprocess,
                   help=f"map of [0, 1] pixels into the flow: affine (IB-INN's 2x-1) or logit (RealNVP; measured worse for ECINN here) (default {a.preprocess})")
    p.add_argument("--noise-boundary", choices=("reflect", "none"), default=None,
                   help="training noise at the ends of the pixel range: reflect folds it back into [0, 1] (needed by "
                        "--preprocess logit), none leaves it outside as the IB-INN authors do (default: none for "
                        "ibinn / ibinn-small with the affine map, reflect otherwise)")
    glow = p.add_argument_group("--arch glow")
    glow.add_argument("--levels", type=POSITIVE_INT, default=a.levels, help=f"downsampling levels (default {a.levels})")
    glow.add_argument("--steps-per-level", type=POSITIVE_INT, default=a.steps_per_level, help=f"flow steps per level (default {a.steps_per_level})")
    glow.add_argument("--hidden", type=POSITIVE_INT, default=a.hidden, help=f"subnet width at level 0, doubling per level (default {a.hidden})")
    glow.add_argument("--downsample", choices=("haar", "squeeze"), default=a.downsample, help=f"default {a.downsample}")
    glow.add_argument("--split-levels", action="store_true", default=a.split_levels, help="multi-scale factor-out (Glow); default keeps the full latent")
    ib = p.add_argument_group("--arch ibinn / ibinn-small (each switch removes one difference from the Glow flow)")
    ib.add_argument("--blocks", type=POSITIVE_INT, default=a.blocks, help=f"all-in-one blocks per resolution (default 24, ibinn-small {IBINN_SMALL_BLOCKS})")
    ib.add_argument("--no-dense", action="store_true", help="leave out DCT pooling and the dense coupling")
    ib.add_argument("--no-batchnorm", action="store_true", help="subnets with biases instead of BatchNorm")
    ib.add_argument("--mixing", choices=("orthogonal", "permutation"), default=a.mixing,
                    help=f"fixed channel mixing after each block (default {a.mixing})")
    p.add_argument("--augment-shift", type=NON_NEGATIVE_INT, default=t.augment_shift,
                   help=f"random shifts of up to this many pixels, zero fill (default {t.augment_shift}: none)")
    p.add_argument("--augment-rotate", type=NON_NEGATIVE_FLOAT, default=t.augment_rotate, metavar="DEGREES",
                   help=f"random rotations of each training image by up to this many degrees, bilinear, zero fill (default {t.augment_rotate:g}: none)")
    p.add_argument("--augment-scale", type=NON_NEGATIVE_FLOAT, default=t.augment_scale, metavar="FRACTION",
                   help=f"random scalings of each training image by a factor in [1 - F, 1 + F] (default {t.augment_scale:g}: none)")
    p.add_argument("--ema", type=NON_NEGATIVE_FLOAT, default=t.ema, metavar="DECAY",
                   help="keep an exponential moving average of the weights with this decay (e.g. 0.999) and "
                        f"ship the average instead of the last step's weights (default {t.ema:g}: off)")


def run_flow(args) -> int:
    from cfjax.pipelines import train_flow as tf

    arch = tf.FlowArchitecture(
        arch=args.arch, levels=args.levels, steps_per_level=args.steps_per_level, hidden=args.hidden,
        downsample=args.downsample, split_levels=args.split_levels, blocks=args.blocks, dense=not args.no_dense,
        batchnorm=not args.no_batchnorm, mixing=args.mixing, noise_sigma=args.noise_sigma, preprocess=args.preprocess,
        noise_boundary=args.noise_boundary,
    )
    training = tf.FlowTraining(
        epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        beta=args.beta, label_smoothing=args.label_smoothing, train_prior=args.train_prior,
        augment_shift=args.augment_shift, augment_rotate=args.augment_rotate, augment_scale=args.augment_scale,
        ema=args.ema, seed=args.seed, checkpoint_every=args.checkpoint_every,
    )
    tf.train(arch, training, out=args.out, data=args.data, data_dir=args.data_dir, extra_train=args.extra_train,
             resume=args.resume, export=args.export, quiet=args.quiet, init_from=args.init_from)
    return 0


# --------------------------------------------------------------------------------------------
# train classifier / duq: one TrainingRecipe each


def _add_recipe(p: argparse.ArgumentParser, t, seeds: str = "initialisation and data order") -> None:
    """The output flags and the flags of a :class:`~cfjax.pipelines.training.TrainingRecipe`, defaults from ``t``."""
    add_training(p, t.checkpoint_every)
    p.add_argument("--epochs", type=POSITIVE_INT, default=t.epochs, help=f"passes over the training set (default {t.epochs})")
    add_batch_size(p, t.batch_size, f"images per step (default {t.batch_size})")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=t.lr, help=f"peak learning rate of AdamW (default {t.lr:g})")
    p.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=t.weight_decay, help=f"AdamW weight decay (default {t.weight_decay:g})")
    p.add_argument("--augment-shift", type=NON_NEGATIVE_INT, default=t.augment_shift, help=f"random shifts of up to this many pixels (0: none; default {t.augment_shift})")
    add_seed(p, f"seed of the {seeds} (default {t.seed})")


def _recipe(args):
    from cfjax.pipelines.training import TrainingRecipe

    return TrainingRecipe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          augment_shift=args.augment_shift, seed=args.seed, checkpoint_every=args.checkpoint_every)



def add_classifier(p: argparse.ArgumentParser) -> None:
    from cfjax.models.classifier import ClassifierConfig
    from cfjax.pipelines.train_classifier import DEFAULT_TRAINING

    c = ClassifierConfig()
    _add_recipe(p, DEFAULT_TRAINING)
    p.add_argument("--arch", default=c.arch, help=f"cnn (BatchNorm CNN), resnet (BatchNorm ResNet) or mlp (no BatchNorm) (default {c.arch})")
    p.add_argument("--width", type=POSITIVE_INT, default=c.width, help=f"channels of the first conv layer (cnn, resnet; default {c.width})")
    p.add_argument("--hidden", type=POSITIVE_INT, default=c.hidden, help=f"dense width (cnn head, mlp layers; default {c.hidden})")
    p.add_argument("--depth", type=POSITIVE_INT, default=c.depth, help=f"blocks per stage (resnet) / hidden layers (mlp) (default {c.depth})")


def run_classifier(args) -> int:
    from cfjax.models.classifier import ClassifierConfig
    from cfjax.pipelines import train_classifier as tc

    # Built before any data loads, so a bad option is refused first; image shape and classes
    # are the dataset's (filled in by the trainer).
    config = ClassifierConfig(arch=args.arch, width=args.width, hidden=args.hidden, depth=args.depth)
    tc.train(config, _recipe(args), out=args.out, data=args.data, data_dir=args.data_dir, resume=args.resume,
             export=args.export, quiet=args.quiet)
    return 0


# --------------------------------------------------------------------------------------------
# train duq


def add_duq(p: argparse.ArgumentParser) -> None:
    from cfjax.models.duq import DUQConfig
    from cfjax.pipelines.train_duq import DEFAULT_TRAINING, SOURCES, Synthesis

    c, s = DUQConfig(), Synthesis()
    inv = s.inversion
    _add_recipe(p, DEFAULT_TRAINING, "initialisation, data order and synthesis")
    p.add_argument("--source", default=SOURCES[0], help=f"data (train on the training images) or inversion (data-free) (default {SOURCES[0]})")
    p.add_argument("--classifier", default=s.classifier, help="--source inversion: classifier directory (default: the shipped one)")
    p.add_argument("--width", type=POSITIVE_INT, default=c.width, help=f"channels of the first conv layer (default {c.width})")
    p.add_argument("--feature-dim", type=POSITIVE_INT, default=c.feature_dim, help=f"feature width F (default {c.feature_dim})")
    p.add_argument("--embed-dim", type=POSITIVE_INT, default=c.embed_dim, help=f"embedding width E (default {c.embed_dim})")
    p.add_argument("--sigma", type=POSITIVE_FLOAT, default=c.sigma, help=f"kernel length scale (default {c.sigma})")
    p.add_argument("--gamma", type=FINITE_FLOAT, default=c.gamma, help=f"centroid EMA decay (default {c.gamma})")
    p.add_argument("--lambda-gp", type=NON_NEGATIVE_FLOAT, default=c.lambda_gp, help=f"gradient-penalty weight (default {c.lambda_gp})")
    g = p.add_argument_group("--source inversion (DeepInversion, cfjax.pipelines.synthesize)")
    g.add_argument("--synth-images", type=POSITIVE_INT, default=s.images, help=f"images to synthesise (default {s.images})")
    g.add_argument("--synth-batch-size", type=POSITIVE_INT, default=s.batch_size, help=f"images per synthetic batch (default {s.batch_size})")
    g.add_argument("--synth-steps", type=POSITIVE_INT, default=inv.steps, help=f"Adam steps per synthetic batch (default {inv.steps})")
    g.add_argument("--synth-lr", type=POSITIVE_FLOAT, default=inv.lr, help=f"Adam learning rate (default {inv.lr})")
    g.add_argument("--synth-bn-weight", type=NON_NEGATIVE_FLOAT, default=inv.bn_weight, help=f"weight of the BatchNorm-statistics term (default {inv.bn_weight})")
    g.add_argument("--synth-tv-weight", type=NON_NEGATIVE_FLOAT, default=inv.tv_weight, help=f"weight of the total variation (default {inv.tv_weight})")


def run_duq(args) -> int:
    import dataclasses

    from cfjax.models.duq import DUQConfig
    from cfjax.pipelines import train_duq as td

    config = DUQConfig(width=args.width, feature_dim=args.feature_dim, embed_dim=args.embed_dim, sigma=args.sigma,
                       gamma=args.gamma, lambda_gp=args.lambda_gp)
    inversion = dataclasses.replace(td.Synthesis().inversion, steps=args.synth_steps, lr=args.synth_lr,
                                    bn_weight=args.synth_bn_weight, tv_weight=args.synth_tv_weight)
    synthesis = td.Synthesis(images=args.synth_images, batch_size=args.synth_batch_size, classifier=args.classifier,
                             inversion=inversion)
    td.train(config, _recipe(args), out=args.out, data=args.data, data_dir=args.data_dir, source=args.source,
             synthesis=synthesis, resume=args.resume, export=args.export, quiet=args.quiet)
    return 0
