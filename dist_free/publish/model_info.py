"""A RobustBench-style model-info record of an export (`model_info.json` beside the card).

RobustBench describes each leaderboard entry in a small JSON file (model_info/<dataset>/<threat
model>/<Name>.json: link, name, authors, additional_data, number_forward_passes, dataset, venue,
architecture, eps, clean_acc, reported, footnote, autoattack_acc, unreliable, with accuracies
as percent strings like "86.11"). This writes exactly those keys from the model card: dataset
from the data's class count, image size and class names, additional_data false (the trainer
reads one dataset) unless the run started from model.init's weights, null what only the
authors can say (link, name, authors, venue), the figures' basis (images, subset, protocol,
weights) in footnote, and unreliable when the report flagged gradient masking; the rest stays
in the card. Accuracies come only from a standalone evaluation (`python -m dist_free.evaluate`,
exported with --report); an in-training PGD figure is never written as clean_acc or autoattack_acc.
"""

from __future__ import annotations

from fractions import Fraction

from dist_free.evaluation.report import pct

FILE = "model_info.json"


def percent(x) -> str | None:
    """RobustBench's accuracy strings: percent without the sign ("72.34")."""
    return None if x is None else pct(x).removesuffix("%")


def eps_fraction(eps: float | None) -> str | None:
    """4/255 as RobustBench writes it ("4/255"), from the float the config holds."""
    if eps is None:
        return None
    f = Fraction(eps).limit_denominator(255 * 64)
    return f"{f.numerator}/{f.denominator}" if (f * 255).denominator != 1 else \
        f"{int(f * 255)}/255"


def autoattack_result(ev: dict) -> dict | None:
    rows = [r for r in ev.get("results") or [] if r.get("attack") == "autoattack"]
    return rows[0] if rows else None


# The class names the CIFAR files' meta records hold (batches.meta label_names, meta
# fine_label_names), which the loaders make the checkpoint's class_to_idx.
CIFAR_CLASSES = {
    "cifar10": frozenset("airplane automobile bird cat deer dog frog horse ship truck".split()),
    "cifar100": frozenset("""
        apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
        butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
        crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house
        kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle
        mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
        plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew
        skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank
        telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf
        woman worm""".split()),
}


def dataset(card: dict) -> str | None:
    """RobustBench's dataset name, from the data the model was trained on: CIFAR-10/100 by their
    class count at 32 px and, when the card records the classes, by their class names (the
    digits demos are 10 classes at 32 px too); ImageNet-1k by its class count; None for
    anything else."""
    n, size = card.get("num_classes"), (card.get("input") or {}).get("image_size")
    cifar = {(10, 32): "cifar10", (100, 32): "cifar100"}.get((n, size))
    if cifar is not None:
        names = card.get("class_to_idx")
        return cifar if not names or set(names) == CIFAR_CLASSES[cifar] else None
    return "imagenet" if n == 1000 else None


def started_from(card: dict) -> str | None:
    """The file the run's weights started from (model.init), or None: a fresh start."""
    config = (card.get("training") or {}).get("config") or {}
    return (config.get("model") or {}).get("init")


def footnote(ev: dict, weights: str, init: str | None = None) -> str | None:
    """What the figures rest on, in RobustBench's one free-text field."""
    origin = "" if init is None else (
        f" Started from the weights in {init} (model.init), whose training data this export "
        "cannot tell: additional_data is true.")
    if ev.get("source") != "report":
        return ("No standalone evaluation was exported with this model: run python -m "
                "dist_free.evaluate --attack autoattack and export with --report." + origin)
    s = ev.get("subset")
    images = f"{ev.get('images')} val images" + (f" (fixed subset, sha256 {s.get('files_sha256')})"
                                                 if s else "")
    named = f", protocol {ev['protocol']}" if ev.get("protocol") else ""
    return f"python -m dist_free.evaluate on {images}{named}; {weights} weights." + origin


def robustbench_info(card: dict) -> dict:
    """Exactly RobustBench's model_info/<dataset>/Linf/<Name>.json keys, in their order."""
    ev, threat = card["evaluation"], card["threat_model"]
    final = ev.get("source") == "report"
    aa = autoattack_result(ev) if final else None
    clean = (ev.get("clean") or {}).get("top1") if final else None
    gm = ev.get("gradient_masking") if final else None
    init = started_from(card)
    return {
        "link": None, "name": None, "authors": None,
        # A fresh start saw only the one dataset the trainer reads; weights from model.init may
        # have seen others (pretraining), so they count as additional data.
        "additional_data": init is not None, "number_forward_passes": 1,
        "dataset": dataset(card), "venue": None,
        "architecture": card["architecture"],
        "eps": eps_fraction(aa["eps"] if aa else threat["eval_eps"]),
        "clean_acc": percent(clean),
        "reported": percent(aa["robust_top1"]) if aa else None,
        "footnote": footnote(ev, card["weights"].get("source", "model"), init),
        "autoattack_acc": percent(aa["robust_top1"]) if aa else None,
        "unreliable": bool(isinstance(gm, dict) and gm.get("flagged")),
    }
