"""Gradient balance: how much of a GID step's gradient each loss term brings, and what clipping leaves.

For GID run folders (``benchmarks/effect.py`` writes them under ``OUT/runs``) it rebuilds the run's
Distiller freshly initialised, as at the run's first step, and at each epoch checkpoint the run kept
(``run.checkpoints_to_keep``: the last two by default, so the middle and the end of a 3-epoch run),
each at the weights the run trained with there: with ``distill.balance.mode: gradient`` the ones it
calibrated; with ``dynamic`` the ones its balance held at that checkpoint, and at the start the ones
a first measurement sets. On a few training batches it takes the gradient of each loss term alone
over the student and adapter parameters and reports:

* each term's gradient norm;
* the norm of the detector's own terms together (``loss_gt_*``) and of the GID terms together;
* the factor ``train.clip_grad_norm`` scales the whole step by, which shrinks the detector's gradient too;
* the cosine between the detector's gradient and GID's;
* each GID term's gradient (its losses' summed) over the detector's: its ``distill.balance.ratios`` target.

Loss values say little about balance: a term's weight, its normalisation and the features it
reaches set its gradient, and the gradient is what training follows.

    python -m benchmarks.gradient_balance runs/bench-effect/runs/faster_rcnn_gid_default_0 --batches 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from gid.config import Config, validate
from gid.data import build_dataset, collate
from gid.distill.balance import build_balance
from gid.distill.terms import TERMS
from gid.engine.loop import build_trainable
from gid.models import read_checkpoint

DETECTOR_PREFIX = "loss_gt_"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="GID run folders holding checkpoint_*/checkpoint.pt")
    p.add_argument("--batches", type=int, default=4, help="training batches to average over")
    p.add_argument("--out", type=Path, help="also write the table here (markdown)")
    return p.parse_args(argv)


def checkpoints(run: Path) -> list[dict]:
    """The run's kept epoch checkpoints, oldest first."""
    found = sorted(run.glob("checkpoint_*/checkpoint.pt"))
    if not found:
        raise SystemExit(f"{run}: no checkpoint_*/checkpoint.pt; pass a run folder of `gid distill`")
    return [read_checkpoint(path) for path in found]


def distiller(state: dict, config: Config, trained: bool) -> torch.nn.Module:
    """The run's Distiller, fresh or trained, at the weights the run trained with at ``state`` (if it set them)."""
    torch.manual_seed(config.train.seed)
    trainable = build_trainable(config, state["num_classes"], torch.device("cpu"))
    if "balance" in state:  # distill.balance.mode gradient or dynamic
        trainable.set_term_scales(state["balance"]["scales"])
    if trained:
        trainable.student.load_state_dict(state["model"])
        if trainable.adapter is not None:
            trainable.adapter.load_state_dict(state["adapter"])
    return trainable.train()


def first_measured(model: torch.nn.Module, config: Config, images, targets) -> None:
    """Set a fresh dynamic run's weights as its first measurement does (its first step's batch is another)."""
    balance = build_balance(config.distill.balance, model)
    balance.measure(model(images, targets), [p for p in model.parameters() if p.requires_grad])


def batches(config: Config, count: int):
    dataset = build_dataset(config.data, "train", train=True)
    loader = DataLoader(dataset, batch_size=config.data.batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    for _, batch in zip(range(count), loader):
        yield batch


def flat_gradient(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def balance(model: torch.nn.Module, images, targets, clip: float | None) -> dict[str, float]:
    """Gradient norms of one batch: per term, detector vs GID, the clip factor and their cosine."""
    params = [p for p in model.parameters() if p.requires_grad]
    terms = {k: v for k, v in model(images, targets).items() if k.startswith("loss_")}
    detector = torch.zeros(sum(p.numel() for p in params))
    gid = torch.zeros_like(detector)
    by_term = {term: torch.zeros_like(detector) for term in TERMS if set(TERMS[term].losses) & set(terms)}
    row = {}
    for name, value in terms.items():
        grad = flat_gradient(value, params)
        row[name.removeprefix("loss_")] = float(grad.norm())
        if name.startswith(DETECTOR_PREFIX):
            detector += grad
        else:
            gid += grad
            by_term[next(term for term in TERMS if name in TERMS[term].losses)] += grad
    row.update({f"{term} / detector": float(grad.norm() / detector.norm()) for term, grad in by_term.items()})
    total = float((detector + gid).norm())
    row["detector"], row["gid"] = float(detector.norm()), float(gid.norm())
    row["clip_factor"] = min(1.0, clip / total) if clip else 1.0
    row["cosine"] = float(torch.nn.functional.cosine_similarity(detector, gid, dim=0))
    return row


def measure(run: Path, count: int) -> list[tuple[str, dict[str, float]]]:
    kept = checkpoints(run)
    config = validate(kept[-1]["config"], source=f"{run} (checkpoint config)")
    if config.distill is None:
        raise SystemExit(f"{run}: a run without distillation; pass a `gid distill` run")
    dynamic = config.distill.balance.mode == "dynamic"
    rows = []
    for when, state, trained in [("start", kept[-1], False), *((f"epoch {s['epoch']}", s, True) for s in kept)]:
        model = distiller(state, config, trained)
        data = list(batches(config, count))
        if dynamic and not trained:
            model.set_term_scales({term: 1.0 for term in TERMS})
            first_measured(model, config, *data[0])
        per_batch = [balance(model, images, targets, config.train.clip_grad_norm) for images, targets in data]
        mean = {key: statistics.mean(b[key] for b in per_batch) for key in per_batch[0]}
        rows.append((when, mean))
    return rows


def render(results: dict[str, list[tuple[str, dict[str, float]]]], argv: list[str]) -> str:
    ratios = sorted({k for rows in results.values() for _, r in rows for k in r if k.endswith(" / detector")})
    terms = sorted({k for rows in results.values() for _, r in rows for k in r} - {"detector", "gid", "clip_factor", "cosine", *ratios})
    lines = [
        f"command: `python -m benchmarks.gradient_balance {' '.join(argv)}`",
        "",
        "| run | weights | " + " | ".join(terms) + " | detector | GID | GID / detector | clip factor | cosine | "
        + " | ".join(ratios) + " |",
        "|---|---|" + "---:|" * (len(terms) + 5 + len(ratios)),
    ]
    for run, rows in results.items():
        for when, r in rows:
            cells = " | ".join(f"{r[t]:.2f}" if t in r else "" for t in terms)
            lines.append(
                f"| {run} | {when} | {cells} | {r['detector']:.2f} | {r['gid']:.2f} | {r['gid'] / r['detector']:.1f} "
                f"| {r['clip_factor']:.2f} | {r['cosine']:+.2f} | "
                + " | ".join(f"{r[k]:.2f}" if k in r else "" for k in ratios) + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(2)
    results = {run.name: measure(run, args.batches) for run in args.runs}
    text = render(results, argv)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
