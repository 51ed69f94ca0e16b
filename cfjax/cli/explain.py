"""``cfjax explain ecinn|disc``: flags -> Queries, Output and the method's settings -> the explain pipelines.

    cfjax explain ecinn [--model DIR] --data mnist5k --split test --limit N --target next|K \\
        --out CF.npz [--png GRID.png] [--step adaptive|code|beyond|paper|full|...] [--refine R] [--direction predicted_means|mu] [--residual R]
    cfjax explain disc [--model DIR] --data mnist5k --split test --limit N --target next|K \\
        --out CF.npz [--png GRID.png] [--steps S] [--prior pixels|dip|inr] [--manifold duq|none] \\
        [--duq DIR] [--bn-weight W] [--progressive|--no-progressive] [--batch-size B] [--seed S]

ECINN's defaults are :data:`cfjax.pipelines.explain_ecinn.DEFAULT_STEP` / ``DEFAULT_REFINE``;
DISC's are the fields of :class:`cfjax.methods.disc.DISCConfig`.
"""

from __future__ import annotations

import argparse

from cfjax.cli.common import (
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    RESIDUAL,
    add_explain,
    add_shards,
    checked,
    output_from,
    queries_from,
)


# DISCConfig fields whose flag has another name (the CLI names the flag in an error about the field)
FLAGS = {"lambda_bn": "--bn-weight", "lambda_mc": "--manifold"}


def _check_step(text: str) -> None:
    from cfjax.methods.ecinn import parse_step

    parse_step(text)


def add_ecinn(p: argparse.ArgumentParser) -> None:
    from cfjax.methods.ecinn import DIRECTIONS, STEP_NAMES
    from cfjax.pipelines.explain_ecinn import DEFAULT_DIRECTION, DEFAULT_REFINE, DEFAULT_RESIDUAL, DEFAULT_STEP

    add_explain(p)
    p.add_argument("--step", type=checked(_check_step, "step"), default=DEFAULT_STEP,
                   help=f"alpha as a function of the boundary step alpha0: one of {', '.join(STEP_NAMES)} "
                        f"(cfjax.methods.ecinn.STEP_RULES gives each formula; adaptive: the farthest of code+0.4, beyond, code whose decode stays in the pixel range; adaptive-wide: the same, then code-0.2, code-0.4) or a number (default {DEFAULT_STEP})")
    p.add_argument("--refine", type=NON_NEGATIVE_INT, default=DEFAULT_REFINE, help=f"validity refinement rounds for counterfactuals that clipping to [0, 1] turned back (default {DEFAULT_REFINE}; 0 with --step paper is the paper's exact two-pass method)")
    p.add_argument("--direction", default=DEFAULT_DIRECTION, choices=DIRECTIONS,
                   help=f"translation direction: predicted_means (m_q - m_p, mean latents of the training images predicted as each class; the paper) or mu (learned means) (default {DEFAULT_DIRECTION})")
    p.add_argument("--residual", type=RESIDUAL, default=DEFAULT_RESIDUAL,
                   help="share in [0, 1] of the query's latent offset from its class mean (its style) that the counterfactual keeps; "
                        f"smaller: nearer the target class's typical digit, further from the query (default {DEFAULT_RESIDUAL:g}, the paper)")
    add_shards(p, 1024)


def run_ecinn(args) -> int:
    from cfjax.pipelines import explain_ecinn

    return explain_ecinn.explain(queries_from(args), output_from(args), step=args.step, refine=args.refine,
                                 direction=args.direction, batch_size=args.batch_size, devices=args.devices,
                                 seed=args.seed, quiet=args.quiet, residual=args.residual)


