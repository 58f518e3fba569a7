"""model_info.json is exactly RobustBench's model_info/<dataset>/Linf/<Name>.json layout."""

import json

import pytest

from dist_free.publish.model_info import robustbench_info

# RobustBench's keys, in their files' order, and the types their files hold (restated from
# model_info/cifar10/Linf/Shafahi2019Adversarial.json and the other Linf files: accuracies are
# percent strings like "86.11"; footnote and eps may be null, unreliable is a bool).
LAYOUT = {"link": str, "name": str, "authors": str, "additional_data": bool,
          "number_forward_passes": int, "dataset": str, "venue": str, "architecture": str,
          "eps": str, "clean_acc": str, "reported": str, "footnote": str, "autoattack_acc": str,
          "unreliable": bool}
NULLABLE = {"link", "name", "authors", "venue", "dataset", "eps", "clean_acc", "reported",
            "footnote", "autoattack_acc"}   # ours: what only the authors can say, or not measured


def card(num_classes, image_size, evaluation):
    return {"architecture": "wrn34_10", "num_classes": num_classes,
            "input": {"image_size": image_size, "preprocessing": "..."},
            "threat_model": {"eval_eps": 8 / 255}, "weights": {"source": "model"},
            "evaluation": evaluation}


REPORT = {"source": "report", "images": 10000, "subset": None, "protocol": None,
          "clean": {"top1": 0.8611, "top5": 0.99},
          "results": [{"attack": "autoattack", "eps": 8 / 255, "robust_top1": 0.4147}],
          "gradient_masking": {"flagged": False}}


def check_layout(info):
    assert list(info) == list(LAYOUT)
    for key, kind in LAYOUT.items():
        assert isinstance(info[key], kind) or (info[key] is None and key in NULLABLE), key
    json.dumps(info)


@pytest.mark.parametrize("n, size, name", [(10, 32, "cifar10"), (100, 32, "cifar100"),
                                           (1000, 224, "imagenet")])
def test_a_reports_figures_in_robustbenchs_layout(n, size, name):
    info = robustbench_info(card(n, size, REPORT))
    check_layout(info)
    assert (info["dataset"], info["eps"], info["clean_acc"], info["autoattack_acc"],
            info["reported"]) == (name, "8/255", "86.11", "41.47", "41.47")
    assert info["unreliable"] is False and info["additional_data"] is False
    assert "10000 val images" in info["footnote"]


def test_flagged_gradient_masking_is_unreliable_and_no_report_writes_no_figures():
    flagged = {**REPORT, "gradient_masking": {"flagged": True}}
    assert robustbench_info(card(10, 32, flagged))["unreliable"] is True
    info = robustbench_info(card(10, 32, {"source": "in_training"}))
    check_layout(info)
    assert info["clean_acc"] is None and info["autoattack_acc"] is None
    assert "no standalone evaluation" in info["footnote"].lower()


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


@pytest.mark.parametrize("n, names, name", [
    (10, CIFAR10_NAMES, "cifar10"),
    (10, [str(d) for d in range(10)], None),       # the digits demos: 10 classes at 32 px
    (100, ["apple", "aquarium_fish", "baby", "bear", "beaver", *CIFAR10_NAMES,
           *(f"class_{i}" for i in range(85))], None)])
def test_the_dataset_is_named_only_when_the_class_names_are_its_own(n, names, name):
    with_names = {**card(n, 32, REPORT), "class_to_idx": {c: i for i, c in enumerate(names)}}
    info = robustbench_info(with_names)
    check_layout(info)
    assert info["dataset"] == name


def test_cifar100s_class_names_name_it():
    from dist_free.publish.model_info import CIFAR_CLASSES
    names = sorted(CIFAR_CLASSES["cifar100"])
    assert len(names) == 100 and names[:3] == ["apple", "aquarium_fish", "baby"]
    with_names = {**card(100, 32, REPORT), "class_to_idx": {c: i for i, c in enumerate(names)}}
    assert robustbench_info(with_names)["dataset"] == "cifar100"


@pytest.mark.parametrize("evaluation", [REPORT, {"source": "in_training"}], ids=["report", "none"])
def test_weights_started_from_model_init_count_as_additional_data(evaluation):
    """A fresh start saw only the trained-on dataset; model.init's weights (a pretrained net) may
    have seen others, which RobustBench's additional_data is for."""
    fresh = robustbench_info(card(10, 32, evaluation))
    assert fresh["additional_data"] is False
    started = {**card(10, 32, evaluation),
               "training": {"config": {"model": {"init": "in21k_convnext.safetensors"}}}}
    info = robustbench_info(started)
    check_layout(info)
    assert info["additional_data"] is True
    assert "in21k_convnext.safetensors" in info["footnote"] and "model.init" in info["footnote"]
