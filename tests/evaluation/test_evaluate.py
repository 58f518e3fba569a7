"""`python -m dist_free.evaluate`: exact counts on any number of ranks, a report that states its
protocol, the eps sweep's outputs, flag checks, MLflow."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from helpers_launch import ROOT, probe_env, torchrun

import pipelines
from dist_free import checkpoint
from dist_free.config import load_config
from dist_free.engine.models import build_model
from dist_free.evaluate import main, parse_args
from dist_free.evaluation.masking import assess
from dist_free.evaluation.report import print_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(demo_root, tmp_path_factory):
    cfg = load_config(ROOT / "configs/demo.yaml", [f"data.root={demo_root}"])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, cfg.model.num_classes)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    checkpoint.save_atomic({"model": model.state_dict(), "epoch": 1, "global_step": 7,
                            "config": cfg.to_dict(),
                            "class_to_idx": {str(i): i for i in range(10)}}, path)
    return path


def evaluate(launcher, ckpt, out, *args):
    proc = subprocess.run([*launcher, "-m", "dist_free.evaluate", "--checkpoint", str(ckpt),
                           "--steps", "2", "--restarts", "1", "--out", str(out), *args], cwd=ROOT,
                          env=probe_env(out), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (report,) = out.glob("eval_*.json")
    return json.loads(report.read_text()), report


def test_two_ranks_count_exactly_what_one_rank_counts(ckpt, tmp_path):
    one, path = evaluate([sys.executable], ckpt, tmp_path / "one", "--eps", "0,2/255,8/255")
    two, _ = evaluate(torchrun("--nproc_per_node=2", "--standalone"), ckpt, tmp_path / "two",
                      "--eps", "0,2/255,8/255")
    assert one["images"] == two["images"] == 359       # every val digit once, no padding
    assert one["clean"] == two["clean"]
    assert one["results"] == two["results"]            # PGD's random starts included
    assert one["results"][0]["robust_top1"] == one["clean"]["top1"]    # eps 0
    assert path.name == "eval_pgd2x1_eps0-2-8_fp32_all.json"


def test_the_report_states_its_protocol(ckpt, tmp_path):
    report, _ = evaluate([sys.executable], ckpt, tmp_path, "--eps", "4/255", "--subset", "40")
    assert report["checkpoint"] == {"path": str(ckpt), "epoch": 1, "global_step": 7,
                                    "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    assert report["split"] == "val" and report["images"] == 40 and report["dtype"] == "fp32"
    assert report["world_size"] == 1 and report["seconds"] > 0
    chosen = pipelines.split_listing(report_root(ckpt), "val", subset=40)
    assert report["subset"] == {"n": 40, "selection": pipelines.SELECTION,
                                "files_sha256": pipelines.selection_sha256(chosen)}
    assert set(report["clean"]) == {"top1", "top5"}
    assert report["results"] == [{"attack": "pgd", "eps": 4 / 255, "steps": 2, "restarts": 1,
                                  "step_size": 2.5 * (4 / 255) / 2, "loss": "ce",
                                  "robust_top1": report["results"][0]["robust_top1"]}]
    assert report["gradient_masking"] is None


def report_root(ckpt):
    return checkpoint.load(ckpt)["config"]["data"]["root"]


def test_a_sweep_is_reported_in_a_table_naming_the_protocol_beside_a_plot(ckpt, tmp_path):
    report, path = evaluate([sys.executable], ckpt, tmp_path, "--eps", "0,4/255,16/255")
    assert [r["eps"] for r in report["results"]] == [0.0, 4 / 255, 16 / 255]
    assert all(0 <= r["robust_top1"] <= 1 for r in report["results"])
    table = path.with_suffix(".md").read_text()
    assert "| 0.01569 | 4.00 |" in table and "| 0.06275 | 16.00 |" in table
    assert "PGD-2 x 1 restarts" in table and "fp32" in table and "359 val images (all)" in table
    assert str(ckpt) in table
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_final_protocol_is_the_default():
    args = parse_args(["--checkpoint", "best.pt"])
    assert (args.steps, args.restarts, args.attack, args.amp) == (50, 10, ("pgd",), "off")
    assert args.subset is None and args.masking_gap == 0.03


@pytest.mark.parametrize("flags, named", [
    (["--steps", "0"], "--steps"), (["--steps", "2.5"], "--steps"),
    (["--restarts", "-1"], "--restarts"), (["--subset", "ten"], "--subset"),
    (["--subset", "0"], "--subset"), (["--step-size", "abc"], "--step-size"),
    (["--step-size", "0"], "--step-size"), (["--attack", "fgsm"], "--attack"),
    (["--amp", "int8"], "--amp"), (["--eps", "1/0"], "--eps"),
    (["--attack", "pgd,autoattack", "--amp", "bf16"], "--amp"),
    (["--masking-gap", "2"], "--masking-gap"), (["--protocol", "madry2018"], "--protocol"),
    (["--protocol", "shafahi2019-cifar", "--steps", "7"], "--protocol"),
    (["--protocol", "shafahi2019-imagenet", "--eps", "4/255"], "--protocol"),
    (["--protocol", "shafahi2019-cifar", "--attack", "autoattack"], "--protocol")])
def test_bad_flags_exit_2_with_one_line_naming_the_flag(flags, named, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--checkpoint", "nowhere.pt", *flags])
    err = capsys.readouterr().err
    assert raised.value.code == 2
    assert named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_autoattack_without_its_package_fails_before_reading_data(ckpt, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)     # as if not installed
    assert main(["--checkpoint", str(ckpt), "--attack", "autoattack", "data.root=/nowhere"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'dist-free[eval]'" in err and len(err.strip().splitlines()) == 1


def test_masking_signs_are_printed_loudly_the_margin_gap_plainly(capsys):
    rows = [{"attack": "pgd", "eps": 0.1, "steps": 50, "restarts": 10, "step_size": 0.005,
             "loss": "ce", "robust_top1": 0.50},
            {"attack": "autoattack", "version": "standard", "eps": 0.1,
             "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "robust_top1": 0.40,
             "robust_after": {"apgd-ce": 0.49, "apgd-t": 0.45, "fab-t": 0.45, "square": 0.40}}]
    verdict = assess(rows, gap=0.03)
    assert verdict["flagged"] and verdict["pgd_minus_autoattack"] == pytest.approx(0.10)
    report = {"images": 100, "subset": None, "world_size": 1, "dtype": "fp32",
              "clean": {"top1": 0.9, "top5": 1.0}, "results": rows, "gradient_masking": verdict}
    print_report(report)
    out, err = capsys.readouterr()
    assert "POSSIBLE GRADIENT MASKING" in err and "Square (black-box) broke 5.00%" in err
    assert "PGD-50 x 10 restarts" in out and "AutoAttack standard" in out
    assert "break 4.00% more than APGD-CE" in out and "not a sign of gradient masking" in out


def with_mlflow_run(ckpt, tmp_path, uri):
    """A copy of the checkpoint that names a fresh MLflow run (as the trainer's do)."""
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    experiment = client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    state = checkpoint.load(ckpt)
    path = checkpoint.save_atomic({**state, "mlflow_run_id": run_id}, tmp_path / "best.pt")
    return path, client, run_id


def test_the_final_evaluation_goes_to_the_checkpoints_mlflow_run(ckpt, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path, client, run_id = with_mlflow_run(ckpt, tmp_path, uri)
    assert main(["--checkpoint", str(path), "--subset", "16", "--steps", "1", "--restarts", "1",
                 "--eps", "8/255", "--out", str(tmp_path / "out"), "tracking.enabled=true",
                 f"tracking.uri={uri}"]) == 0
    (report_path,) = (tmp_path / "out").glob("eval_*.json")
    report = json.loads(report_path.read_text())
    run = client.get_run(run_id)
    assert run.data.metrics["final/clean_top1"] == report["clean"]["top1"]
    assert run.data.metrics["final/pgd1x1_top1"] == report["results"][0]["robust_top1"]
    tags = run.data.tags
    assert tags["final.images"] == "16" and tags["final.dtype"] == "fp32"
    assert tags["final.attack"].startswith("PGD-1 x 1 restarts")
    assert report["subset"]["files_sha256"] in tags["final.subset"]
    assert report["checkpoint"]["sha256"] in tags["final.checkpoint"]
    assert [a.path for a in client.list_artifacts(run_id, "final_eval")] == \
        [f"final_eval/{report_path.name}"]


def test_an_unreachable_tracking_server_only_warns(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    state = checkpoint.load(ckpt)
    path = checkpoint.save_atomic({**state, "mlflow_run_id": "0" * 32}, tmp_path / "best.pt")
    assert main(["--checkpoint", str(path), "--subset", "8", "--steps", "1", "--restarts", "1",
                 "tracking.enabled=true", "tracking.uri=http://127.0.0.1:9/?team=vision42"]) == 0
    out, err = capsys.readouterr()
    assert "warning: could not log to MLflow run" in err
    # The URI is shown with its query values masked, in MLflow's quoted error too.
    assert "127.0.0.1:9/?team=***" in err and "vision42" not in out + err
    assert len(list(tmp_path.glob("eval_pgd1x1_*_subset8.json"))) == 1    # beside the checkpoint


@pytest.mark.parametrize("uri", ["postgresql://db.example/mlflow?user=ml&password=s3cret",
                                 "http://127.0.0.1:9/?token=s3cret"])
@pytest.mark.parametrize("via", ["flag", "environment"])
def test_a_tracking_uri_with_credentials_stops_evaluate_unechoed(ckpt, tmp_path, capfd,
                                                                 monkeypatch, uri, via):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    state = checkpoint.load(ckpt)
    path = checkpoint.save_atomic({**state, "mlflow_run_id": "0" * 32}, tmp_path / "best.pt")
    args = ["--checkpoint", str(path), "--subset", "8", "--steps", "1", "--restarts", "1",
            "--out", str(tmp_path / "out"), "tracking.enabled=true"]
    if via == "environment":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    else:
        args.append(f"tracking.uri={uri}")
    assert main(args) == 2
    out, err = capfd.readouterr()
    assert "error: tracking.uri:" in err and "MLFLOW_TRACKING_TOKEN" in err
    assert "s3cret" not in out + err and not (tmp_path / "out").exists()


def test_a_bad_checkpoint_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "dist_free.evaluate", "--checkpoint", str(bad)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot read checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def _broadcast_worker(rank, port, out):
    import torch.distributed as dist

    from dist_free.distributed import broadcast_buffers
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    model = build_model("small_cnn", 10)
    for buffer in model.buffers():
        buffer.fill_(rank + 1)              # ranks' BatchNorm statistics drift apart in training
    broadcast_buffers(model)
    torch.save([b.clone() for b in model.buffers()], out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_evaluation_uses_rank_0s_batchnorm_statistics_on_every_rank(tmp_path):
    """So the all-reduced accuracy is that of the model the checkpoint holds (rank 0's)."""
    from helpers_launch import free_port
    torch.multiprocessing.spawn(_broadcast_worker, args=(free_port(), tmp_path), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0, r1))
    assert all(bool((b == 1).all()) for b in r1)


def attacks_run(monkeypatch, argv, capsys):
    """The PGD runs (eps x 255, steps, restarts, step x 255) one `evaluate` call makes."""
    from dist_free.engine import attacks
    calls, real = set(), attacks.robust_correct

    def spy(model, images, labels, **kw):
        calls.add((round(kw["eps"] * 255, 6), kw["steps"], kw["restarts"],
                   round(kw["step_size"] * 255, 6)))
        return real(model, images, labels, **kw)

    monkeypatch.setattr(attacks, "robust_correct", spy)
    assert main(argv) == 0
    return calls, capsys.readouterr().out


@pytest.mark.parametrize("name, override, runs", [
    ("shafahi2019-cifar", [], {(8, 20, 10, 2), (8, 20, 1, 2), (8, 100, 1, 2)}),
    ("shafahi2019-imagenet", ["method.eps=4/255"], {(4, 10, 1, 1), (4, 50, 1, 1)}),
    ("shafahi2019-imagenet", ["method.eps=2/255"], {(2, 10, 1, 1), (2, 50, 1, 1)})])
def test_a_named_protocol_runs_exactly_its_attacks_and_is_named(ckpt, tmp_path, monkeypatch,
                                                                capsys, name, override, runs):
    from dist_free.publish.card import report_eval
    from dist_free.publish.markdown import evaluation_md
    calls, out = attacks_run(monkeypatch, ["--checkpoint", str(ckpt), "--protocol", name,
                                           "--subset", "4", "--out", str(tmp_path), *override],
                             capsys)
    assert calls == runs
    (path,) = tmp_path.glob("eval_*.json")
    report = json.loads(path.read_text())
    assert report["protocol"] == name and f"protocol {name}" in out
    rows = {(round(r["eps"] * 255, 6), r["steps"], r["restarts"], round(r["step_size"] * 255, 6))
            for r in report["results"]}
    assert rows == runs and {r["attack"] for r in report["results"]} == {"pgd"}
    assert len(report["results"]) == len(runs)
    card_ev = report_eval(report, path)
    assert card_ev["protocol"] == name and name in "\n".join(evaluation_md(card_ev))


def test_without_a_protocol_the_report_has_no_protocol_key(ckpt, tmp_path):
    from dist_free.publish.card import report_eval
    report, path = evaluate([sys.executable], ckpt, tmp_path, "--subset", "4")
    assert "protocol" not in report and "protocol" not in report_eval(report, path)
    assert len(report["results"]) == 1