def add_disc(p: argparse.ArgumentParser) -> None:
    from cfjax.methods import disc
    from cfjax.pipelines.explain_disc import DEFAULT_MANIFOLD, DEFAULT_SHARD_SIZE, MANIFOLDS

    d = disc.DISCConfig()
    add_explain(p)
    p.add_argument("--steps", type=POSITIVE_INT, default=d.steps, help=f"optimisation steps in all, split over the stages (default {d.steps})")
    p.add_argument("--prior", default=d.prior, help=f"image parametrisation: pixels, dip or inr (default {d.prior})")
    p.add_argument("--fit-steps", type=NON_NEGATIVE_INT, default=d.fit_steps, help=f"steps fitting a dip/inr generator to the query first (default {d.fit_steps})")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=d.lr, help="Adam learning rate (default: the prior's)")
    p.add_argument("--manifold", choices=MANIFOLDS, default=DEFAULT_MANIFOLD, help=f"manifold consistency: duq (DUQ kernel of the target class) or none (default {DEFAULT_MANIFOLD})")
    p.add_argument("--duq", default=None, help="DUQ model directory (default: the shipped one for --data)")
    p.add_argument("--bn-weight", type=NON_NEGATIVE_FLOAT, default=d.lambda_bn, help=f"weight of the BatchNorm-statistics term (default {d.lambda_bn}; 0 for a model without BatchNorm)")
    p.add_argument("--l1-weight", type=NON_NEGATIVE_FLOAT, default=d.lambda_l1, help=f"weight of the l1 proximity to the query (default {d.lambda_l1})")
    p.add_argument("--tv-weight", type=NON_NEGATIVE_FLOAT, default=d.lambda_tv, help=f"weight of the total-variation prior (default {d.lambda_tv})")
    p.add_argument("--l2-weight", type=NON_NEGATIVE_FLOAT, default=d.lambda_l2, help=f"weight of the l2 prior on pixel values (default {d.lambda_l2})")
    strokes = disc.STYLES["strokes"]
    p.add_argument("--style", choices=("auto", *disc.STYLES), default="auto",
                   help="image-prior weights: strokes (ink {lambda_ink:g}, keep-ink {lambda_keep:g}, frame {lambda_frame:g}: handwriting "
                        "on a black page) or plain (all 0); auto (default): strokes for the MNIST-family datasets and for "
                        ".npz queries with the shipped mnist5k model, plain otherwise. The three weight flags override it".format(**strokes))
    p.add_argument("--ink-weight", type=NON_NEGATIVE_FLOAT, default=None, help="weight of the ink prior mean x(1 - x), for strokes instead of grey (default: --style's)")
    p.add_argument("--frame-weight", type=NON_NEGATIVE_FLOAT, default=None, help=f"weight of the mean ink in the outer {d.frame_width}-pixel frame, where MNIST digits have none (default: --style's)")
    p.add_argument("--keep-ink-fraction", type=POSITIVE_FLOAT, default=d.keep_fraction, help=f"share of the query's ink the --keep-ink-weight term asks to keep, in (0, 1] (default {d.keep_fraction})")
    p.add_argument("--keep-ink-weight", type=NON_NEGATIVE_FLOAT, default=None, help="weight of the penalty for keeping less than --keep-ink-fraction of the query's ink (default: --style's)")
    p.add_argument("--mc-weight", type=NON_NEGATIVE_FLOAT, default=d.lambda_mc, help=f"weight of the DUQ manifold-consistency term with --manifold duq (default {d.lambda_mc})")
    p.add_argument("--bn-convention", default=d.bn_convention, help=f"BatchNorm statistics per image or per batch (default {d.bn_convention})")
    p.add_argument("--jitter", type=NON_NEGATIVE_INT, default=d.jitter, help=f"translate the image the models see by up to this many pixels, drawn afresh each optimisation step (DeepInversion's jitter; default {d.jitter}, 0 = off; 0 for a model that may read exact pixel positions, README)")
    p.add_argument("--progressive", action=argparse.BooleanOptionalAction, default=d.progressive,
                   help=f"raise the target probability through {', '.join(map(str, d.stages))} with warm starts (default {'on' if d.progressive else 'off'})")
    add_shards(p, DEFAULT_SHARD_SIZE)


def disc_config(args):
    """The DISCConfig the flags ask for: the library's defaults, the --style's image-prior weights
    (auto: :func:`cfjax.pipelines.explain_disc.default_style` of --data and --model), then every
    flag given (CfjaxError from DISCConfig on a bad combination)."""
    from cfjax.methods import disc
    from cfjax.pipelines.explain_disc import default_style

    style = default_style(args.data, args.model) if args.style == "auto" else args.style
    d = disc.styled(disc.DISCConfig(), style)
    weights = {k: v for k, v in (("lambda_ink", args.ink_weight), ("lambda_keep", args.keep_ink_weight),
                                 ("lambda_frame", args.frame_weight)) if v is not None}
    return d.replace(
        steps=args.steps, prior=args.prior, fit_steps=args.fit_steps, lr=args.lr, lambda_bn=args.bn_weight,
        bn_convention=args.bn_convention, progressive=args.progressive, jitter=args.jitter, seed=args.seed,
        lambda_l1=args.l1_weight, lambda_tv=args.tv_weight, lambda_l2=args.l2_weight, keep_fraction=args.keep_ink_fraction,
        lambda_mc=args.mc_weight if args.manifold == "duq" else 0.0, **weights,
    )


def run_disc(args) -> int:
    from cfjax.pipelines import explain_disc

    config = disc_config(args)  # before any work
    return explain_disc.explain(queries_from(args), output_from(args), config, manifold=args.manifold, duq_dir=args.duq,
                                batch_size=args.batch_size, devices=args.devices, seed=args.seed, quiet=args.quiet)
